# The one exception of the S3 client (storage/s3/): every failure of the object store - an HTTP
# status with the S3 error code of its XML body, a refused or broken connection, a timeout, an
# answer too large or malformed - becomes an S3Error whose message is one line naming the operation,
# the object and what went wrong. Must never carry the secret key or unbounded server text.
import string

_PRINTABLE = frozenset(string.printable) - frozenset("\r\n\t\x0b\x0c")


def printable(text: str, limit: int = 200) -> str:
    """Server-given text made safe for one line of a message: control characters as '?', cut."""
    cleaned = "".join(c if c in _PRINTABLE else "?" for c in text[:limit])
    return cleaned + ("..." if len(text) > limit else "")


class S3Error(Exception):
    """A failed object-store operation. `status` is the HTTP status (0 when there was no answer),
    `code` the S3 error code ("NoSuchBucket", "SignatureDoesNotMatch", ...) or a word of ours
    ("timeout", "connection", "protocol", "too_large")."""

    def __init__(self, message: str, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code
