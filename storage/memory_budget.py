# The one budget of memory held for mails in flight in the process: received bytes waiting in the
# SMTP sessions' read buffers, bytes queued for the spool files' writer threads, and small mails kept
# whole in memory until their batch has packed them. When the budget is reached, every mail
# still held in memory goes to its spool file ("spill": the writer threads take its bytes), and the
# sessions receiving mail data stop reading from their sockets until memory is freed (TCP flow
# control then slows their senders). A session never waits for the budget with bytes of its own in
# memory, so memory held always drains: the budget cannot deadlock.
# After a burst (TRIM_AFTER bytes or more received since the last trim, then at most a quarter of
# the most held at once still held), glibc is asked to give free heap pages back to the system
# (malloc_trim, in a worker thread, about 5 ms for 100 MB): the chunks of received mail are freed in
# an order that leaves holes which glibc would otherwise keep. The trim waits TRIM_DELAY and is
# skipped when memory held grew again meanwhile, so a steady flow (a big mail streaming through a
# few MB) trims rarely: pages given back would only be faulted in again.
# Must never block the loop, and never do I/O.
import asyncio
import ctypes
import ctypes.util
from collections.abc import Callable
from typing import Protocol

TRIM_AFTER = 32 * 1024**2  # bytes received since the last trim that make a trim worthwhile
TRIM_DELAY = 1.0  # seconds from the end of the burst to the trim


class Spillable(Protocol):
    """What holds bytes in memory that it can write out (a storage.spool.SpoolFile)."""

    def spill(self) -> int: ...


class Pausable(Protocol):
    """A session that stopped reading its socket until memory is freed."""

    def resume_reading(self) -> None: ...


class MemoryBudget:
    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self.peak = 0
        self.spills = 0  # mails sent to their spool files early (counters for the metrics)
        self.waits = 0  # times a session stopped reading until memory was freed
        self._holders: dict[Spillable, None] = {}  # spool files holding bytes in memory outside a write job
        self._paused: dict[Pausable, None] = {}  # sessions not reading their sockets until memory is freed
        self._high = 0  # the most held at once since the last trim
        self._received = 0  # bytes taken since the last trim
        self._trim: asyncio.Handle | asyncio.Future[int] | None = None

    @property
    def full(self) -> bool:
        return self.held >= self.limit

    def take(self, octets: int, holder: Spillable | None = None) -> None:
        """`octets` more are held in memory; by `holder` (a spool file, which can spill them)."""
        self.held += octets
        self._received += octets
        if holder is not None:
            self._holders[holder] = None
        if self.held > self._high:
            self._high = self.held
            if self.held > self.peak:
                self.peak = self.held
        if self.held >= self.limit and self._holders:
            self.spill()

    def give(self, octets: int) -> None:
        """`octets` were freed (written, dropped, read from a buffer, committed)."""
        self.held -= octets
        if self._paused and self.held < self.limit:
            paused, self._paused = self._paused, {}
            for session in paused:
                session.resume_reading()
        if self._received >= TRIM_AFTER and self.held * 4 <= self._high and self._trim is None:
            if _malloc_trim is not None:
                self._trim = asyncio.get_running_loop().call_later(TRIM_DELAY, self._start_trim)

    def keep(self, holder: Spillable) -> None:
        """`holder` still holds bytes in memory outside a write job (spilled again if need be)."""
        self._holders[holder] = None

    def left(self, holder: Spillable) -> None:
        """`holder` no longer holds memory outside a write job (its bytes went to one, or away)."""
        self._holders.pop(holder, None)

    def spill(self) -> None:
        """Send every mail held in memory to its spool file (they free memory as they are written)."""
        holders, self._holders = self._holders, {}
        for holder in holders:
            self.spills += holder.spill()

    def pause(self, session: Pausable) -> None:
        """`session` stopped reading its socket; its resume_reading() is called once memory is
        under the budget again."""
        self.waits += 1
        self._paused[session] = None

    def _start_trim(self) -> None:
        if _malloc_trim is None or self.held * 4 > self._high:  # a new burst began meanwhile: trim after it
            self._trim = None
            return
        self._high, self._received = self.held, 0
        trim = asyncio.get_running_loop().run_in_executor(None, _malloc_trim, 0)
        trim.add_done_callback(self._trim_done)
        self._trim = trim

    def _trim_done(self, _: asyncio.Future[int]) -> None:
        self._trim = None


def _libc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None elsewhere (musl, macOS)."""
    try:
        trim: Callable[[int], int] = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        return trim
    except (OSError, AttributeError):
        return None


_malloc_trim = _libc_malloc_trim()
