# Sender pacing: how fast the hub should read one sender's DATA/BDAT bytes, so that it does not
# take in far more than the receivers can download. A token bucket whose rate follows the
# receivers' drain rates once they fall behind, never below a minimum that keeps SMTP clients from
# timing out, and switched off entirely (no arithmetic per chunk) while the receivers keep up.
# Pure logic with the clock passed in; must never sleep, do I/O or read the clock itself: it
# returns how long the caller should wait before reading on.
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PacingConfig:
    enabled: bool = True
    engage_at: float = 1.0  # pace once a receiver's drain time exceeds this part of its limit
    min_rate: float = 64 * 1024.0  # bytes/s floor: a paced client still makes steady progress
    burst_seconds: float = 2.0  # bucket depth, in seconds of the current rate
    max_wait: float = 30.0  # longest single pause (RFC 5321 data block timeout is 3 min)


def pacing_rate(receivers: list[tuple[float, float, float]], config: PacingConfig = PacingConfig()) -> float | None:
    """Bucket rate for a sender's mail from its receivers' (drain_seconds, max_drain_time,
    drain_rate) figures, or None for unpaced. Paced at the slowest lagging receiver's drain rate,
    never below `min_rate`."""
    if not config.enabled:
        return None
    lagging = [rate for drain, limit, rate in receivers if drain > config.engage_at * limit]
    if not lagging:
        return None
    return max(min(lagging), config.min_rate)


class TokenBucket:
    """Tokens are bytes. `rate` None means unpaced: `take` returns 0 and keeps no account."""

    def __init__(self, rate: float | None, now: float, config: PacingConfig = PacingConfig()):
        self.config = config
        self.rate: float | None = None
        self.tokens = 0.0
        self.updated = now
        self.set_rate(rate, now)

    def set_rate(self, rate: float | None, now: float) -> None:
        """Change the rate (e.g. after a new drain reading). Becoming paced starts with a full
        bucket, so the switch never stalls a reader at once."""
        if rate is None:
            self.rate = None
            return
        rate = max(rate, self.config.min_rate)
        if self.rate is None:
            self.tokens = rate * self.config.burst_seconds
        else:
            self._refill(now)
        self.rate = rate
        self.updated = now

    @property
    def capacity(self) -> float:
        return 0.0 if self.rate is None else self.rate * self.config.burst_seconds

    def _refill(self, now: float) -> None:
        if self.rate is not None and now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = max(self.updated, now)

    def take(self, nbytes: int, now: float) -> float:
        """Account `nbytes` just read; return the seconds to wait before reading more (0 = go on).
        The bucket may go into debt by one chunk; the wait is capped at `max_wait`."""
        if self.rate is None:
            return 0.0
        self._refill(now)
        self.tokens -= nbytes
        if self.tokens >= 0:
            return 0.0
        return min(-self.tokens / self.rate, self.config.max_wait)
