# Event-loop health: how late the hub's event loop runs its callbacks, and what it was doing when it
# stalled. A tick scheduled every TICK seconds on the loop measures its own lateness (observed into
# mailhub_event_loop_lag_seconds); a watchdog thread notices when the ticks stop, samples the loop
# thread's stack (sys._current_frames) while it is blocked, and one log line per stall names the
# innermost frames of the hub's own code, e.g.
#   event loop stalled 0.84 s in relay/imap_protocol.py:412 _wildcard_match <- ...:398 _listing
# Stall lines are rate-limited (at most MAX_LINES_PER_MINUTE; the rest are counted and the count is
# reported by the next line); a loop blocked for good is reported while it lasts (after 5 s, 10 s,
# 20 s, ...), since its end never comes.
# Must never: touch the loop from the watchdog thread (it only reads a timestamp and a stack), take
# a lock the loop holds, or log more than its rate allows.
import asyncio
import logging
import os
import sys
import threading
import time

from . import metrics

log = logging.getLogger("mailhub.loop")

TICK = 0.1                    # seconds between two lateness measurements
MAX_LINES_PER_MINUTE = 6      # stall log lines; further stalls in the minute are only counted
FIRST_HANG_REPORT = 5.0       # seconds blocked before a stall still going on is reported
_FRAMES_SHOWN = 4             # project frames named per line (innermost first)
_PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_NOT_PROJECT = (os.sep + "site-packages" + os.sep, os.sep + ".venv" + os.sep)


def where(frame) -> str:
    """'relay/x.py:12 f <- relay/y.py:40 g' for the innermost project frames of a stack (and the
    innermost frame first when it is not the project's, e.g. a library call it waits in)."""
    names, outside = [], None
    while frame is not None and len(names) < _FRAMES_SHOWN:
        path = frame.f_code.co_filename
        if path.startswith(_PROJECT) and not any(part in path for part in _NOT_PROJECT):
            names.append(f"{path[len(_PROJECT):]}:{frame.f_lineno} {frame.f_code.co_name}")
        elif not names and outside is None:
            outside = f"{os.path.basename(path)}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    if outside is not None:
        names.insert(0, outside)
    return " <- ".join(names) or "no Python frame (C code or the loop itself)"


class LoopMonitor:
    """start() on the running loop; stop() at shutdown. threshold: seconds of lateness from which a
    stall is logged (0: measure only, never log)."""

    def __init__(self, threshold: float, tick: float = TICK):
        self.threshold = threshold
        self.tick = tick
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0                    # loop time the next tick is due
        self._last_tick = time.monotonic()  # written by the loop, read by the watchdog
        self._loop_thread = 0
        self._sample: tuple[float, str] | None = None   # (the stall's last tick, where the loop was)
        self._lock = threading.Lock()       # the rate counters (both threads report)
        self._stall_started = 0.0
        self._next_hang_report = 0.0
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._window_start = 0.0
        self._lines_in_window = 0
        self._unlogged = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._last_tick = time.monotonic()
        self._due = self._loop.time() + self.tick
        self._handle = self._loop.call_at(self._due, self._on_tick)
        if self.threshold > 0:
            self._watchdog = threading.Thread(target=self._watch, name="loop-watchdog", daemon=True)
            self._watchdog.start()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._stopping.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout=5)
            self._watchdog = None

    # ---- on the loop ---------------------------------------------------------------------------
    def _on_tick(self) -> None:
        now = self._loop.time()
        lag = max(0.0, now - self._due)
        previous, self._last_tick = self._last_tick, time.monotonic()
        metrics.LOOP_LAG.observe(lag)
        if self.threshold > 0 and lag >= self.threshold:
            self._stalled(lag, previous)
        self._due = now + self.tick
        self._handle = self._loop.call_at(self._due, self._on_tick)

    def _stalled(self, lag: float, previous_tick: float) -> None:
        metrics.LOOP_STALLS.inc()
        sample, self._sample = self._sample, None
        place = sample[1] if sample is not None and sample[0] == previous_tick else \
            "a call shorter than the watchdog sees"
        self._report(f"event loop stalled {lag:.2f} s in {place}")

    def _report(self, text: str) -> None:
        """One warning line, within the rate (called from the loop and, for hangs, the watchdog)."""
        with self._lock:
            now = time.monotonic()
            if now - self._window_start >= 60:
                self._window_start, self._lines_in_window = now, 0
            if self._lines_in_window >= MAX_LINES_PER_MINUTE:
                self._unlogged += 1
                return
            self._lines_in_window += 1
            unlogged, self._unlogged = self._unlogged, 0
        log.warning("%s%s", text, f" ({unlogged} earlier stall(s) not logged)" if unlogged else "")

    # ---- the watchdog thread -------------------------------------------------------------------
    def _watch(self) -> None:
        """Wakes every threshold/4; a tick late by threshold/2 or more means the loop is blocked now:
        sample where (the first sample of a stall is kept; a stall's end is logged by the tick)."""
        period = self.threshold / 4
        while not self._stopping.wait(period):
            last = self._last_tick
            blocked = time.monotonic() - last - self.tick
            if blocked < self.threshold / 2:
                continue
            if self._stall_started != last:   # a new stall
                self._stall_started = last
                self._next_hang_report = FIRST_HANG_REPORT
                self._sample = (last, self._stack())
            elif blocked >= self._next_hang_report:
                self._next_hang_report *= 2
                self._report(f"event loop blocked for {blocked:.1f} s so far in {self._stack()}")

    def _stack(self) -> str:
        frame = sys._current_frames().get(self._loop_thread)
        try:
            return where(frame)
        finally:
            del frame
