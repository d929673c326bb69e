# Zero-copy sending of a stored blob over a plain TCP transport: os.sendfile() from the blob file
# to the connection's socket, in a worker thread, so the bytes never pass through Python and a
# cold-cache disk read never blocks the event loop. For POP3 RETR now, SMTP relay later. read() is
# the copying companion for what cannot go out unchanged (TLS, dot-stuffing).
#
# Why not loop.sendfile(): uvloop (the hub's loop) does not implement it (NotImplementedError), and
# the standard loop runs os.sendfile in the event-loop thread with no progress timeout.
#
# Must never: be used on a TLS transport (raw bytes would corrupt the TLS stream: check usable()),
# start while the transport still has buffered bytes (the caller waits until it is flushed) or let
# the caller write to the transport during a send, block the event loop, or touch a descriptor the
# caller may close meanwhile: the worker sends through its own dup() of the socket and its own
# opening of the file, so a connection closed mid-send can never make it write to a reused fd.
import asyncio
import os
import select
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_MAX_CALL = 0x7FFFF000   # Linux sends at most this much per sendfile() call
_POLL_MS = 250           # how often a waiting worker looks at its stop flag


class ShortFile(OSError):
    """The file ended before the requested count (a truncated blob)."""


class FileSender:
    def __init__(self, max_threads: int):
        self._pool = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="mailhub-sendfile")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def usable(transport: asyncio.Transport) -> bool:
        """True for a plain (non-TLS) socket transport."""
        sock = transport.get_extra_info("socket")
        return transport.get_extra_info("ssl_object") is None and sock is not None and sock.fileno() >= 0

    async def read(self, path: Path, offset: int, size: int) -> bytes:
        """Read part of a file in a worker thread (for the paths that must copy: TLS, dot-stuffing)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, _pread, path, offset, size)

    async def send(self, transport: asyncio.Transport, path: Path, offset: int, count: int,
                   stop: threading.Event, idle_timeout: float) -> bool:
        """Send count bytes of the file from offset; return True when the file's last byte sent is LF
        (or nothing was sent).  Raises OSError (ShortFile, connection errors), TimeoutError when
        the peer takes nothing for idle_timeout seconds, or ConnectionAbortedError once stop is set.
        If the caller is cancelled it must set stop; the worker then ends within _POLL_MS."""
        sock_fd = os.dup(transport.get_extra_info("socket").fileno())
        try:
            job = asyncio.get_running_loop().run_in_executor(
                self._pool, _send, sock_fd, path, offset, count, stop, idle_timeout)
        except BaseException:
            os.close(sock_fd)
            raise
        return await job


def _pread(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), size, offset)


def _send(sock_fd: int, path: Path, offset: int, count: int, stop: threading.Event,
          idle_timeout: float) -> bool:
    """Worker side; owns (and closes) sock_fd and the file."""
    try:
        with open(path, "rb") as f:
            file_fd = f.fileno()
            poller = select.poll()
            poller.register(sock_fd, select.POLLOUT)
            end = offset + count
            last_progress = time.monotonic()
            while offset < end:
                if stop.is_set():
                    raise ConnectionAbortedError("send stopped")
                try:
                    sent = os.sendfile(sock_fd, file_fd, offset, min(end - offset, _MAX_CALL))
                except (BlockingIOError, InterruptedError):
                    sent = None
                if sent == 0:
                    raise ShortFile(f"{path} ended at {offset} of {end} bytes")
                if sent:
                    offset += sent
                    last_progress = time.monotonic()
                    continue
                if not poller.poll(_POLL_MS) and time.monotonic() - last_progress > idle_timeout:
                    raise TimeoutError("peer took no data")
            return count == 0 or os.pread(file_fd, 1, end - 1) == b"\n"
    finally:
        os.close(sock_fd)
