# Client-side bandwidth pacing: a token bucket in "virtual finish time" form, shared by all the
# sockets of one site's line (its uplink, or its downlink). Pure: the clock is passed in, so it is
# tested without sleeping. Must never sleep or do I/O itself.
from __future__ import annotations


class Pacer:
    """`reserve(n, now)` books n bytes on the line and returns how long to wait before sending
    (or after receiving) them. rate_bytes_s <= 0 means an unlimited line (always 0)."""

    def __init__(self, rate_bytes_s: float, burst_bytes: int = 16384) -> None:
        self.rate = rate_bytes_s
        self.burst_s = burst_bytes / rate_bytes_s if rate_bytes_s > 0 else 0.0
        self._free_at = 0.0

    @classmethod
    def mbit(cls, mbit_s: float) -> Pacer:
        return cls(mbit_s * 1e6 / 8)

    @property
    def unlimited(self) -> bool:
        return self.rate <= 0

    def reserve(self, nbytes: int, now: float) -> float:
        if self.rate <= 0:
            return 0.0
        start = max(now - self.burst_s, self._free_at)
        self._free_at = start + nbytes / self.rate
        return max(0.0, self._free_at - now)
