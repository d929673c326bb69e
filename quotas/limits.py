# Per-site limits and the verdict type of the quota package: what a site may hold and take, and
# how a refusal maps to an SMTP reply. Pure data; must never do I/O or read the clock.
#
# Replies (RFC 3463 enhanced codes), one code per cause so operators can tell them apart:
#   mailbox bytes/messages over quota      452 4.2.2  (mailbox full)
#   message larger than the site's maximum 552 5.3.4  (permanent: retrying cannot help)
#   receiver's daily/monthly volume        452 4.2.1  (mailbox temporarily not accepting)
#   sender's daily/monthly volume          451 4.7.1  (sender temporarily not authorised)
#   drain time of the receiver too long    451 4.7.0  (policy deferral; text says why, when to retry)
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

DEFAULT_MAX_DRAIN_TIME = 1800.0  # seconds a receiver may need to download its backlog
DEFAULT_DOWNLINK = 1_000_000.0  # bytes/s assumed before a site has been measured


@dataclass(frozen=True, slots=True)
class SiteLimits:
    """Limits of one site; None means unlimited. Volumes count message bytes."""

    mailbox_bytes: int | None = None
    mailbox_messages: int | None = None
    max_message_size: int | None = None
    submitted_per_day: int | None = None
    submitted_per_month: int | None = None
    received_per_day: int | None = None
    received_per_month: int | None = None
    max_drain_time: float = DEFAULT_MAX_DRAIN_TIME
    downlink_prior: float = DEFAULT_DOWNLINK  # bytes/s, the drain-rate prior

    def __post_init__(self) -> None:
        if self.max_drain_time <= 0 or self.downlink_prior < 0:
            raise ValueError("max_drain_time must be > 0 and downlink_prior >= 0")


class SiteUsage(NamedTuple):
    """What a site holds and has moved, as the index counts it (filled in by the caller). A named
    tuple: made several times per mail, at a third of a frozen dataclass's cost."""

    mailbox_bytes: int = 0
    mailbox_messages: int = 0
    submitted_today: int = 0
    submitted_month: int = 0
    received_today: int = 0
    received_month: int = 0


class QuotaError(Exception):
    """Base refusal of the quota package; `reply` is what an SMTP client should be told."""

    reply = "451 4.7.0 Deferred by local policy, try again later"

    def __init__(self, reply: str | None = None):
        if reply is not None:
            self.reply = reply
        super().__init__(self.reply)


class MailboxFull(QuotaError):
    reply = "452 4.2.2 Mailbox of the recipient site is full, try again later"


class MessageTooBig(QuotaError):
    reply = "552 5.3.4 Message size exceeds fixed maximum message size"


class ReceivedVolumeExceeded(QuotaError):
    reply = "452 4.2.1 Recipient site has reached its received-volume quota, try again later"


class SubmittedVolumeExceeded(QuotaError):
    reply = "451 4.7.1 Sender site has reached its submitted-volume quota, try again later"


class DrainDeferred(QuotaError):
    reply = "451 4.7.0 Recipient site has too much mail waiting, try again later"


@dataclass(slots=True)
class Verdict:
    """Accept (error None) or refuse with `error.reply`; `figures` are the numbers behind it.
    Never changed once made (not frozen only because a frozen dataclass is slow to make, and
    several are made per mail)."""

    error: QuotaError | None
    reason: str
    figures: Mapping[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def reply(self) -> str | None:
        return None if self.error is None else self.error.reply

    def log_text(self) -> str:
        """One log fragment: outcome, reason and figures as key=value (floats rounded)."""
        parts = [f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in self.figures.items()]
        return " ".join([("accept" if self.ok else "refuse"), f"reason={self.reason}", *parts])


def accept(reason: str, **figures: object) -> Verdict:
    return Verdict(None, reason, figures)


def refuse(error: QuotaError, reason: str, **figures: object) -> Verdict:
    return Verdict(error, reason, figures)
