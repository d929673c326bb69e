# The arrival process: which study is sent when, by whom, to whom. Pure and deterministic for a
# given profile (seeded random.Random); must never read the clock or touch the network.
from __future__ import annotations

import random
from dataclasses import dataclass

from .profile import Profile


@dataclass(frozen=True)
class PlannedStudy:
    number: int
    at_s: float  # offset from the start of the run
    sender: str
    receiver: str
    kind: int  # index into profile.studies
    images: int


def _pick(rng: random.Random, sites, weight) -> str:
    return rng.choices([s.name for s in sites], weights=[weight(s) for s in sites])[0]


def plan(profile: Profile) -> list[PlannedStudy]:
    """Poisson arrivals at rate_per_s over duration_s, plus the bursts, sorted by time."""
    rng = random.Random(profile.seed)
    times = []
    if profile.rate_per_s > 0:
        t = rng.expovariate(profile.rate_per_s)
        while t < profile.duration_s:
            times.append(t)
            t += rng.expovariate(profile.rate_per_s)
    for burst in profile.bursts:
        times += [burst.at_s + rng.random() * burst.within_s for _ in range(burst.studies)]
    times.sort()
    studies = []
    senders, receivers = profile.senders, profile.receivers
    for number, at in enumerate(times, 1):
        sender = _pick(rng, senders, lambda s: s.send_weight)
        targets = [s for s in receivers if s.name != sender] or receivers
        receiver = _pick(rng, targets, lambda s: s.receive_weight)
        kind_index = rng.choices(range(len(profile.studies)), weights=[k.weight for k in profile.studies])[0]
        lo, hi = profile.studies[kind_index].images
        studies.append(PlannedStudy(number, round(at, 6), sender, receiver, kind_index, rng.randint(lo, hi)))
    return studies


def poll_phase(profile: Profile, site_name: str) -> float:
    """When a receiver polls first: its first_poll_s, else a seeded phase within one interval."""
    site = profile.site(site_name)
    if site.first_poll_s is not None:
        return site.first_poll_s
    return random.Random(f"{profile.seed}:{site_name}").random() * site.poll_interval_s
