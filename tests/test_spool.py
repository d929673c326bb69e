# The spool's path for big messages: their bytes start going to disk while they stream (so that
# the fsync the client waits for at the end has only the tail left), and they are stored intact.
# A scanner attached to a spool (the SMTP line-length check) sees every byte once, in order, off
# the event loop but for messages of a few KB.
import asyncio
import hashlib
import os
import threading
import zlib

from storage import files, spool
from storage.store import MessageMeta, Storage

from conftest import stored_message

MB = 1024 * 1024


def test_a_big_message_starts_its_writeback_while_it_streams(tmp_path, monkeypatch):
    started = []
    real = spool.start_writeback

    def recording(fd: int, offset: int, length: int) -> None:
        started.append((offset, length))
        real(fd, offset, length)

    monkeypatch.setattr(spool, "start_writeback", recording)
    chunk = os.urandom(MB)
    mail = b"Subject: big\r\n\r\n" + chunk * 20

    async def play() -> str:
        storage = Storage(tmp_path)
        await storage.open()
        try:
            message = storage.new_spool()
            for i in range(0, len(mail), MB):
                message.write(mail[i : i + MB])
                if message.backlogged:
                    await message.room()
            await storage.commit(message, MessageMeta("alpha@hub.test", None, False), [], remote=["x@remote.test"])
            return message.queue_id
        finally:
            await storage.close()

    queue_id = asyncio.run(play())
    assert hashlib.sha256(stored_message(tmp_path, queue_id)).digest() == hashlib.sha256(mail).digest()
    # contiguous ranges from the start, each at least WRITEBACK_AT, all before the final fsync
    assert len(started) >= 2 and started[0][0] == 0
    assert all(length >= spool.WRITEBACK_AT for _offset, length in started)
    assert all(a + n == b for (a, n), (b, _m) in zip(started, started[1:]))
    assert started[-1][0] + started[-1][1] <= len(mail)


def test_start_writeback_is_the_kernel_call_on_linux(tmp_path):
    assert files._sync_file_range is not None
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, b"x" * MB)
        files.start_writeback(fd, 0, MB)
        assert files._sync_file_range(fd, 0, MB, 2) == 0
        assert files._sync_file_range(-1, 0, MB, 2) == -1  # a bad descriptor fails without raising
    finally:
        os.close(fd)


class Recorder:
    """A spool Scanner that keeps what it was fed and whether it ran on the event loop's thread."""

    def __init__(self, stop_after: int | None = None):
        self.fed: list[bytes] = []
        self.on_loop: list[bool] = []
        self.stop_after = stop_after  # finished once this many bytes were fed

    @property
    def finished(self) -> bool:
        return self.stop_after is not None and sum(map(len, self.fed)) >= self.stop_after

    def feed(self, data: bytes) -> None:
        self.fed.append(bytes(data))
        self.on_loop.append(threading.current_thread() is threading.main_thread())


def test_a_scanner_sees_every_byte_after_its_start_off_the_loop_but_for_a_few_kb(tmp_path):
    """scan_with: the bytes written after it, in order, exactly once: a message of a few KB on the
    loop at its end, a bigger one held in memory in the worker thread that hashes it (the commit
    takes that digest), a big one in the write jobs; scanned() between chunks (BDAT) sees all so far."""
    head = b"Received: by hub.test\r\n"

    async def play(size: int, step: int, check_between: bool) -> tuple:
        storage = Storage(tmp_path)
        await storage.open()
        try:
            message = storage.new_spool()
            message.write(head)
            scanner = Recorder()
            message.scan_with(scanner)
            body = os.urandom(size)
            for i in range(0, size, step):
                message.write(body[i : i + step])
                if message.backlogged:
                    await message.room()
                if check_between:
                    await message.scanned()
                    assert b"".join(scanner.fed) == body[: i + step]
            await message.scanned(end=True)
            digest = message.memory_digest
            await storage.commit(message, MessageMeta("alpha@hub.test", None, False), [], remote=["x@remote.test"])
            stored = stored_message(tmp_path, message.queue_id)
            return body, scanner, digest, stored
        finally:
            await storage.close()

    for size, step, check_between, where in (
        (10_000, 4096, False, {True}),  # a few KB: on the loop, hashed with its batch
        (1 * MB, 256 * 1024, False, {False}),  # held in memory: in the thread that hashes it
        (1 * MB, 100_000, True, {False, True}),  # BDAT-like: 100 KB between checks (one check on the loop)
        (6 * MB, 256 * 1024, False, {False}),  # streamed to its file: in the write jobs
    ):
        body, scanner, digest, stored = asyncio.run(play(size, step, check_between))
        assert b"".join(scanner.fed) == body, size
        assert set(scanner.on_loop) == where, (size, step)
        assert stored == head + body
        if size < spool.HASH_IN_THREAD_AT or size > spool.SMALL_MESSAGE:
            assert digest is None
        else:
            assert digest is not None and digest[0] == hashlib.sha256(head + body).hexdigest()
            assert digest[1] == zlib.crc32(head + body)


def test_a_finished_scanner_is_fed_no_more(tmp_path):
    async def play() -> Recorder:
        storage = Storage(tmp_path)
        await storage.open()
        try:
            message = storage.new_spool()
            scanner = Recorder(stop_after=300 * 1024)
            message.scan_with(scanner)
            for _ in range(12):
                message.write(b"x" * 256 * 1024)
                if message.backlogged:
                    await message.room()
            await message.scanned(end=True)
            message.discard()
            return scanner
        finally:
            await storage.close()

    scanner = asyncio.run(play())
    assert sum(map(len, scanner.fed)) == 512 * 1024  # two chunks: the second one finished it
