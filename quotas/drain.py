# Drain-rate estimate of one receiving site: the bytes per second it really downloads while it has
# mail waiting. Fed with readings (time, download counter, backlog, last poll) that the caller takes
# from the index; must never do I/O, read the clock itself or sleep.
#
# How: time between two readings counts as "waiting time" only when mail was waiting (backlog at
# the earlier reading > 0) or something was downloaded; idle time with an empty mailbox does not
# count. Waiting time and downloaded bytes accumulate into a window; each full window gives a sample
# bytes/waiting-seconds that moves a time-weighted EWMA (weight 1 - exp(-window/tau)). The estimate
# starts at the configured downlink prior, so the prior serves until measurements move it. Waiting
# time since the latest poll stays pending until the next poll: a gap between polls shorter than
# `grace` counts (slow polling is slow draining), a longer one is an offline stretch and is dropped,
# so the measured rate is intact when the site comes back. A site that has not polled for `grace`
# seconds drains nothing (rate 0).
import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DrainConfig:
    window: float = 60.0  # seconds of waiting time per sample
    tau: float = 300.0  # time constant of the moving estimate, seconds of waiting time
    grace: float = 900.0  # seconds without a poll after which the site counts as offline


@dataclass(frozen=True, slots=True)
class DrainReading:
    """The figures behind a rate, for logging."""

    rate: float  # bytes/s used for admission (0 when offline)
    estimate: float  # the moving estimate, offline or not
    samples: int  # windows measured so far (0: the prior is in use)
    offline: bool
    since_poll: float  # seconds since the last poll (or since the estimator was created)


class DrainEstimator:
    def __init__(self, prior: float, now: float, config: DrainConfig = DrainConfig()):
        self.config = config
        self.estimate = float(prior)
        self.samples = 0
        self.created_at = now
        self.last_poll_at: float | None = None
        self._last: tuple[float, int, int] | None = None  # (time, downloaded total, backlog)
        self._win_seconds = 0.0  # waiting time and bytes of the window being filled
        self._win_bytes = 0
        self._pending_seconds = 0.0  # ... and of the stretch since the latest poll
        self._pending_bytes = 0

    def observe(self, now: float, downloaded_total: int, backlog: int, last_poll_at: float | None = None) -> None:
        """Take one reading: the site's cumulative downloaded bytes, the bytes waiting for it now,
        and the time of its latest poll (login). Readings must come in time order."""
        previous_poll = self.created_at if self.last_poll_at is None else self.last_poll_at
        polled = last_poll_at is not None and last_poll_at > previous_poll
        if polled:
            self.last_poll_at = last_poll_at
        if self._last is None:
            self._last = (now, downloaded_total, backlog)
            return
        t0, total0, backlog0 = self._last
        self._last = (now, downloaded_total, backlog)
        dt, delta = now - t0, max(downloaded_total - total0, 0)  # < 0: counter reset, rebase
        if dt > 0 and (backlog0 > 0 or delta > 0):  # idle with an empty mailbox does not count
            self._pending_seconds += dt
            self._pending_bytes += delta
        if not polled or last_poll_at is None:  # (polled implies a poll time)
            return
        if last_poll_at - previous_poll <= self.config.grace:
            self._win_seconds += self._pending_seconds
            self._win_bytes += self._pending_bytes
        self._pending_seconds, self._pending_bytes = 0.0, 0  # an offline stretch is dropped
        if self._win_seconds >= self.config.window:
            sample = self._win_bytes / self._win_seconds
            weight = 1.0 - math.exp(-self._win_seconds / self.config.tau)
            self.estimate += weight * (sample - self.estimate)
            self.samples += 1
            self._win_seconds, self._win_bytes = 0.0, 0

    def _since_poll(self, now: float) -> float:
        return now - (self.created_at if self.last_poll_at is None else self.last_poll_at)

    def _offline(self, now: float) -> bool:
        return self._since_poll(now) > self.config.grace

    def reading(self, now: float) -> DrainReading:
        offline = self._offline(now)
        return DrainReading(
            0.0 if offline else self.estimate, self.estimate, self.samples, offline, self._since_poll(now)
        )

    def rate(self, now: float) -> float:
        """Bytes/s the site is expected to drain from now on (reading(now).rate)."""
        return 0.0 if self._offline(now) else self.estimate
