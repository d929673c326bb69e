# Base exception of the storage package; carries the SMTP reply it maps to at the protocol edge.


class StorageError(Exception):
    """A storage operation failed; `reply` is what an SMTP client should be told."""

    reply = "451 4.3.0 Temporary storage failure, try again later"


class StorageFull(StorageError):
    reply = "452 4.3.1 Insufficient system storage"
