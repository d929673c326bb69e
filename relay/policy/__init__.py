# The encryption policy applied to every mail at ingest: a pure listener of the MIME stream.
