# Base exception of the storage package; carries the SMTP reply it maps to at the protocol edge.


class StorageError(Exception):
    """A storage operation failed; `reply` is what an SMTP client should be told."""

    reply = "451 4.3.0 Temporary storage failure, try again later"


class StorageFull(StorageError):
    reply = "452 4.3.1 Insufficient system storage"


class MailboxLimitReached(StorageError):
    """The commit found a receiving mailbox's byte or message limit reached (index writer check)."""

    reply = "452 4.2.2 Mailbox of the recipient site is full, try again later"


class VolumeLimitReached(StorageError):
    """The commit found a site's volume quota of the day or month reached (index writer check): the
    receiver's received volume (`reply`) or the sender's submitted volume (`SubmittedVolumeLimitReached`)."""

    reply = "452 4.2.1 Recipient site has reached its received-volume quota, try again later"


class SubmittedVolumeLimitReached(VolumeLimitReached):
    reply = "451 4.7.1 Sender site has reached its submitted-volume quota, try again later"


class AlreadyMarked(StorageError):
    """A message made by the hub with a "sent up to here" mark (commit's `mark`) was left out: the mark
    was already at or past its value, so another node (a second leader for a moment) stored it."""


# What IndexWriter.commit_batch returns instead of a SHA-256 for a message it left out, by cause.
REFUSED_MAILBOX = None
REFUSED_RECEIVED = "!received-volume"
REFUSED_SUBMITTED = "!submitted-volume"
REFUSED_MARKED = "!marked"  # its meta mark was already at or past its value (another node sent it)


def refusal(digest: str | None) -> StorageError | None:
    """The error of a message the commit left out (its commit_batch answer), None for a stored one."""
    if digest is None:
        return MailboxLimitReached()
    if digest == REFUSED_RECEIVED:
        return VolumeLimitReached()
    if digest == REFUSED_SUBMITTED:
        return SubmittedVolumeLimitReached()
    if digest == REFUSED_MARKED:
        return AlreadyMarked()
    return None


class WriterDied(StorageError):
    """The index writer process ended while it had the request: whether it ran is not known."""


class CommitUnknown(StorageError):
    """The index's answer to a COMMIT was lost (PostgreSQL's connection failed then): whether it took is
    unknown, so the hub keeps what it wrote (start-up recovery sorts it out) and acknowledges nothing."""
