# Per-site quotas and sender pacing (pure policy, clock injected). The network code only asks this
# package for verdicts and waits; nothing here does I/O, reads the clock or sleeps.
from .admission import AdmissionConfig, ReceiverState, admit_at_end_of_data, admit_at_rcpt, record_admitted
from .drain import DrainConfig, DrainEstimator, DrainReading
from .ledger import NO_SITE, Ledger
from .limits import (
    DEFAULT_DOWNLINK,
    DEFAULT_MAX_DRAIN_TIME,
    DrainDeferred,
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
from .pacing import PacingConfig, TokenBucket, pacing_rate
from .sets import OpenSets, SetPart
from .throttle import SiteRecord, SiteRef, Throttle, ThrottleSettings, merge_limits, usage_ratios
from .usage import check_mailbox, check_quotas, check_size, check_volume, next_day, next_month

__all__ = [
    "AdmissionConfig",
    "ReceiverState",
    "admit_at_end_of_data",
    "admit_at_rcpt",
    "record_admitted",
    "DrainConfig",
    "DrainEstimator",
    "DrainReading",
    "DEFAULT_DOWNLINK",
    "DEFAULT_MAX_DRAIN_TIME",
    "DrainDeferred",
    "MailboxFull",
    "MessageTooBig",
    "QuotaError",
    "ReceivedVolumeExceeded",
    "SiteLimits",
    "SiteUsage",
    "SubmittedVolumeExceeded",
    "Verdict",
    "accept",
    "refuse",
    "PacingConfig",
    "TokenBucket",
    "pacing_rate",
    "OpenSets",
    "SetPart",
    "NO_SITE",
    "Ledger",
    "SiteRecord",
    "SiteRef",
    "Throttle",
    "ThrottleSettings",
    "merge_limits",
    "usage_ratios",
    "check_mailbox",
    "check_quotas",
    "check_size",
    "check_volume",
    "next_day",
    "next_month",
]
