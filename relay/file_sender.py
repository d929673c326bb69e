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
#
# Verified sending: given the CRC-32 recorded at ingest, the worker reads the range into a buffer,
# adds it to the CRC and sends that same buffer (no sendfile: the bytes checked are the bytes sent),
# and raises ChecksumMismatch after the last byte if they differ, so that the caller never sends the
# end of the reply (POP3 ".", the end of an IMAP FETCH) for a mail changed on disk.
import asyncio
import os
import select
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_MAX_CALL = 0x7FFFF000  # Linux sends at most this much per sendfile() call
_POLL_MS = 250  # how often a waiting worker looks at its stop flag
CHECKED_CHUNK = 256 * 1024  # bytes read, checked and sent at a time when verifying (cache-sized)


class ShortFile(OSError):
    """The file ended before the requested count (a truncated blob)."""


class ChecksumMismatch(Exception):
    """The bytes of a mail, read while sending it, do not have the CRC-32 recorded at ingest."""

    reason = "checksum (CRC-32) differs from the one recorded at ingest (found while sending it)"


class RunningCrc:
    """The CRC-32 of the bytes of a mail sent through the copying path (TLS, dot-stuffing), chunk by
    chunk, checked at the end against the one recorded at ingest (None: not recorded, no check)."""

    def __init__(self, expected: int | None):
        self.expected = expected
        self.value = 0

    def add(self, chunk: bytes) -> None:
        if self.expected is not None:
            self.value = zlib.crc32(chunk, self.value)

    def check(self) -> None:
        if self.expected is not None and self.value != self.expected:
            raise ChecksumMismatch(ChecksumMismatch.reason)


class FileSender:
    def __init__(self, max_threads: int):
        self._pool = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="mailhub-sendfile")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def usable(transport: asyncio.BaseTransport) -> bool:
        """True for a plain (non-TLS) socket transport."""
        sock = transport.get_extra_info("socket")
        return transport.get_extra_info("ssl_object") is None and sock is not None and sock.fileno() >= 0

    async def read(self, path: Path, offset: int, size: int) -> bytes:
        """Read part of a file in a worker thread (for the paths that must copy: TLS, dot-stuffing)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, _pread, path, offset, size)

    async def send(
        self,
        transport: asyncio.BaseTransport,
        path: Path,
        offset: int,
        count: int,
        stop: threading.Event,
        idle_timeout: float,
        crc32: int | None = None,
    ) -> bool:
        """Send count bytes of the file from offset; return True when the file's last byte sent is LF
        (or nothing was sent).  Raises OSError (ShortFile, connection errors), TimeoutError when
        the peer takes nothing for idle_timeout seconds, or ConnectionAbortedError once stop is set.
        With `crc32` (of the whole range) the bytes are checked as they go (no sendfile) and
        ChecksumMismatch is raised after the last one if they differ.
        If the caller is cancelled it must set stop; the worker then ends within _POLL_MS."""
        sock_fd = os.dup(transport.get_extra_info("socket").fileno())
        worker = _send if crc32 is None else _send_checked
        args = () if crc32 is None else (crc32,)
        try:
            job = asyncio.get_running_loop().run_in_executor(
                self._pool, worker, sock_fd, path, offset, count, stop, idle_timeout, *args
            )
        except BaseException:
            os.close(sock_fd)
            raise
        return await job


def _pread(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), size, offset)


def _send(sock_fd: int, path: Path, offset: int, count: int, stop: threading.Event, idle_timeout: float) -> bool:
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


def _send_checked(
    sock_fd: int, path: Path, offset: int, count: int, stop: threading.Event, idle_timeout: float, expected_crc: int
) -> bool:
    """Worker side of a verified send: read a chunk, add it to the CRC-32, send that same chunk."""
    try:
        with open(path, "rb") as f:
            file_fd = f.fileno()
            poller = select.poll()
            poller.register(sock_fd, select.POLLOUT)
            buffer = memoryview(bytearray(min(CHECKED_CHUNK, max(count, 1))))
            end = offset + count
            crc = 0
            last = b"\n"
            while offset < end:
                got = os.preadv(file_fd, [buffer[: min(len(buffer), end - offset)]], offset)
                if got == 0:
                    raise ShortFile(f"{path} ended at {offset} of {end} bytes")
                chunk = buffer[:got]
                crc = zlib.crc32(chunk, crc)
                last = bytes(chunk[-1:])
                offset += got
                last_progress = time.monotonic()
                while chunk:
                    if stop.is_set():
                        raise ConnectionAbortedError("send stopped")
                    try:
                        chunk = chunk[os.write(sock_fd, chunk) :]
                        last_progress = time.monotonic()
                        continue
                    except (BlockingIOError, InterruptedError):
                        pass
                    if not poller.poll(_POLL_MS) and time.monotonic() - last_progress > idle_timeout:
                        raise TimeoutError("peer took no data")
            if crc != expected_crc:
                raise ChecksumMismatch(ChecksumMismatch.reason)
            return last == b"\n"
    finally:
        os.close(sock_fd)
