# Base exception of the storage package; carries the SMTP reply it maps to at the protocol edge.


class StorageError(Exception):
    """A storage operation failed; `reply` is what an SMTP client should be told."""

    reply = "451 4.3.0 Temporary storage failure, try again later"


class StorageFull(StorageError):
    reply = "452 4.3.1 Insufficient system storage"


class MailboxLimitReached(StorageError):
    """The commit found a receiving mailbox's byte or message limit reached (index writer check)."""

    reply = "452 4.2.2 Mailbox of the recipient site is full, try again later"


class WriterDied(StorageError):
    """The index writer process ended while it had the request: whether it ran is not known."""


class CommitUnknown(StorageError):
    """The index's answer to a COMMIT was lost (PostgreSQL's connection failed then): whether it took is
    unknown, so the hub keeps what it wrote (start-up recovery sorts it out) and acknowledges nothing."""
