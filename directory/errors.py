# The directory package's one exception: a key, policy or directory operation that cannot be done,
# with a one-line message for the operator (the CLI prints it; the server logs it).


class DirectoryError(Exception):
    """Invalid key, unknown site or another refusal of a directory operation."""
