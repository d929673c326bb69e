# The quota and drain-time policy as the server asks it: one object holding the ledger, a drain
# estimator per receiving site and the open study sets, answering "may this recipient be added?",
# "may this mail be committed?", "how fast may this sender's data be read?" with verdicts that
# carry their figures. Sites are passed in (id, name, limit overrides); times always come from the
# caller, on two clocks: `now` is monotonic (drain rates, pacing, study-set expiry: durations that a
# step of the wall clock must not stretch or freeze), `wall` is Unix time (the UTC day and month of
# the volume quotas, retry times quoted to senders, when the last deferral happened).
# Pure: never does I/O, reads the clock or sleeps; the server's throttle loop feeds it.
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from .admission import (
    AdmissionConfig,
    ReceiverState,
    admit_at_end_of_data,
    admit_at_rcpt,
    record_admitted,
    standing_rcpt_acceptance,
)
from .drain import DrainConfig, DrainEstimator
from .ledger import NO_SITE, Ledger
from .limits import MailboxFull, MessageTooBig, SiteLimits, SiteUsage, Verdict, accept
from .pacing import PacingConfig, TokenBucket, pacing_rate
from .sets import OpenSets, SetPart
from .usage import check_quotas

UNLIMITED = -1
_NOT_COUNTED = SiteUsage()  # the usage of a sender without submitted-volume quotas (never compared)
_QUOTA_FIELDS = (
    "mailbox_bytes",
    "mailbox_messages",
    "max_message_size",
    "submitted_per_day",
    "submitted_per_month",
    "received_per_day",
    "received_per_month",
)


@dataclass(frozen=True)
class ThrottleSettings:
    defaults: SiteLimits = SiteLimits()
    admission: AdmissionConfig = AdmissionConfig()
    drain: DrainConfig = DrainConfig()
    pacing: PacingConfig = PacingConfig()
    drain_admission: bool = True  # False: quotas only, no deferral by drain time


class SiteRecord(Protocol):
    """What the throttle needs of a site record (storage.Site has it; SiteRef is the plain one)."""

    @property
    def id(self) -> int: ...

    @property
    def name(self) -> str: ...

    @property
    def limits(self) -> Mapping[str, float]: ...  # overrides: limit name -> value (-1 unlimited)


@dataclass
class SiteRef:
    """A site record holding only what the throttle needs."""

    id: int
    name: str
    limits: dict[str, float] = field(default_factory=dict)  # overrides: limit name -> value (-1 unlimited)


def merge_limits(defaults: SiteLimits, overrides: Mapping[str, float]) -> SiteLimits:
    """The config defaults with a site's overrides; -1 lifts a quota."""
    changes: dict[str, Any] = {}
    for name, value in overrides.items():
        if name in _QUOTA_FIELDS:
            changes[name] = None if value == UNLIMITED else int(value)
        elif name == "max_drain_time":
            changes[name] = float(value)
        elif name == "downlink":
            changes["downlink_prior"] = float(value)
    return replace(defaults, **changes)


class Throttle:
    def __init__(self, settings: ThrottleSettings = ThrottleSettings()):
        self.settings = settings
        self.ledger = Ledger()
        self.sets = OpenSets()
        self._estimators: dict[int, DrainEstimator] = {}
        self._buckets: dict[int, TokenBucket] = {}  # receiver -> its intake bucket (pacing)
        self._limits: dict[int, tuple[Mapping[str, float], SiteLimits]] = {}
        self.deferrals: Counter[tuple[str, str]] = Counter()  # (receiver name, reason) -> count
        self.last_deferral: dict[int, tuple[float, str]] = {}  # site -> (Unix time, reason)

    def reconfigure(self, settings: ThrottleSettings) -> None:
        """New settings (a configuration reload): limits, admission and pacing follow at once;
        the measured drain rates, the ledger and open study sets are kept."""
        self.settings = settings
        self._limits.clear()
        for estimator in self._estimators.values():
            estimator.config = settings.drain
        for bucket in self._buckets.values():
            bucket.config = settings.pacing

    # ---- sites -------------------------------------------------------------------------------

    def limits(self, site: SiteRecord) -> SiteLimits:
        cached = self._limits.get(site.id)
        if cached is None or cached[0] is not site.limits:  # a reloaded site record brings a new dict
            cached = (site.limits, merge_limits(self.settings.defaults, site.limits))
            self._limits[site.id] = cached
        return cached[1]

    def _estimator(self, site: SiteRecord, now: float) -> DrainEstimator:
        prior = self.limits(site).downlink_prior
        estimator = self._estimators.get(site.id)
        if estimator is None:
            estimator = DrainEstimator(prior, now, self.settings.drain)
            estimator.last_poll_at = self.ledger.last_poll(site.id)
            self._estimators[site.id] = estimator
        elif estimator.samples == 0:
            estimator.estimate = prior  # the prior serves (as set now) until there are measurements
        return estimator

    # ---- feeding -----------------------------------------------------------------------------

    def observe(self, sites: Sequence[SiteRecord], now: float) -> None:
        """One reading of every site's download counter and backlog (call every second or so)."""
        for site in sites:
            self.limits(site)
            estimator = self._estimator(site, now)
            estimator.observe(
                now,
                self.ledger.downloaded(site.id),
                sum(self.ledger.waiting(site.id).values()),
                self.ledger.last_poll(site.id),
            )
            bucket = self._buckets.get(site.id)
            if bucket is not None:
                bucket.set_rate(self.pacing_rate([site], now), now)

    # ---- decisions ---------------------------------------------------------------------------

    def receiver_state(self, site: SiteRecord, now: float) -> ReceiverState:
        return ReceiverState(
            site.name, self.limits(site), self._estimator(site, now).rate(now), self.ledger.waiting(site.id)
        )

    def at_rcpt(
        self,
        token: Hashable,
        sender: SiteRecord | None,
        receiver: SiteRecord,
        declared: int | None,
        now: float,
        wall: float,
    ) -> Verdict:
        """Quotas with the declared size, then drain-time admission; an accepted declared size is
        reserved against the receiver until `release(token)`."""
        verdict = self._quotas(sender, receiver, declared, wall, token)
        if verdict.ok and self.settings.drain_admission:
            verdict = admit_at_rcpt(
                now, _key(sender), self.receiver_state(receiver, now), declared, self.sets, self.settings.admission
            )
        if verdict.ok and declared is not None:
            self.ledger.reserve(token, receiver.id, _key(sender), declared)
        return self._counted(receiver, verdict, wall)

    def at_end_of_data(
        self,
        token: Hashable,
        sender: SiteRecord | None,
        receivers: Sequence[tuple[SiteRecord, Verdict | None]],
        size: int,
        part: SetPart | None,
        now: float,
        wall: float,
        stored: int | None = None,
    ) -> Verdict:
        """The whole mail is in: quotas with its real size and drain time per receiver. The first
        refusal refuses the mail (one reply for all recipients) and ends the transaction's
        reservations. `size` is the client's message (size limits, drain time), `stored` what the
        hub stores of it, its Received: header included (mailbox and volume quotas; default
        `size`). An accepted mail's stored size replaces the sizes reserved at RCPT, for each
        receiver (and the sender's volumes), until `release(token)`: the caller releases once
        storage has counted the mail (Storage.commit's on_committed) or failed to. So from this
        verdict to the commit no other transaction of this node can take the room the mail needs,
        and the limits hold exactly however many transactions end at once (all of this runs
        without a pause on the event loop, so no other verdict comes between the checks and the
        reservations). Other nodes' transactions in flight do not count here (_quotas): across
        nodes the index writer's check at commit holds the limits."""
        ledger = self.ledger
        ledger.release(token)
        stored = size if stored is None else stored
        for receiver, at_rcpt in receivers:
            declared = at_rcpt.figures.get("size") if at_rcpt is not None else None
            if at_rcpt is not None and isinstance(declared, int) and stored <= declared:
                verdict = at_rcpt  # quotas were checked with this size reserved until now
            else:  # (another node's transactions do not count here: see _quotas)
                verdict = self._quotas(sender, receiver, size, wall, token, stored, other_nodes=False)
            if verdict.ok and self.settings.drain_admission:  # the receiver's state only when needed
                verdict = standing_rcpt_acceptance(receiver.name, size, at_rcpt) or admit_at_end_of_data(
                    now,
                    _key(sender),
                    self.receiver_state(receiver, now),
                    size,
                    part,
                    self.sets,
                    self.settings.admission,
                    at_rcpt,
                )
            if not verdict.ok:
                ledger.release(token)
                return self._counted(receiver, verdict, wall)
            ledger.reserve(token, receiver.id, _key(sender), stored)
        return accept("admitted", size=size, receivers=len(receivers))

    def admitted(
        self, sender: SiteRecord | None, receivers: Sequence[SiteRecord], part: SetPart | None, now: float
    ) -> None:
        """The mail is committed (the ledger hears of it from storage): note its study set part."""
        for receiver in receivers:
            record_admitted(now, _key(sender), receiver.name, part, self.sets)

    def release(self, token: Hashable) -> None:
        self.ledger.release(token)

    def stream_limit(
        self, token: Hashable, sender: SiteRecord | None, receivers: Sequence[SiteRecord]
    ) -> tuple[int, str] | None:
        """The size at which the data being received must stop (and the reply to give then): the
        smallest message-size limit and mailbox room left among the receivers (and the sender)."""
        limits = []
        for site in [*([sender] if sender is not None else []), *receivers]:
            size_limit = self.limits(site).max_message_size
            if size_limit is not None:
                limits.append((size_limit, MessageTooBig.reply))
        for site in receivers:
            room = self.limits(site).mailbox_bytes
            if room is not None:
                used = self.ledger.mailbox(site.id, excluding=token)[0]
                limits.append((max(room - used, 0), MailboxFull.reply))
        return min(limits, default=None, key=lambda item: item[0])

    def pacing_rate(self, receivers: Sequence[SiteRecord], now: float) -> float | None:
        """Bytes/s at which to read a sender's data, or None for unpaced."""
        if not self.settings.pacing.enabled:
            return None
        figures = []
        for site in receivers:
            state = self.receiver_state(site, now)
            rate = state.drain_rate
            drain = state.total / rate if rate > 0 else float("inf") if state.total else 0.0
            figures.append((drain, state.limits.max_drain_time, rate))
        return pacing_rate(figures, self.settings.pacing)

    def buckets(self, receivers: Sequence[SiteRecord], now: float) -> list[TokenBucket]:
        """The intake buckets of the receivers: every sender's data for a receiver draws from its
        one bucket, whose rate `observe` keeps at the pacing rate (None: unpaced, free)."""
        found = []
        for site in receivers:
            bucket = self._buckets.get(site.id)
            if bucket is None:
                bucket = self._buckets[site.id] = TokenBucket(self.pacing_rate([site], now), now, self.settings.pacing)
            found.append(bucket)
        return found

    def _quotas(
        self,
        sender: SiteRecord | None,
        receiver: SiteRecord,
        size: int | None,
        wall: float,
        token: Hashable,
        stored: int | None = None,
        other_nodes: bool = True,
    ) -> Verdict:
        """The static quotas for one receiver, against usage that counts every other transaction's
        reservations (not `token`'s own). Without `other_nodes` (at end of data) those of other
        nodes of a cluster do not count: each node admits at RCPT what fits before it hears of the
        other's, and counting both then made every transaction refuse itself; the index writer's
        check at commit holds the limits exactly across nodes."""
        ledger = self.ledger
        sending = None
        if sender is not None:  # of a sender's usage only its submitted volumes are checked
            limits = self.limits(sender)
            counted = limits.submitted_per_day is not None or limits.submitted_per_month is not None
            sending = (limits, ledger.usage(sender.id, wall, token, other_nodes) if counted else _NOT_COUNTED)
        receiving = (self.limits(receiver), ledger.usage(receiver.id, wall, token, other_nodes))
        return check_quotas(sending, receiving, size, wall, stored)

    def _counted(self, receiver: SiteRecord, verdict: Verdict, wall: float) -> Verdict:
        if not verdict.ok:
            self.deferrals[(receiver.name, verdict.reason)] += 1
            self.last_deferral[receiver.id] = (wall, verdict.reason)
        return verdict

    # ---- reporting ---------------------------------------------------------------------------

    def state(self, site: SiteRecord, now: float, wall: float) -> dict[str, Any]:
        """The live figures of one site (metrics, `mailhub site show`)."""
        limits = self.limits(site)
        reading = self._estimator(site, now).reading(now)
        waiting = self.ledger.waiting(site.id)
        backlog = sum(waiting.values())
        drain = backlog / reading.rate if reading.rate > 0 else (float("inf") if backlog else 0.0)
        usage = self.ledger.usage(site.id, wall)
        last = self.last_deferral.get(site.id)
        paced = self.pacing_rate([site], now)
        return {
            "backlog_bytes": backlog,
            "backlog_senders": len(waiting),
            "drain_rate": reading.rate,
            "drain_estimate": reading.estimate,
            "drain_samples": reading.samples,
            "offline": reading.offline,
            "since_poll": reading.since_poll,
            "drain_time": drain,
            "max_drain_time": limits.max_drain_time,
            "saturated": drain > limits.max_drain_time,
            "paced_rate": paced,
            "deferrals": sum(n for (name, _), n in self.deferrals.items() if name == site.name),
            "last_deferral_at": last[0] if last else None,
            "last_deferral_reason": last[1] if last else None,
            "usage_ratios": usage_ratios(limits, usage),
        }


def usage_ratios(limits: SiteLimits, usage: SiteUsage) -> dict[str, float]:
    """Used / limit for every limited quota (for the usage gauges)."""
    pairs = {
        "mailbox_bytes": usage.mailbox_bytes,
        "mailbox_messages": usage.mailbox_messages,
        "submitted_per_day": usage.submitted_today,
        "submitted_per_month": usage.submitted_month,
        "received_per_day": usage.received_today,
        "received_per_month": usage.received_month,
    }
    return {
        name: used / limit for name, used in pairs.items() if (limit := getattr(limits, name)) is not None and limit > 0
    }


def _key(sender: SiteRecord | None) -> int:
    return NO_SITE if sender is None else sender.id
