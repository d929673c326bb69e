# Static quota checks: message size, mailbox bytes/messages, daily and monthly volumes.
# Pure functions of the limits, the usage the caller read from the index, the size and `now`;
# must never do I/O, read the clock itself or keep state. Exactly at a limit is accepted.
from datetime import UTC, datetime

from .limits import (
    MailboxFull,
    MessageTooBig,
    QuotaError,
    ReceivedVolumeExceeded,
    SiteLimits,
    SiteUsage,
    SubmittedVolumeExceeded,
    Verdict,
    accept,
    refuse,
)

UNKNOWN_SIZE = 1  # a mail of undeclared size is at least one byte: the smallest it can be


def next_day(now: float) -> float:
    """Epoch seconds of the next UTC midnight after `now`."""
    return (now // 86400 + 1) * 86400


def next_month(now: float) -> float:
    """Epoch seconds of the first instant of the next UTC month after `now`."""
    t = datetime.fromtimestamp(now, tz=UTC)
    year, month = (t.year + 1, 1) if t.month == 12 else (t.year, t.month + 1)
    return datetime(year, month, 1, tzinfo=UTC).timestamp()


# Acceptances carry no figures (only refusals are logged with theirs): shared, nothing built per mail.
_SIZE_OK = accept("size_ok")
_MAILBOX_OK = accept("mailbox_ok")
_VOLUME_OK = accept("volume_ok")


def check_size(limits: SiteLimits, size: int | None) -> Verdict:
    if size is not None and limits.max_message_size is not None and size > limits.max_message_size:
        return refuse(MessageTooBig(), "message_too_big", size=size, limit=limits.max_message_size)
    return _SIZE_OK


def check_mailbox(limits: SiteLimits, usage: SiteUsage, size: int | None) -> Verdict:
    """The receiver's mailbox with this mail added must stay within bytes and message count."""
    size = UNKNOWN_SIZE if size is None else size
    over_bytes = limits.mailbox_bytes is not None and usage.mailbox_bytes + size > limits.mailbox_bytes
    over_messages = limits.mailbox_messages is not None and usage.mailbox_messages + 1 > limits.mailbox_messages
    if not (over_bytes or over_messages):
        return _MAILBOX_OK
    return refuse(
        MailboxFull(),
        "mailbox_bytes" if over_bytes else "mailbox_messages",
        mailbox_bytes=usage.mailbox_bytes,
        size=size,
        bytes_limit=limits.mailbox_bytes,
        mailbox_messages=usage.mailbox_messages,
        messages_limit=limits.mailbox_messages,
    )


def _volume(
    kind: str,
    error_cls: type[QuotaError],
    used_day: int,
    used_month: int,
    per_day: int | None,
    per_month: int | None,
    size: int,
    now: float,
) -> Verdict | None:
    if per_day is not None and used_day + size > per_day:
        retry = next_day(now)
        return refuse(
            error_cls(f"{error_cls.reply.split(',')[0]} for today, try again after {_utc(retry)}"),
            f"{kind}_per_day",
            used=used_day,
            size=size,
            limit=per_day,
            retry_at=retry,
        )
    if per_month is not None and used_month + size > per_month:
        retry = next_month(now)
        return refuse(
            error_cls(f"{error_cls.reply.split(',')[0]} for this month, try again after {_utc(retry)}"),
            f"{kind}_per_month",
            used=used_month,
            size=size,
            limit=per_month,
            retry_at=retry,
        )
    return None


def check_volume(
    sender: tuple[SiteLimits, SiteUsage] | None, receiver: tuple[SiteLimits, SiteUsage], size: int | None, now: float
) -> Verdict:
    """Sender's submitted and receiver's received volume per UTC day and month, with this mail.
    `sender` is None for mail from outside (a peer network), which has no submitted quota here."""
    size = UNKNOWN_SIZE if size is None else size
    rl, ru = receiver
    verdict = _volume(
        "received",
        ReceivedVolumeExceeded,
        ru.received_today,
        ru.received_month,
        rl.received_per_day,
        rl.received_per_month,
        size,
        now,
    )
    if verdict is None and sender is not None:
        sl, su = sender
        verdict = _volume(
            "submitted",
            SubmittedVolumeExceeded,
            su.submitted_today,
            su.submitted_month,
            sl.submitted_per_day,
            sl.submitted_per_month,
            size,
            now,
        )
    return verdict or _VOLUME_OK


def check_quotas(
    sender: tuple[SiteLimits, SiteUsage] | None,
    receiver: tuple[SiteLimits, SiteUsage],
    size: int | None,
    now: float,
    stored: int | None = None,
) -> Verdict:
    """All static checks for one receiver in order: size (receiver's and sender's), mailbox,
    volumes. Call at RCPT with the declared SIZE= (or None) and again at end of data with the real
    size, and `stored`, the size the hub stores (with its Received: header): the message size
    limit is the client's message, the mailbox and the volumes count what is stored."""
    stored = size if stored is None else stored
    verdict = check_size(receiver[0], size)
    if verdict.ok and sender is not None:
        verdict = check_size(sender[0], size)
    if verdict.ok:
        verdict = check_mailbox(receiver[0], receiver[1], stored)
    if verdict.ok:
        verdict = check_volume(sender, receiver, stored, now)
    return accept("quotas_ok", size=size) if verdict.ok else verdict


def _utc(t: float) -> str:
    return datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")
