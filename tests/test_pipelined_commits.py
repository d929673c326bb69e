# Pipelined group commits (storage/store.py): a batch's frames are written into the pack while the
# index commits the batch before. What must hold: a record names as its predecessor only a group
# commit that was committed (rebuild-index takes that as proof); a failed commit takes the batch
# written behind it along, a failed write only its own batch; and a hub killed with one batch
# written behind a commit under way restarts (start-up recovery allows two uncommitted group
# commits), loses no acknowledged mail, and a rebuild-index on that crash puts back no mail whose
# sender got no 250. Real Storage and PackWriter, a real hub process for the kill.
import asyncio
import contextlib
import errno
import hashlib
import os
import re
import smtplib
import threading
import time
import zlib

import pytest
from test_storage_faults import arm_fault, no_trace, stored_by_message_id

from storage import db, envelope, ledger, recovery
from storage.errors import CommitUnknown, StorageError, StorageFull
from storage.index_writer import BatchItem
from storage.packs import PackWriter
from storage.store import MessageMeta, Storage

from conftest import PASSWORD, make_message, until, wait_for, writer_children

MID_RE = re.compile(rb"^Message-ID: <([^>]+)>", re.M | re.I)


def pack_records(blob_dir) -> list[dict]:
    """The envelope records of every frame in every pack under blob_dir."""
    records = []
    for path in sorted(p for p in blob_dir.rglob("*") if p.is_file()):
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if not envelope.is_pack(fd):
                continue
            records += [found.record for found in envelope.frames(fd, 0, size) if found.record]
        finally:
            os.close(fd)
    return records


def test_batches_are_written_behind_a_commit_and_name_only_committed_predecessors(tmp_path):
    mails = {f"m{n}": f"Subject: pipelined {n}\r\n\r\n{'x' * (3000 + n)}\r\n".encode() for n in range(400)}

    async def play() -> dict[str, str]:
        storage = Storage(tmp_path)
        await storage.open()
        real_call = storage._writer.call
        first_commit, first_held = asyncio.Event(), asyncio.Event()

        async def call(method, *args):
            # The first commit waits (a while at most) until the next batch is written behind it,
            # and the other mails only start coming once it has begun: on a loaded machine they
            # could otherwise come in so few big batches that none is written while another
            # commits (5 group commits for 400 mails, seen in CI). The trash task starts after it.
            if method.__name__ == "commit_batch" and args[0] and not first_commit.is_set():
                first_commit.set()
                await until(  # not raising: "a while at most"
                    lambda: storage._packs.uncommitted >= 2, timeout=10, interval=0.001, raise_on_timeout=False
                )
                first_held.set()
            return await real_call(method, *args)

        storage._writer.call = call
        try:
            stored: dict[str, str] = {}

            async def one(n: int) -> None:
                if n:
                    await first_commit.wait()
                await asyncio.sleep(n * 0.0005)  # arriving one by one, as mail does: some during each commit
                name = f"m{n}"
                spool = storage.new_spool()
                spool.write(mails[name])
                await storage.commit(spool, MessageMeta("alpha@hub.test", None, False), [], remote=["x@remote.test"])
                stored[spool.queue_id] = name

            async def empty_trash_meanwhile() -> int:  # it takes the batch lock between pipeline runs
                await first_held.wait()
                runs = 0
                while len(stored) < len(mails):
                    await storage.empty_trash()
                    runs += 1
                    await asyncio.sleep(0.005)  # pacing: a run of the trash task now and then
                return runs

            emptied, *_ = await asyncio.gather(empty_trash_meanwhile(), *(one(n) for n in range(len(mails))))
            assert emptied > 1
            return stored
        finally:
            await storage.close()

    stored = asyncio.run(play())
    with contextlib.closing(db.connect(tmp_path)) as conn:
        rows = conn.execute("SELECT queue_id, blob, blob_offset, size FROM messages").fetchall()
    assert len(rows) == len(mails) == len(stored)
    for qid, blob, offset, size in rows:
        with open(tmp_path / "blobs" / blob, "rb") as f:
            assert os.pread(f.fileno(), size, offset) == mails[stored[qid]]
    committed = ledger.read(tmp_path).commits  # seq -> attempt of every group commit
    records = pack_records(tmp_path / "blobs")
    assert len(records) == len(mails)
    predecessors = {tuple(r["p"]) for r in records}
    assert all(committed.get(seq) == attempt for seq, attempt in predecessors if seq), predecessors - set(
        committed.items()
    )
    behind = {r["seq"] for r in records if r["seq"] - r["p"][0] == 2}  # its predecessor's commit was under way
    print(f"\n{len(committed)} group commits, {len(behind)} of them written behind the commit before")
    assert behind, "no batch was written while the one before was committing"
    assert all(r["seq"] - r["p"][0] in (1, 2) for r in records)


def _item(tmp_path, name: str, data: bytes) -> BatchItem:
    return BatchItem(
        name,
        len(data),
        time.time(),
        MessageMeta("alpha@hub.test", None, False),
        [],
        [],
        None,
        f"0000000000/{name}",
        data=[data],
        spool_path=str(tmp_path / "spool" / f"{name}.tmp"),
        packed=True,
    )


def _record(item: BatchItem) -> bytes:
    return envelope.record(item.queue_id, item.size, item.received_at, item.sha256 or "", item.meta, [], [], "{}")


def test_a_failed_commit_takes_the_batch_written_behind_it_and_a_failed_write_only_its_own(tmp_path):
    (tmp_path / "spool").mkdir()
    (tmp_path / "blobs" / "0000000000").mkdir(parents=True)
    packs = PackWriter(str(tmp_path / "blobs"))
    first = [_item(tmp_path, "A" * 19, b"first batch\r\n" * 10)]
    ends = packs.write(first, _record)
    pack = tmp_path / "blobs" / first[0].blob
    committed_end = ends[first[0].blob]
    packs.committed()  # batch one is committed
    second = [_item(tmp_path, "B" * 19, b"second batch\r\n" * 10)]
    third = [_item(tmp_path, "C" * 19, b"third batch\r\n" * 10)]
    packs.write(second, _record)  # under way in the index
    packs.write(third, _record)  # written behind it
    assert pack.stat().st_size > committed_end and packs.uncommitted == 2
    packs.abandon()  # the second batch's commit failed: the third goes with it
    assert pack.stat().st_size == committed_end and packs.uncommitted == 0

    fourth = [_item(tmp_path, "D" * 19, b"fourth batch\r\n" * 10)]
    ends = packs.write(fourth, _record)  # a new pack (the failed one's was closed)
    fourth_pack = tmp_path / "blobs" / fourth[0].blob
    fourth_end = ends[fourth[0].blob]

    def failing(item: BatchItem) -> bytes:
        raise OSError(errno.EIO, "injected")

    with pytest.raises(Exception, match="injected|I/O"):
        packs.write([_item(tmp_path, "E" * 19, b"fifth\r\n")], failing)  # written behind the fourth: fails
    assert fourth_pack.stat().st_size == fourth_end and packs.uncommitted == 1  # the fourth stays, uncommitted
    sixth = [_item(tmp_path, "F" * 19, b"sixth\r\n" * 10)]
    packs.write(sixth, _record)  # behind it again (in a new pack: a failed write closes the open one)
    sixth_pack = tmp_path / "blobs" / sixth[0].blob
    assert sixth_pack.exists() and packs.uncommitted == 2
    packs.abandon_newest()  # it failed before its commit was asked for
    assert not sixth_pack.exists() and fourth_pack.stat().st_size == fourth_end and packs.uncommitted == 1
    packs.committed()
    assert packs.uncommitted == 0 and fourth_pack.stat().st_size == fourth_end
    packs.close()


@pytest.mark.parametrize("ahead", [2, 3])
def test_recovery_takes_two_uncommitted_group_commits_past_the_index_and_no_more(tmp_path, ahead):
    """A crash with a batch under way in the index and one written behind it leaves frames of the
    two group commits after the index's last: moved aside, and the hub starts. Frames of a third
    one mean the index lost commits (restored from a backup, a lost WAL): the start stops."""

    async def store() -> None:
        storage = Storage(tmp_path)
        await storage.open()
        try:
            for n in range(3):
                spool = storage.new_spool()
                spool.write(f"Subject: committed {n}\r\n\r\nkept\r\n".encode())
                await storage.commit(spool, MessageMeta("alpha@hub.test", None, False), [], remote=["x@remote.test"])
        finally:
            await storage.close()

    asyncio.run(store())
    with contextlib.closing(db.connect(tmp_path)) as conn:
        seq, attempt = ledger.last_commit(conn)
        ((blob, end),) = conn.execute("SELECT blob, committed_end FROM packs").fetchall()
    pack = tmp_path / "blobs" / blob
    assert pack.stat().st_size == end
    with open(pack, "ab") as f:
        for k in range(1, ahead + 1):
            data = f"Subject: never acknowledged {k}\r\n\r\nlost with its batch\r\n".encode()
            meta = MessageMeta("alpha@hub.test", None, False)
            record = envelope.record(
                f"{k:019X}",
                len(data),
                time.time(),
                hashlib.sha256(data).hexdigest(),
                meta,
                [],
                ["x@remote.test"],
                envelope.structure_json(meta),
                seq=seq + k,
                a=k,
                p=[seq, attempt],  # the last commit known committed when each was written
                crc=zlib.crc32(data),
            )
            f.write(envelope.frame_header(record, len(data)) + record + data)
    with contextlib.closing(db.connect(tmp_path)) as conn:
        if ahead == 3:
            with pytest.raises(recovery.IndexBehind, match=f"group commit {seq + 3}"):
                recovery.recover(conn, tmp_path)
            return
        report = recovery.recover(conn, tmp_path)
    assert pack.stat().st_size == end, "the uncommitted frames were not cut off"
    assert any("uncommitted" in line for line in report.quarantined), report.quarantined


def run_senders(sender, count: int = 8) -> None:
    """sender(n) for n in range(count), each in a thread of its own, all at once; waits for them."""
    threads = [threading.Thread(target=sender, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)


def test_a_batch_failing_behind_a_commit_gets_451_and_leaves_no_trace_while_the_commit_holds(
    make_hub, monkeypatch, tmp_path
):
    """EIO right after a batch was written behind a commit under way: that batch is cut off the pack
    and its senders get 451 (they send again), the commit under way stands."""
    armed = tmp_path / "fault-armed"
    hub = arm_fault(make_hub, monkeypatch, armed, "hub:written_behind_a_commit:eio")
    hub.start()
    armed.write_text("once")
    acknowledged: dict[str, str] = {}
    refused = 0
    lock = threading.Lock()

    def sender(n: int) -> None:
        nonlocal refused
        client = smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30)
        client.login("alpha", PASSWORD)
        for i in range(25):
            message = make_message(4000 + 37 * n + i, subject=f"behind {n}.{i}")
            for _attempt in range(3):
                try:
                    client.sendmail("alpha@hub.test", ["beta@hub.test"], message)
                except smtplib.SMTPDataError as exc:
                    assert exc.smtp_code == 451, exc
                    with lock:
                        refused += 1
                    continue
                with lock:
                    acknowledged[MID_RE.search(message).group(1).decode()] = hashlib.sha256(message).hexdigest()
                break
        client.quit()

    run_senders(sender)
    assert not armed.exists(), "no batch was written behind a commit: the fault never fired"
    assert refused >= 1 and len(acknowledged) == 8 * 25
    assert not no_trace(hub)
    assert hub.stop() == 0
    hub.in_process_from_now_on().start()  # start-up recovery finds nothing to undo
    copies = stored_by_message_id(hub)
    print(f"\nacknowledged {len(acknowledged)}, refused with 451 {refused}, stored {sum(map(len, copies.values()))}")
    assert {mid: [digest] for mid, digest in acknowledged.items()} == copies
    assert hub.stop() == 0


def test_a_hub_killed_with_a_batch_written_behind_a_commit_loses_nothing_and_restores_nothing_unacknowledged(
    make_hub, monkeypatch, tmp_path
):
    armed = tmp_path / "fault-armed"
    hub = arm_fault(make_hub, monkeypatch, armed, "hub:written_behind_a_commit:kill")
    hub.start()
    armed.write_text("once")
    acknowledged: dict[str, str] = {}  # Message-ID -> SHA-256 of the mail sent
    unanswered: dict[str, bytes] = {}  # sent, connection lost before the reply
    lock = threading.Lock()

    def sender(n: int) -> None:
        for i in range(200):
            message = make_message(4000 + 37 * n + i, subject=f"behind {n}.{i}")
            mid = MID_RE.search(message).group(1).decode()
            try:
                client = smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30)
                client.login("alpha", PASSWORD)
                client.sendmail("alpha@hub.test", ["beta@hub.test"], message)
            except (smtplib.SMTPException, OSError):
                with lock:
                    unanswered[mid] = message
                return  # the hub is gone
            with lock:
                acknowledged[mid] = hashlib.sha256(message).hexdigest()
            with contextlib.suppress(smtplib.SMTPException, OSError):
                client.quit()

    run_senders(sender)
    assert not armed.exists(), "no batch was written behind a commit: the fault never fired"
    wait_for(lambda: hub.proc.poll() is not None, 10, message="the hub killed itself")
    wait_for(lambda: not writer_children(hub.data_dir), 10, message="its index writer ended")
    hub.stop()
    monkeypatch.delenv("MAILHUB_FAULT", raising=False)
    committed = {q for (q,) in hub.query("SELECT queue_id FROM messages")}
    # the frames past the index: the batch under way (if its commit did not make it) and the one behind
    assert any(r["seq"] - r["p"][0] == 2 for r in pack_records(hub.data_dir / "blobs"))

    hub.cli("storage", "rebuild-index")
    restored = {q for (q,) in hub.query("SELECT queue_id FROM messages")} - committed
    assert restored == set(), f"rebuild-index put back mail no sender had a 250 for: {restored}"

    hub.in_process_from_now_on().start()  # start-up recovery accepts the two uncommitted commits
    retried = 0
    for mid, message in unanswered.items():  # as SMTP clients do: the mail again
        client = smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30)
        client.login("alpha", PASSWORD)
        client.sendmail("alpha@hub.test", ["beta@hub.test"], message)
        client.quit()
        acknowledged[mid] = hashlib.sha256(message).hexdigest()
        retried += 1
    copies = stored_by_message_id(hub)
    lost = [mid for mid in acknowledged if mid not in copies]
    damaged = [mid for mid, digest in acknowledged.items() if any(d != digest for d in copies.get(mid, ()))]
    duplicated = [mid for mid in acknowledged if len(copies.get(mid, ())) > 1 and mid not in unanswered]
    in_doubt = sum(len(copies.get(mid, ())) - 1 for mid in unanswered)
    print(
        f"\nacknowledged {len(acknowledged)} (retried after the kill {retried}), stored"
        f" {sum(map(len, copies.values()))}, lost {len(lost)}, duplicated {len(duplicated)}, damaged {len(damaged)},"
        f" extra copies of mails whose connection was lost {in_doubt}, restored by rebuild-index unacknowledged 0"
    )
    assert lost == [] and duplicated == [] and damaged == []
    assert in_doubt <= len(unanswered)
    assert not no_trace(hub)
    assert hub.stop() == 0


def test_a_listener_that_raises_neither_strands_the_batch_behind_nor_puts_the_pack_writer_out_of_step(tmp_path):
    """A mailbox listener raising after a group commit (a bug elsewhere) must not end the pipeline:
    every sender gets an answer, the pack writer's uncommitted batches stay those of the pipeline,
    and a later failed commit cuts back only its own frames, never those of acknowledged mail."""
    mails = {n: f"Subject: listener {n}\r\n\r\n{'y' * (2000 + n)}\r\n".encode() for n in range(240)}

    class Raising:
        def __init__(self) -> None:
            self.calls = 0

        def committed(self, *_args: object) -> None:
            self.calls += 1
            if self.calls in (40, 41, 90):  # mid-stream: batches are being written behind commits
                raise RuntimeError("a listener's bug")

        def fetched_committed(self, *_args: object) -> None:
            pass

        def removed(self, *_args: object) -> None:
            pass

    async def play() -> tuple[dict[str, int], int, list[int], int]:
        storage = Storage(tmp_path)
        await storage.open()
        storage.add_listener(Raising())
        real_call = storage._writer.call
        fail_commit = {"at": 0}

        async def call(method, *args):  # a commit that fails (the index full, say) once armed
            if method.__name__ == "commit_batch" and args[0] and fail_commit["at"] == 1:
                fail_commit["at"] = 2
                raise StorageError("injected: the index commit failed")
            return await real_call(method, *args)

        storage._writer.call = call
        stored: dict[str, int] = {}
        stranded: list[int] = []
        refused = 0
        try:

            async def one(n: int) -> None:
                nonlocal refused
                await asyncio.sleep(n * 0.0005)  # pacing: arriving one by one, as mail does
                if n == 160:
                    fail_commit["at"] = 1
                spool = storage.new_spool()
                spool.write(mails[n])
                try:
                    await asyncio.wait_for(
                        asyncio.shield(
                            storage.commit(
                                spool, MessageMeta("alpha@hub.test", None, False), [], remote=["x@remote.test"]
                            )
                        ),
                        15,
                    )
                except TimeoutError:
                    stranded.append(n)
                    return
                except StorageError:
                    refused += 1
                    return
                stored[spool.queue_id] = n

            await asyncio.gather(*(one(n) for n in mails))
            return stored, refused, stranded, storage._packs.uncommitted
        finally:
            await storage.close()

    stored, refused, stranded, uncommitted = asyncio.run(play())
    assert stranded == [], f"{len(stranded)} sender(s) never got an answer"
    assert uncommitted == 0, "the pack writer holds batches the pipeline does not"
    assert refused >= 1 and len(stored) + refused == len(mails), "the injected commit failure never fired"
    with contextlib.closing(db.connect(tmp_path)) as conn:
        rows = conn.execute("SELECT queue_id, blob, blob_offset, size FROM messages").fetchall()
    found = {qid: (blob, offset, size) for qid, blob, offset, size in rows}
    for qid, n in stored.items():  # every acknowledged mail is there, byte-exact
        assert qid in found, f"acknowledged mail {n} has no index row"
        blob, offset, size = found[qid]
        with open(tmp_path / "blobs" / blob, "rb") as f:
            assert os.pread(f.fileno(), size, offset) == mails[n], f"acknowledged mail {n} was cut off its pack"


def fail_a_commit_with_a_batch_behind(
    tmp_path, mails: dict[int, bytes], failure: StorageError
) -> tuple[set[str], dict[str, int], list[StorageError]]:
    """Commit `mails` to a real Storage whose writer raises `failure` for the first commit after 30
    were stored, and only once the next batch is written behind it: the first 30 come one by one,
    then one more, whose commit is the one that fails, and the rest only once that commit has begun
    (on a loaded machine they could otherwise all come in that one batch, and none behind it).
    Returns the queue IDs of that commit, the stored mails (queue ID -> n) and the refusals."""

    async def play() -> tuple[set[str], dict[str, int], list[StorageError]]:
        storage = Storage(tmp_path)
        await storage.open()
        real_call = storage._writer.call
        failed: set[str] = set()
        failing = asyncio.Event()

        async def call(method, *args):
            if method.__name__ == "commit_batch" and args[0] and not failed and len(stored) >= 30:
                failing.set()
                await until(  # the next batch is written behind this commit (asserted just below)
                    lambda: storage._packs.uncommitted >= 2, timeout=20, interval=0.001, raise_on_timeout=False
                )
                assert storage._packs.uncommitted == 2, "no batch was written behind the commit"
                failed.update(item.queue_id for item in args[0])
                raise failure
            return await real_call(method, *args)

        storage._writer.call = call
        stored: dict[str, int] = {}
        refusals: list[StorageError] = []
        try:

            async def one(n: int) -> None:
                await asyncio.sleep(n * 0.0005)  # pacing: arriving one by one, as mail does
                if n > 30:
                    await failing.wait()
                spool = storage.new_spool()
                spool.write(mails[n])
                try:
                    await storage.commit(
                        spool, MessageMeta("alpha@hub.test", None, False), [], remote=["x@remote.test"]
                    )
                except StorageError as exc:
                    refusals.append(exc)
                    return
                stored[spool.queue_id] = n

            await asyncio.gather(*(one(n) for n in range(30)))
            await asyncio.gather(*(one(n) for n in mails if n >= 30))
            return failed, stored, refusals
        finally:
            await storage.close()

    return asyncio.run(play())


def test_a_commit_of_unknown_outcome_keeps_its_frames_but_the_batch_behind_it_leaves_no_trace(tmp_path):
    """CommitUnknown (PostgreSQL lost the answer to COMMIT) for a batch with another written behind
    it: the unknown one's frames stay (start-up recovery decides), the one behind was never sent to
    the index, its senders get 451: none of its frames, nor a pack it began, may stay."""
    mails = {n: f"Subject: unknown {n}\r\n\r\n{'z' * (2500 + n)}\r\n".encode() for n in range(120)}
    unknown, stored, refusals = fail_a_commit_with_a_batch_behind(
        tmp_path, mails, CommitUnknown("injected: the answer to COMMIT was lost")
    )
    assert unknown and len(refusals) > len(unknown)  # the batch behind was refused too
    with contextlib.closing(db.connect(tmp_path)) as conn:
        committed = {qid for (qid,) in conn.execute("SELECT queue_id FROM messages")}
    assert set(stored) == committed
    left = {r["q"] for r in pack_records(tmp_path / "blobs")} - committed - unknown
    assert left == set(), f"frames of {len(left)} mail(s) refused with 451, never sent to the index, stayed"


def test_a_full_index_refuses_the_batch_written_behind_its_commit_as_full_too(tmp_path):
    """The index ran out of room (SQLITE_FULL) on a commit with another batch written behind it:
    that batch is failed without reaching the index, and its senders must hear the same 452 4.3.1
    as the first batch's, not a 451 that hides the full disk from them and from the operator."""
    mails = {n: f"Subject: full {n}\r\n\r\n{'f' * (2500 + n)}\r\n".encode() for n in range(120)}
    full, stored, refusals = fail_a_commit_with_a_batch_behind(
        tmp_path, mails, StorageFull("index: database or disk is full (injected)")
    )
    assert full and len(refusals) > len(full), "the batch behind the full commit was not refused"
    replies = {exc.reply for exc in refusals}
    assert replies == {"452 4.3.1 Insufficient system storage"}, replies
    assert len(stored) + len(refusals) == len(mails)
