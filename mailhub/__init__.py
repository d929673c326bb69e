# The hub process: configuration, command line, logging and the wiring of the packages.
