# The index writer process (storage/writer_process.py): a request it cannot run fails for its
# caller only; a writer that died is replaced, and the batch it had is refused (never acknowledged);
# the writer ends with the hub, on SIGTERM to the whole process group as on SIGKILL of the hub.
import asyncio
import contextlib
import hashlib
import os
import pickle
import signal
from pathlib import Path

import pytest

from storage import StorageError, outbound, writer_launcher
from storage.index_writer import BatchItem, IndexWriter
from storage.records import Delivery
from storage.store import MessageMeta, Storage
from storage.writer_child import encode_request, out_of_band
from storage.writer_launcher import LAUNCHER

from conftest import ALPHA_BETA_B2, make_message, stored_message, until, wait_for, writer_children
from pop3util import send


async def store_small(storage: Storage, data: bytes) -> str:
    spool = storage.new_spool()
    spool.write(data)
    await storage.commit(spool, MessageMeta("alpha@hub.test", None, False), [], remote=["x@remote.test"])
    return spool.queue_id


@contextlib.asynccontextmanager
async def opened(folder: Path):
    storage = Storage(folder)
    await storage.open()
    try:
        yield storage
    finally:
        await storage.close()


def only_here(conn) -> None:
    """A function the writer process cannot import (test modules are not on its path)."""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        found += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return found


def descendants(pid: int) -> list[int]:
    return [grandchild for child in children(pid) for grandchild in [child, *descendants(child)]]


def is_writer(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "mailhub-writer" and alive(pid)
    except FileNotFoundError:
        return False


def test_requests_that_fail_fail_alone_and_the_writer_keeps_working(tmp_path):
    async def play():
        storage = Storage(tmp_path)
        await storage.open()
        try:
            pid = storage._writer.pid
            with pytest.raises(Exception, match="pickle|lambda"):  # cannot even be sent
                await storage.queue_op(lambda conn: None)
            with pytest.raises(ModuleNotFoundError):  # sent, but the writer cannot load it
                await storage.queue_op(only_here)
            with pytest.raises(TypeError):  # runs in the writer and fails there
                await storage.queue_op(outbound.delete)
            assert await storage.queue_op(outbound.delete, "no-such-message", None) == 0
            await store_small(storage, b"Subject: after\r\n\r\nstill fine\r\n")
            assert storage._writer.pid == pid
        finally:
            await storage.close()
        wait_for(lambda: not alive(pid), message="the writer process gone with the storage")

    asyncio.run(play())


def test_a_relative_data_folder_is_the_same_folder_for_the_writer(tmp_path, monkeypatch):
    # the working folder also holds a `storage` package of its own (another checkout, say): the
    # writer must run the hub's code, not import that
    (tmp_path / "storage").mkdir()
    (tmp_path / "storage" / "__init__.py").write_text("raise ImportError('the working folder was imported')\n")
    monkeypatch.chdir(tmp_path)

    async def play():
        storage = Storage(Path("data"))
        await storage.open()
        try:
            return await store_small(storage, b"Subject: here\r\n\r\nin this folder\r\n")
        finally:
            await storage.close()

    qid = asyncio.run(play())
    assert stored_message(tmp_path / "data", qid).endswith(b"in this folder\r\n")


def test_a_batch_whose_writer_dies_is_refused_and_the_next_one_gets_a_new_writer(tmp_path, caplog):
    async def play():
        storage = Storage(tmp_path)
        await storage.open()
        try:
            first = storage._writer.pid
            os.kill(first, signal.SIGSTOP)
            commit = asyncio.create_task(store_small(storage, b"Subject: lost\r\n\r\nnot acknowledged\r\n"))
            await asyncio.sleep(0.3)  # a negative window: no acknowledgement while the writer is stopped
            assert not commit.done()
            os.kill(first, signal.SIGKILL)
            with pytest.raises(StorageError):
                await commit
            kept, _fresh = await asyncio.gather(  # both notice the dead writer: one new one
                store_small(storage, b"Subject: kept\r\n\r\nacknowledged\r\n"),
                storage.queue_op(outbound.delete, "no-such-message", None),
            )
            assert storage._writer.pid not in (None, first) and not alive(first)
            assert [pid for pid in descendants(os.getpid()) if is_writer(pid)] == [storage._writer.pid]
            assert [row[0] for row in await storage._index.fetchall("SELECT queue_id FROM messages")] == [kept]
        finally:
            await storage.close()

    asyncio.run(play())
    assert "index writer process ended" in caplog.text


def test_the_writer_ends_with_the_hub_and_ignores_signals_meant_for_the_process_group(make_hub):
    hub = make_hub(sites=ALPHA_BETA_B2, process=True).start()
    [launcher] = children(hub.proc.pid)
    [writer] = [pid for pid in descendants(hub.proc.pid) if is_writer(pid)]
    hub.kill()
    wait_for(lambda: not alive(writer) and not alive(launcher), message="writer and launcher gone with the killed hub")

    hub.start()
    [launcher] = children(hub.proc.pid)
    [writer] = [pid for pid in descendants(hub.proc.pid) if is_writer(pid)]
    for pid in (launcher, writer):
        os.kill(pid, signal.SIGINT)  # Ctrl-C in a terminal, or a stop signal to the whole group:
        os.kill(pid, signal.SIGTERM)  # the hub's graceful shutdown still needs its writer
    message = make_message(3000)
    qid = send(hub, ["beta@hub.test"], message)
    assert alive(writer) and alive(launcher)
    assert hub.stop() == 0
    wait_for(lambda: not alive(writer) and not alive(launcher), message="writer and launcher gone with the stopped hub")
    assert hub.stored(qid).endswith(message)


def test_writers_are_forked_by_one_launcher_and_die_with_it(tmp_path, caplog):
    """Each writer of this process is a child of its one launcher (no new interpreter per start);
    a launcher that died takes its writer along, and the next request starts both again."""

    async def play():
        first, second = Storage(tmp_path / "one"), Storage(tmp_path / "two")
        await first.open()
        await second.open()
        try:
            launcher = LAUNCHER._current.proc.pid
            assert sorted(children(launcher)) == sorted([first._writer.pid, second._writer.pid])
            os.kill(launcher, signal.SIGKILL)
            await until(lambda: not alive(first._writer.pid), message="the writer gone with its launcher")
            qid = await store_small(first, b"Subject: after\r\n\r\nthe launcher died\r\n")
            assert LAUNCHER._current.proc.pid != launcher
            assert children(LAUNCHER._current.proc.pid) == [first._writer.pid]
            return qid
        finally:
            await first.close()
            await second.close()

    qid = asyncio.run(play())
    assert stored_message(tmp_path / "one", qid).endswith(b"the launcher died\r\n")
    assert "index writer process ended (status None)" in caplog.text


def test_mails_in_flight_when_the_launcher_is_killed_are_acknowledged_only_if_kept(tmp_path, caplog):
    """kill -9 of the launcher (its writer dies with it) while 20 mails wait for their commit, after
    20 were committed: each mail acknowledged is stored whole, none twice; the others got an error
    (their senders send them again)."""
    bodies = {n: b"Subject: %d\r\n\r\nmail %d\r\n" % (n, n) for n in range(40)}

    async def play():
        async with opened(tmp_path) as storage:
            launcher = LAUNCHER._current.proc.pid
            results = await asyncio.gather(*(store_small(storage, bodies[n]) for n in range(20)))
            os.kill(storage._writer.pid, signal.SIGSTOP)  # the next ones wait in its socket: in flight
            sending = [asyncio.create_task(store_small(storage, bodies[n])) for n in range(20, 40)]
            await until(lambda: storage._writer._waiting, message="a commit request in the stopped writer's socket")
            os.kill(launcher, signal.SIGKILL)  # the writer dies with it (a stopped one too)
            results += await asyncio.gather(*sending, return_exceptions=True)
            rows = await storage._index.fetchall("SELECT queue_id FROM messages")
            return results, [row[0] for row in rows]

    results, stored = asyncio.run(play())
    acknowledged = {n: qid for n, qid in zip(bodies, results) if isinstance(qid, str)}
    refused = [result for result in results if not isinstance(result, str)]
    lost = [n for n, qid in acknowledged.items() if qid not in stored or stored_message(tmp_path, qid) != bodies[n]]
    duplicated = len(stored) - len(set(stored))
    print(f"\nacknowledged {len(acknowledged)}, refused {len(refused)}, lost {len(lost)}, duplicated {duplicated}")
    assert "index writer process ended (status None)" in caplog.text  # the fault struck
    assert all(isinstance(result, StorageError) for result in refused), refused
    assert len(acknowledged) >= 20 and lost == [] and duplicated == 0


def test_a_batch_item_crosses_the_wire_whole():
    """What the hub sends the writer per message (pickled by its fields, data out of band)
    arrives with every field and the data bytes as sent."""
    meta = MessageMeta("a@x", 3, True, "<m@x>", "set", 2, 5, "alpha", "127.0.0.1", {"type": "text"})
    item = BatchItem(
        "Q1",
        11,
        1.5,
        meta,
        [Delivery(4, "b@x", "beta")],
        ["c@y"],
        ("k", 7),
        "2026112815/Q1",
        None,
        out_of_band([b"hello", b" world"]),
        "/spool/Q1.tmp",
    )
    head, data, *raw = encode_request(IndexWriter.commit_batch, ([item], []))
    method, (batch, loose) = pickle.loads(data, buffers=[bytearray(view) for view in raw])
    got = batch[0]
    assert method is IndexWriter.commit_batch and loose == []
    assert [bytes(chunk) for chunk in got.data] == [b"hello", b" world"]
    got.data = item.data = None
    assert got == item


def test_a_commit_cancelled_while_the_writer_runs_it_keeps_its_blob(tmp_path):
    """Cancelled in the hub (an abnormal end), a group commit may still be committed by the writer:
    the mail's file must then still be there for its index rows (it was never acknowledged)."""
    big = b"Subject: big\r\n\r\n" + b"x" * 3_000_000 + b"\r\n"  # a file of its own, not packed

    async def play():
        storage = Storage(tmp_path)
        await storage.open()
        try:
            os.kill(storage._writer.pid, signal.SIGSTOP)  # the request waits in the socket
            commit = asyncio.create_task(store_small(storage, big))
            # cancelled once its commit request waits in the stopped writer's socket (phase one,
            # the big file's fsyncs, can outlast any fixed wait on a loaded machine: cancelled
            # before the request, the commit never reaches the writer and nothing is committed)
            await until(
                lambda: storage._writer._waiting,
                timeout=30,
                interval=0.01,
                message="the group commit request in the stopped writer's socket",
            )
            assert storage._flusher is not None
            storage._flusher.cancel()
            with pytest.raises((StorageError, asyncio.CancelledError)):
                await commit
            os.kill(storage._writer.pid, signal.SIGCONT)
            await storage.queue_op(outbound.delete, "no-such-message", None)  # after the commit
            return await storage._index.fetchall("SELECT queue_id, blob FROM messages")
        finally:
            await storage.close()

    ((queue_id, blob),) = asyncio.run(play())
    assert (tmp_path / "blobs" / blob).is_file()
    assert stored_message(tmp_path, queue_id) == big


def read_bytes(pid: int) -> int:
    """Bytes the process has read with read(2) and recv(2) so far (its socket from the hub included)."""
    with open(f"/proc/{pid}/io") as f:
        return int(dict(line.split(": ") for line in f.read().splitlines())["rchar"])


def test_message_bytes_never_reach_the_writer_process(tmp_path):
    """Issue 24: the hub hashes and writes small (packed) mails itself; the index writer gets their
    index rows only. Ten 1 MB mails committed together cost the writer far less than one mail's bytes
    in reads, and every mail reads back whole from its pack with the SHA-256 the index holds."""
    mails = [b"Subject: m%d\r\n\r\n" % i + os.urandom(750_000).hex().encode()[:1_000_000] + b"\r\n" for i in range(10)]

    async def play():
        storage = Storage(tmp_path)
        await storage.open()
        try:
            pid = storage._writer.pid
            before = read_bytes(pid)
            qids = await asyncio.gather(*(store_small(storage, mail) for mail in mails))
            read = read_bytes(pid) - before
            found = await storage._index.fetchall("SELECT queue_id, blob, blob_offset, size, sha256 FROM messages")
            rows = {row[0]: row[1:] for row in found}
        finally:
            await storage.close()
        return qids, read, rows

    qids, read, rows = asyncio.run(play())
    assert read < 500_000, f"the writer read {read} bytes for 10 MB of mail"
    for qid, mail in zip(qids, mails):
        blob, offset, size, sha256 = rows[qid]
        assert offset > 0 and size == len(mail)  # a frame in a pack
        with open(tmp_path / "blobs" / blob, "rb") as f:
            data = os.pread(f.fileno(), size, offset)
        assert data == mail and hashlib.sha256(data).hexdigest() == sha256


def test_the_writer_refuses_a_group_commit_out_of_sequence(tmp_path):
    """The hub numbers each group commit (its packed mails' records name it) from the writer's last;
    a number that does not follow it means the hub's idea is stale: refused, nothing committed."""
    writer = IndexWriter(tmp_path, 0)
    try:
        seq, _attempt = writer.last_commit()
        item = BatchItem("Q1", 3, 1.0, MessageMeta("a@x", None, False), [], ["c@y"], None, "2026112815/Q1", "0" * 64)
        with pytest.raises(StorageError, match="out of sequence"):
            writer.commit_batch([item], [], seq + 2, 7)
        assert writer.conn.execute("SELECT count(*) FROM messages").fetchone() == (0,)
        assert writer.commit_batch([item], [], seq + 1, 7) == ["0" * 64]
        assert writer.last_commit() == (seq + 1, 7)
    finally:
        writer.close()


def test_a_writer_the_launcher_cannot_fork_fails_its_start_alone(tmp_path, monkeypatch):
    """fork() failing in the launcher (no memory, no processes left): that start fails with a
    clear error, the launcher goes on, and the next start gets its writer."""
    armed = tmp_path / "armed"
    armed.touch()
    LAUNCHER.stop()  # the next launcher is started with the fault in its environment
    monkeypatch.setenv("MAILHUB_FAULT", "launcher:fork:eio")
    monkeypatch.setenv("MAILHUB_FAULT_FILE", str(armed))

    async def play():
        storage = Storage(tmp_path / "data")
        with pytest.raises(StorageError, match="cannot start an index writer process: .*injected at launcher:fork"):
            await storage.open()
        launcher = LAUNCHER._current.proc.pid
        async with opened(tmp_path / "data") as storage:
            assert children(launcher) == [storage._writer.pid]
            return await store_small(storage, b"Subject: second\r\n\r\nstarted\r\n")

    try:
        qid = asyncio.run(play())
    finally:
        LAUNCHER.stop()  # not one whose environment arms a fault for later tests
    assert not armed.exists()
    assert stored_message(tmp_path / "data", qid).endswith(b"started\r\n")


def test_a_late_reply_goes_to_the_start_that_timed_out_not_to_the_next(tmp_path, monkeypatch):
    """A launcher slower than the reply bound: that start fails; the next one gets its own
    writer (not the one forked for the start that gave up, which ends with its closed socket)."""

    async def play():
        async with opened(tmp_path / "warm"):  # a launcher running
            pass
        launcher = LAUNCHER._current.proc
        monkeypatch.setattr(writer_launcher, "_REPLY_SECONDS", 0.5)
        os.kill(launcher.pid, signal.SIGSTOP)
        try:
            with pytest.raises(StorageError, match="did not answer"):
                await Storage(tmp_path / "gave-up").open()
            monkeypatch.setattr(writer_launcher, "_REPLY_SECONDS", 60.0)
            storage = Storage(tmp_path / "late")
            opening = asyncio.create_task(storage.open())
            await until(lambda: len(LAUNCHER._current.replies) == 2, message="the second request sent")
        finally:
            os.kill(launcher.pid, signal.SIGCONT)
        await opening
        try:
            await until(lambda: writer_children(tmp_path / "late") == [storage._writer.pid], message="its one writer")
            return await store_small(storage, b"Subject: late\r\n\r\nits own writer\r\n")
        finally:
            await storage.close()

    qid = asyncio.run(play())
    assert stored_message(tmp_path / "late", qid).endswith(b"its own writer\r\n")


def test_a_start_cancelled_while_its_writer_is_forked_leaves_no_writer_behind(tmp_path):
    """The hub's start cancelled after its request reached the launcher and before the reply: the
    writer forked all the same ends (its socket to the hub closed) and is waited for before the
    cancel goes on; the next open of the folder has exactly one writer, and it commits."""

    async def play():
        async with opened(tmp_path / "warm"):  # a launcher running
            pass
        launcher = LAUNCHER._current.proc
        os.kill(launcher.pid, signal.SIGSTOP)
        try:
            opening = asyncio.create_task(Storage(tmp_path / "data").open())
            await until(lambda: len(LAUNCHER._current.replies) == 1, message="the request sent")
            opening.cancel()
            # the cancelled start waits for what it asked for: the launcher, stopped, forks nothing
            finished, _ = await asyncio.wait({opening}, timeout=0.5)
            assert not finished, "the cancelled start did not wait for the writer forked for it"
        finally:
            os.kill(launcher.pid, signal.SIGCONT)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(opening, 60)
        assert writer_children(tmp_path / "data") == []  # ended, and waited for
        assert not LAUNCHER._current.replies  # the late reply went to the cancelled start
        async with opened(tmp_path / "data") as storage:
            assert writer_children(tmp_path / "data") == [storage._writer.pid]
            return await store_small(storage, b"Subject: after\r\n\r\nthe one writer\r\n")

    qid = asyncio.run(play())
    assert stored_message(tmp_path / "data", qid).endswith(b"the one writer\r\n")


def test_a_large_environment_reaches_the_writer(tmp_path, monkeypatch):
    """The hub's environment goes to each writer as changes to the launcher's: one of 300 kB
    (more than one control message holds) starts its writer as one of a few bytes does."""
    LAUNCHER.stop()
    for number in range(3):  # (one variable may hold at most 128 kB)
        monkeypatch.setenv(f"MAILHUB_TEST_LARGE_{number}", "x" * 100_000)

    async def play():
        async with opened(tmp_path) as storage:
            environ = Path(f"/proc/{LAUNCHER._current.proc.pid}/environ").read_bytes()
            assert environ.count(b"=" + b"x" * 100_000 + b"\0") == 3
            return await store_small(storage, b"Subject: large\r\n\r\nenvironment\r\n")

    try:
        qid = asyncio.run(play())
    finally:
        LAUNCHER.stop()
    assert stored_message(tmp_path, qid).endswith(b"environment\r\n")


def test_a_child_forked_from_the_hub_leaves_the_hubs_launcher_alone(tmp_path):
    async def play():
        async with opened(tmp_path) as storage:
            launcher = LAUNCHER._current.proc.pid
            child = os.fork()
            if child == 0:
                LAUNCHER.stop()  # what its exit would do (atexit)
                os._exit(0)
            assert os.waitpid(child, 0)[1] == 0
            assert alive(launcher) and alive(storage._writer.pid)
            return await store_small(storage, b"Subject: fork\r\n\r\nstill served\r\n")

    qid = asyncio.run(play())
    assert stored_message(tmp_path, qid).endswith(b"still served\r\n")
