# Admission by drain time: may this mail join the receiver's backlog now, or must the sender's
# gateway retry later? Pure decisions on the figures the caller passes in (backlog per sender, the
# receiver's drain rate, its limits, the open study sets, `now`); must never do I/O, read the clock
# itself or sleep. Every verdict carries the figures behind it.
#
# Rules, in order, for one receiver with capacity C = max_drain_time * drain_rate bytes:
# 1. floor: a receiver with nothing waiting, or whose backlog with this mail stays within
#    `floor_bytes`, always receives (a quiet, new or just-returned site is never locked out, and a
#    mail bigger than C can still get through to an empty mailbox).
# 2. backlog + this mail <= C: accept.
# 3. saturated, and the mail continues a study set this sender has started to this receiver:
#    accept while backlog + mail <= C * (1 + set_overshoot), so studies finish before new ones
#    (a new set or a mail outside any set gets no overshoot).
# 4. saturated, and the sender's own backlog with this mail stays within its fair share C / n
#    (n = senders with mail waiting, this one included): accept; the sender holding the largest
#    share is always over its fair share when saturated, so it is deferred first. The total can
#    then exceed C by at most the other senders' fair shares, and falls back as the largest drains.
# 5. otherwise defer: 451 4.7.0 with the drain time, the limit and when to retry.
# At RCPT with no SIZE= the drain decision is left to end of data. At RCPT the set headers are not
# known yet; a sender with any open set to the receiver is let through within the overshoot band
# and decided at end of data. A mail admitted at RCPT with SIZE= is not re-judged at end of data
# unless it turned out bigger than declared (or was only let through for a possible set).
import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from .limits import DrainDeferred, SiteLimits, Verdict, accept, refuse
from .sets import OpenSets, SetPart


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    floor_bytes: int = 16 * 1024 * 1024
    set_overshoot: float = 0.25  # fraction of the drain limit a started set may go beyond
    min_retry: float = 60.0  # shortest retry time suggested to a deferred sender
    offline_retry: float = 600.0  # retry time suggested when the receiver drains nothing


@dataclass(slots=True)
class ReceiverState:
    """What the caller knows about one receiving site at the moment of the decision (never
    changed once made; not frozen because a frozen dataclass is slow to make, one per mail)."""

    name: str
    limits: SiteLimits
    drain_rate: float  # bytes/s, from DrainEstimator.rate(now)
    backlog: Mapping[Any, int]  # bytes waiting (not yet downloaded) per sender (any hashable key)

    @property
    def total(self) -> int:
        return sum(self.backlog.values())


def _decide(
    sender: Hashable, state: ReceiverState, size: int, continuation: bool, config: AdmissionConfig, stage: str
) -> Verdict:
    limit = state.limits.max_drain_time
    rate = max(state.drain_rate, 0.0)
    total = state.total
    after = total + size
    mine = state.backlog.get(sender, 0) + size
    senders = len({s for s, b in state.backlog.items() if b > 0} | {sender})
    capacity = limit * rate
    fair = capacity / senders
    drain = after / rate if rate > 0 else math.inf
    figures = dict(
        stage=stage,
        receiver=state.name,
        size=size,
        backlog=total,
        sender_backlog=state.backlog.get(sender, 0),
        rate=float(rate),
        drain_seconds=float(drain),
        limit=float(limit),
        capacity=float(capacity),
        senders=senders,
        fair_share=float(fair),
        set_continuation=continuation,
    )
    if total == 0 or after <= config.floor_bytes:
        return accept("floor", **figures)
    if after <= capacity:
        return accept("within_limit", **figures)
    if continuation and after <= capacity * (1 + config.set_overshoot):
        return accept("set_overshoot", **figures)
    if senders > 1 and mine <= fair:
        return accept("fair_share", **figures)
    if rate > 0:
        retry = min(max((after - capacity) / rate, config.min_retry), limit)
    else:
        retry = config.offline_retry
    share = f", {100.0 * mine / after:.0f}% of it from your site" if senders > 1 else ""
    reply = (
        f"{DrainDeferred.reply[:9]} Deferred: {state.name} would need "
        + (f"{drain:.0f} s" if rate > 0 else "unbounded time (not downloading)")
        + f" to download its waiting mail{share} (limit {limit:.0f} s);"
        f" try again in {retry:.0f} s"
    )
    return refuse(
        DrainDeferred(reply), "over_fair_share" if senders > 1 else "drain_time", retry_in=float(retry), **figures
    )


# RCPT acceptances that end of data must judge again.
_PROVISIONAL = ("deferred_to_end_of_data", "set_overshoot")


def admit_at_rcpt(
    now: float,
    sender: Hashable,
    state: ReceiverState,
    declared_size: int | None,
    open_sets: OpenSets,
    config: AdmissionConfig = AdmissionConfig(),
) -> Verdict:
    """Drain-time admission at RCPT. Without SIZE= nothing is decided here (end of data will)."""
    if declared_size is None:
        return accept("deferred_to_end_of_data", stage="rcpt", receiver=state.name, size=None)
    maybe_set = bool(open_sets.open_for(now, sender, state.name))
    return _decide(sender, state, declared_size, maybe_set, config, "rcpt")


def admit_at_end_of_data(
    now: float,
    sender: Hashable,
    state: ReceiverState,
    size: int,
    part: SetPart | None,
    open_sets: OpenSets,
    config: AdmissionConfig = AdmissionConfig(),
    at_rcpt: Verdict | None = None,
) -> Verdict:
    """Drain-time admission once the whole mail is in. `at_rcpt` is this receiver's verdict at
    RCPT, if any: a firm acceptance there with SIZE= stands unless the mail came out bigger. Once
    the mail is committed the caller records its set part with `record_admitted`."""
    standing = standing_rcpt_acceptance(state.name, size, at_rcpt)
    if standing is not None:
        return standing
    continuation = part is not None and open_sets.is_open(now, sender, state.name, part.set_id)
    return _decide(sender, state, size, continuation, config, "end_of_data")


def standing_rcpt_acceptance(receiver: str, size: int, at_rcpt: Verdict | None) -> Verdict | None:
    """The end-of-data verdict when a firm acceptance at RCPT with SIZE= stands (the mail did not
    come out bigger), else None: then the receiver's state decides (admit_at_end_of_data)."""
    declared = at_rcpt.figures.get("size") if at_rcpt is not None else None
    if (
        at_rcpt is not None
        and at_rcpt.ok
        and at_rcpt.reason not in _PROVISIONAL
        and isinstance(declared, int)
        and size <= declared
    ):
        return accept("admitted_at_rcpt", stage="end_of_data", receiver=receiver, size=size, declared=declared)
    return None
    return None


def record_admitted(now: float, sender: Hashable, receiver: str, part: SetPart | None, open_sets: OpenSets) -> None:
    """Note a committed mail's set part, so the rest of its set counts as a continuation."""
    if part is not None:
        open_sets.admitted(now, sender, receiver, part)
