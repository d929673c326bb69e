# The one budget of memory held for mails in flight, shared by every spool file of the process:
# received bytes queued for the spool writer threads, and small mails kept whole in memory until
# the index writer has packed them. When the budget is reached, every mail still held in memory goes
# to its spool file ("spill": the writer threads take its bytes), and receivers stop reading from
# their senders until memory is freed. After a burst (TRIM_AFTER bytes freed), glibc is asked to
# give free heap pages back to the system (malloc_trim, in a worker thread): the chunks of received
# mail are freed in an order that leaves holes which glibc would otherwise keep.
# Must never block the loop: a receiver waits, the loop does not.
import asyncio
import collections
import ctypes
import ctypes.util

TRIM_AFTER = 32 * 1024**2   # bytes freed since the last trim that make the next one worthwhile
TRIM_DELAY = 1.0            # seconds from there to the trim (one trim per burst, not per mail)


class MemoryBudget:
    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self.peak = 0
        self._holders: dict = {}    # spool files holding bytes in memory outside a write job
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self.spills = 0   # mails sent to their spool files early (counters for the metrics)
        self.waits = 0    # times a receiver waited for memory
        self._freed = 0   # bytes freed since the last trim
        self._trim: asyncio.Handle | asyncio.Future | None = None

    @property
    def full(self) -> bool:
        return self.held >= self.limit

    def take(self, octets: int, holder) -> None:
        """`holder` (a spool file) now holds `octets` more in memory, outside a write job."""
        self.held += octets
        self._holders[holder] = None
        if self.held > self.peak:
            self.peak = self.held
        if self.held >= self.limit:
            self.spill()

    def give(self, octets: int) -> None:
        """`octets` were freed (written, dropped, or committed by the index writer)."""
        self.held -= octets
        while self._waiters and self.held < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
        self._freed += octets
        if self._freed >= TRIM_AFTER and self._trim is None and _malloc_trim is not None:
            self._trim = asyncio.get_running_loop().call_later(TRIM_DELAY, self._start_trim)

    def _start_trim(self) -> None:
        self._freed = 0
        self._trim = asyncio.get_running_loop().run_in_executor(None, _malloc_trim, 0)
        self._trim.add_done_callback(self._trim_done)

    def _trim_done(self, _) -> None:
        self._trim = None

    def keep(self, holder) -> None:
        """`holder` still holds bytes in memory outside a write job (spilled again if need be)."""
        self._holders[holder] = None

    def left(self, holder) -> None:
        """`holder` no longer holds memory outside a write job (its bytes went to one, or away)."""
        self._holders.pop(holder, None)

    def spill(self) -> None:
        """Send every mail held in memory to its spool file (they free memory as they are written)."""
        holders, self._holders = self._holders, {}
        for holder in holders:
            self.spills += holder.spill()

    async def room(self) -> None:
        """Wait until the memory held is under the budget again."""
        if not self.full:
            return
        self.waits += 1
        while self.full:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter


def _libc_malloc_trim():
    """glibc's malloc_trim, or None elsewhere (musl, macOS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_malloc_trim = _libc_malloc_trim()
