# The spool's path for big messages: their bytes start going to disk while they stream (so that
# the fsync the client waits for at the end has only the tail left), and they are stored intact.
import asyncio
import hashlib
import os

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
