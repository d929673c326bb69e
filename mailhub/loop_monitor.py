# Event-loop health: how late the hub's event loop runs its callbacks, and what it was doing when it
# stalled. A tick scheduled every TICK seconds on the loop measures its own lateness (observed into
# mailhub_event_loop_lag_seconds) and re-arms faulthandler's timer; when the loop misses its ticks
# for longer than the threshold, faulthandler's C thread (which needs no GIL, so it also sees a loop
# stuck in C code such as a regex) writes the stacks of all threads into a pipe. A watchdog thread
# logs one line per stall with the innermost frames of the loop thread, e.g.
#   event loop stalled 0.84 s in re/__init__.py:171 fullmatch <- relay/imap/protocol.py:412 ...
# Stall lines are rate-limited (at most MAX_LINES_PER_MINUTE; the rest are counted and the count is
# reported by the next line); a loop blocked for good in Python code is reported while it lasts
# (after 5 s, 10 s, 20 s, ...) from a live sample (sys._current_frames).
# Must never: touch the loop from the watchdog thread (it reads a timestamp, the pipe and a stack),
# make the loop wait for the watchdog, or log more than its rate allows. faulthandler has one such
# timer per process: nothing else in the hub may use dump_traceback_later.
import asyncio
import contextlib
import faulthandler
import fcntl
import logging
import os
import re
import sys
import threading
import time

from . import metrics

log = logging.getLogger("mailhub.loop")

TICK = 0.1  # seconds between two lateness measurements
MAX_LINES_PER_MINUTE = 6  # stall log lines; further stalls in the minute are only counted
FIRST_HANG_REPORT = 5.0  # seconds blocked before a stall still going on is reported
_FRAMES_SHOWN = 4  # project frames named per line (innermost first)
_PIPE_SIZE = 1 << 20  # room for the dump of every thread (faulthandler shows at most 100)
_PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_NOT_PROJECT = (os.sep + "site-packages" + os.sep, os.sep + ".venv" + os.sep)
_DUMP_FRAME = re.compile(r'  File "(.*)", line (\d+) in (.*)')
_WAITS = {"wait", "acquire", "get", "select", "poll", "_worker", "sleep"}


def where(frames) -> str:
    """'relay/x.py:12 f <- relay/y.py:40 g' for the innermost project frames of (path, line, name)
    tuples given innermost first; the innermost frame comes first when it is not the project's
    (e.g. a library call the loop was in)."""
    names = _project_frames(frames)
    path, line, name = frames[0] if frames else ("", 0, "")
    if frames and not _in_project(path):
        names.insert(0, f"{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)}:{line} {name}")
    return " <- ".join(names) or "no Python frame (C code or the loop itself)"


def _in_project(path: str) -> bool:
    return path.startswith(_PROJECT) and not any(part in path for part in _NOT_PROJECT)


def _project_frames(frames) -> list[str]:
    return [f"{path[len(_PROJECT) :]}:{line} {name}" for path, line, name in frames if _in_project(path)][
        :_FRAMES_SHOWN
    ]


def dumped_threads(dump: str) -> dict[int, list[tuple[str, int, str]]]:
    """Thread id -> its frames (innermost first), from a faulthandler dump."""
    threads: dict[int, list[tuple[str, int, str]]] = {}
    frames: list | None = None
    for line in dump.splitlines():
        if line.startswith(("Thread 0x", "Current thread 0x")):
            frames = threads.setdefault(int(line.split("0x", 1)[1].split()[0], 16), [])
        elif frames is not None and (match := _DUMP_FRAME.fullmatch(line)):
            frames.append((match.group(1), int(match.group(2)), match.group(3)))
    return threads


def _waiting(frames) -> bool:
    """A thread parked in a lock, queue or selector wait (not what keeps the loop from running)."""
    path, _, name = frames[0] if frames else ("", 0, "wait")
    return name in _WAITS or os.path.basename(path) in ("threading.py", "queue.py", "selectors.py")


def live_frames(frame) -> list[tuple[str, int, str]]:
    frames = []
    while frame is not None:
        frames.append((frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name))
        frame = frame.f_back
    return frames


class LoopMonitor:
    """start() on the running loop; stop() at shutdown. threshold: seconds of lateness from which a
    stall is logged (0: measure only, never log)."""

    def __init__(self, threshold: float, tick: float = TICK):
        self.threshold = threshold
        self.tick = tick
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0  # loop time the next tick is due
        self._last_tick = time.monotonic()  # written by the loop, read by the watchdog
        self._loop_thread = 0
        self._ended: tuple[float, float] | None = None  # (the stall's last tick, lag): to be logged
        self._pipe: tuple[int, int] | None = None  # faulthandler writes, the watchdog reads
        self._dump = b""
        self._hang_started = 0.0
        self._next_hang_report = 0.0
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._window_start = 0.0
        self._lines_in_window = 0
        self._unlogged = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        if self.threshold > 0:
            self._pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            with contextlib.suppress(OSError):  # a full pipe only cuts a dump short
                fcntl.fcntl(self._pipe[1], fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
            self._watchdog = threading.Thread(target=self._watch, name="loop-watchdog", daemon=True)
            self._watchdog.start()
        self._last_tick = time.monotonic()
        self._due = self._loop.time()
        self._on_tick()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._stopping.set()
        if self._watchdog is not None:
            faulthandler.cancel_dump_traceback_later()
            self._watchdog.join(timeout=5)
            self._watchdog = None
            self._read_pipe()
            if self._ended is not None:  # a stall that ended just now
                self._stalled(self._ended[1])
            for fd in self._open_pipe:
                os.close(fd)
            self._pipe = None

    @property
    def _open_pipe(self) -> tuple[int, int]:
        assert self._pipe is not None, "the pipe is open while the watchdog runs"
        return self._pipe

    # ---- on the loop ---------------------------------------------------------------------------
    def _on_tick(self) -> None:
        assert self._loop is not None, "ticks run after start()"
        now = self._loop.time()
        lag = max(0.0, now - self._due)
        previous, self._last_tick = self._last_tick, time.monotonic()
        metrics.LOOP_LAG.observe(lag)
        if self._pipe is not None:
            # fires (dumping every thread's stack) only if the next tick is late by the threshold
            faulthandler.dump_traceback_later(self.tick + self.threshold, file=self._pipe[1])
            if lag >= self.threshold:
                metrics.LOOP_STALLS.inc()
                self._ended = (previous, lag)
        self._due = now + self.tick
        self._handle = self._loop.call_at(self._due, self._on_tick)

    # ---- the watchdog thread -------------------------------------------------------------------
    def _watch(self) -> None:
        """Wakes every threshold/4: collects what faulthandler dumped, logs a stall the tick handed
        over, and reports a loop that stays blocked (while it stays blocked)."""
        while not self._stopping.wait(self.threshold / 4):
            self._read_pipe()
            ended, self._ended = self._ended, None
            blocked = time.monotonic() - self._last_tick - self.tick
            if ended is not None:
                self._stalled(ended[1])
            elif blocked < self.threshold / 2:
                self._dump = b""  # a dump at the edge of the threshold that no stall report took
            if blocked < FIRST_HANG_REPORT:
                continue
            if self._hang_started != self._last_tick:  # a new hang
                self._hang_started, self._next_hang_report = self._last_tick, FIRST_HANG_REPORT
            if blocked >= self._next_hang_report:
                self._next_hang_report *= 2
                self._report(f"event loop blocked for {blocked:.1f} s so far in {where(self._live_stack())}")

    def _read_pipe(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self._open_pipe[0], _PIPE_SIZE):
                self._dump += chunk

    def _stalled(self, lag: float) -> None:
        dump, self._dump = self._dump.decode("utf-8", "replace"), b""
        threads = dumped_threads(dump.split("Timeout (")[1] if "Timeout (" in dump else "")
        frames = threads.pop(self._loop_thread, None)
        threads.pop(threading.get_ident(), None)
        if not frames:
            place = "code the stack dump missed (likely C code in another thread holding the GIL)"
        elif _project_frames(frames):
            place = where(frames)
        else:  # the loop itself was waiting for the GIL: who held it?
            busy = [where(other) for other in threads.values() if other and not _waiting(other)]
            place = where(frames) + (f", while another thread held the GIL in {busy[0]}" if busy else "")
        self._report(f"event loop stalled {lag:.2f} s in {place}")

    def _report(self, text: str) -> None:
        """One warning line, within the rate."""
        now = time.monotonic()
        if now - self._window_start >= 60:
            self._window_start, self._lines_in_window = now, 0
        if self._lines_in_window >= MAX_LINES_PER_MINUTE:
            self._unlogged += 1
            return
        self._lines_in_window += 1
        unlogged, self._unlogged = self._unlogged, 0
        log.warning("%s%s", text, f" ({unlogged} earlier stall(s) not logged)" if unlogged else "")

    def _live_stack(self) -> list[tuple[str, int, str]]:
        frame = sys._current_frames().get(self._loop_thread)
        try:
            return live_frames(frame)
        finally:
            del frame
