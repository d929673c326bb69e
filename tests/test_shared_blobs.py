# A shared blob folder for several nodes (storage.blobs, storage/blob_layout.py): each node writes
# only under <root>/<node>/, any node serves any node's mail by the name the index records, start-up
# recovery of one node never touches another's files (committed or in flight), a freed mail of
# another node is removed without touching its open pack, queue IDs of two nodes never collide, an
# unmounted folder is not taken for an empty one, and the default (blobs = "") keeps today's layout.
# Two real Storage instances with their own data folders are the two nodes; they share one SQLite
# index (node B's index.sqlite3 is a link to node A's: SQLite follows it, WAL and locks included),
# with one node at a time making group commits (the index writers number them on their own).
import asyncio
import os
import sqlite3
from pathlib import Path

import pytest

from storage import blob_layout, db, spool
from storage.blob_layout import SharedBlobsUnavailable
from storage.errors import StorageError
from storage.records import Delivery, MessageMeta
from storage.sites import add_site
from storage.store import Storage

from conftest import make_message, wait_for
from pop3util import released

BIG = 2_500_000  # streamed to a file of its own (over spool.SMALL_MESSAGE)


def make_cluster(tmp_path: Path) -> tuple[Path, Path, Path, int]:
    """(shared root, node A's data folder, node B's, the site's id): one index, B's linked to A's."""
    root, a, b = tmp_path / "shared", tmp_path / "a", tmp_path / "b"
    root.mkdir()
    b.mkdir()
    conn = db.connect(a)
    try:
        site = add_site(conn, "beta", ["beta@hub.test"], "secret-password-1", ["hub.test"])
    finally:
        conn.close()
    os.symlink(a / db.INDEX_NAME, b / db.INDEX_NAME)
    return root, a, b, site.id


def node(data_dir: Path, root: Path | None, name: str, release_freed_after: float = 0) -> Storage:
    return Storage(data_dir, release_freed_after=release_freed_after, blobs=root, node=name)


async def store(storage: Storage, site_id: int, data: bytes) -> str:
    spool_file = storage.new_spool()
    for start in range(0, len(data), 256 * 1024):
        spool_file.write(data[start : start + 256 * 1024])
    await storage.commit(spool_file, MessageMeta("alpha@hub.test", None, False), [Delivery(site_id, "beta@hub.test")])
    return spool_file.queue_id


def row(data_dir: Path, queue_id: str) -> tuple[str, int, int]:
    conn = sqlite3.connect(data_dir / db.INDEX_NAME)
    try:
        found = conn.execute("SELECT blob, blob_offset, size FROM messages WHERE queue_id = ?", (queue_id,)).fetchone()
    finally:
        conn.close()
    assert found is not None, queue_id
    return found


def read(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), size, offset)


def test_two_nodes_write_under_their_own_folders_and_serve_each_others_mail(tmp_path):
    root, a, b, site = make_cluster(tmp_path)
    small_b, big_b, small_a = make_message(3000, "b small"), make_message(BIG, "b big"), make_message(2000, "a small")

    async def play():
        node_b = node(b, root, "bravo")
        await node_b.open()
        node_a = node(a, root, "alpha")
        try:
            qids = {small_b: await store(node_b, site, small_b), big_b: await store(node_b, site, big_b)}
            await node_a.open()
            qids[small_a] = await store(node_a, site, small_a)
            entries = await node_a.mailbox(site)  # what node A's POP3/IMAP serve
            served = {e.queue_id: (node_a.serving_problem(e), read(e.path, e.offset, e.size)) for e in entries}
            return qids, served, node_a.layout.number, node_b.layout.number
        finally:
            await node_a.close()
            await node_b.close()

    qids, served, number_a, number_b = asyncio.run(play())
    assert {number_a, number_b} == {1, 2}
    for mail, qid in qids.items():
        assert served[qid] == (None, mail)
        blob, _offset, _size = row(a, qid)
        owner, number = ("alpha", number_a) if mail is small_a else ("bravo", number_b)
        assert blob.startswith(f"{owner}/") and (root / blob).is_file()
        assert qid[13:15] == f"{number:02X}"  # the node's number in its queue IDs
    assert os.readlink(a / "blobs") == str(root) and os.readlink(b / "spool") == str(root / "bravo" / "spool")
    assert os.readlink(a / "ledger") == str(root / "alpha" / "ledger")
    assert sorted(os.listdir(root)) == [blob_layout.MARKER, "alpha", "bravo"]
    assert any((root / "bravo" / "ledger").iterdir())  # B's ledger lines are in its folder


def test_recovery_of_one_node_leaves_the_other_nodes_files_alone(tmp_path):
    """Node B is serving: its open pack holds a batch in flight past its committed end, a blob it
    renamed into place is not committed yet, a mail is still in its spool. Node A starts (and its
    recovery runs): none of those is touched, while A's own uncommitted blob is quarantined. B's
    indexed blobs that A cannot see do not count as missing for A."""
    root, a, b, site = make_cluster(tmp_path)

    async def play():
        node_b = node(b, root, "bravo")
        await node_b.open()
        try:
            packed = await store(node_b, site, make_message(3000, "in the open pack"))
            pack, _offset, _size = row(b, packed)
            hour = pack.split("/")[1]
            in_flight = {
                root / pack: read(root / pack, 0, 1 << 20) + b"frames of a batch not yet committed",
                root / "bravo" / hour / spool.new_queue_id(node_b.layout.number): b"renamed, not committed",
                root / "bravo" / "spool" / f"{spool.new_queue_id(node_b.layout.number)}.tmp": b"still arriving",
            }
            for path, data in in_flight.items():
                path.write_bytes(data)
            conn = db.connect(a)  # B's mails whose files are away (as if A could not see them)
            try:
                conn.executemany(
                    "INSERT INTO messages (queue_id, blob, size, sha256, dot_lines, received_at, mail_from, refs)"
                    " VALUES (?, ?, 10, '', 0, 0, 'x', 1)",
                    [(f"{i:019X}", f"bravo/{hour}/{i:019X}") for i in range(1, 30)],
                )
            finally:
                conn.close()
            # node A crashed earlier with a blob of its own renamed into place, never committed
            (root / "alpha" / hour).mkdir(parents=True)
            own = root / "alpha" / hour / spool.new_queue_id(1)
            own.write_bytes(b"A's leftover")
            node_a = node(a, root, "alpha")
            await node_a.open()
            await node_a.close()
            return in_flight, own
        finally:
            await node_b.close()

    in_flight, own = asyncio.run(play())
    for path, data in in_flight.items():
        assert path.read_bytes() == data, path
    assert not own.exists()
    quarantined = [p.name for p in (a / "quarantine").rglob("*") if p.is_file()]
    assert own.name in quarantined and "index-rows.json" not in quarantined


def test_a_freed_mail_of_another_node_is_removed_without_touching_its_open_pack(tmp_path):
    root, a, b, site = make_cluster(tmp_path)
    mails = [make_message(BIG, "big"), make_message(3000, "p1"), make_message(3100, "p2"), make_message(3200, "p3")]

    async def play():
        node_b, node_a = node(b, root, "bravo"), node(a, root, "alpha")
        await node_b.open()
        await node_a.open()
        try:
            big, p1, p2 = [await store(node_b, site, mail) for mail in mails[:3]]
            pack = row(a, p1)[0]
            assert row(a, p2)[0] == pack and node_b._packs.open_blob == pack
            uids = {e.queue_id: e.uid for e in await node_a.mailbox(site)}
            where = {q: (root / row(a, q)[0], *row(a, q)[1:]) for q in (big, p1, p2)}
            await node_a.delete(site, [uids[big], uids[p1]])  # A frees B's mails (and empties the trash)
            assert not where[big][0].exists()  # B's file of its own: removed by A
            assert released(where[p1]) and read(*where[p2]) == mails[2]  # a hole in B's open pack
            await node_a.delete(site, [uids[p2]])  # B's open pack is now free as a whole ...
            assert (root / pack).exists() and trash(a) == [pack]  # ... but it is B's to remove
            p3 = await store(node_b, site, mails[3])  # B appends to it: out of the trash
            assert row(a, p3)[0] == pack and trash(a) == []
            entry = next(e for e in await node_a.mailbox(site) if e.queue_id == p3)
            assert node_a.serving_problem(entry) is None and read(entry.path, entry.offset, entry.size) == mails[3]
            await node_a.delete(site, [entry.uid])
            assert (root / pack).exists() and trash(a) == [pack]
            await node_b.empty_trash()  # its owner closes it and removes it
            return pack
        finally:
            await node_a.close()
            await node_b.close()

    pack = asyncio.run(play())
    assert not (root / pack).exists() and trash(a) == []


def trash(data_dir: Path) -> list[str]:
    conn = sqlite3.connect(data_dir / db.INDEX_NAME)
    try:
        return [blob for (blob,) in conn.execute("SELECT blob FROM blob_trash")]
    finally:
        conn.close()


def test_queue_ids_of_two_nodes_never_collide():
    """Made at the same time, even with the same sequence numbers: the node number keeps them apart."""
    ids = {n: [spool.new_queue_id(n) for _ in range(20000)] for n in (1, 2)}
    assert not set(ids[1]) & set(ids[2])
    assert all(q[13:15] == "01" for q in ids[1]) and all(q[13:15] == "02" for q in ids[2])
    assert len(set(ids[1])) == len(ids[1])
    spool._sequence = iter(range(5, 10))  # the worst case: both nodes' counters at the same values
    try:
        same_time = [spool.new_queue_id(n) for n in (1, 2, 1, 2)]
    finally:
        import itertools

        spool._sequence = itertools.count(int.from_bytes(os.urandom(3), "big"))
    assert len(set(q[13:] for q in same_time)) == 4
    plain = spool.new_queue_id()
    assert len(plain) == 19 and int(plain, 16) >= 0  # the default: today's format


def test_node_numbers_are_claimed_once_per_name_and_never_twice(index, index_connect, monkeypatch):
    """On SQLite and PostgreSQL: a name keeps its number, a number is never given to two names,
    also when nodes start at the same time (connections of their own, claiming at once)."""
    import threading

    monkeypatch.setattr(blob_layout, "MAX_NODES", 12)  # (255 in use: the exhaustion reached sooner)
    index.execute("INSERT INTO meta (key, value) VALUES ('blob_node_number:1', 0)")  # a claim whose name never came
    first = blob_layout.register_node(index, "alpha")
    assert first == 2 and blob_layout.register_node(index, "alpha") == 2
    got: dict[str, int] = {}
    errors: list[BaseException] = []

    def claim(name: str) -> None:
        conn = index_connect()
        try:
            got[name] = blob_layout.register_node(conn, name)
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=claim, args=(f"node-{n}",)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(got.values()) == list(range(3, 9))
    for n in range(blob_layout.MAX_NODES - 8):
        blob_layout.register_node(index, f"n{n}")
    with pytest.raises(StorageError, match="no node number left"):
        blob_layout.register_node(index, "one-too-many")
    assert blob_layout.register_node(index, "node-3") == got["node-3"]
    # the queries that pick a node's own blobs (recovery, settle, check) run on the engine
    assert index.execute("SELECT count(*) FROM packs WHERE substr(blob, 1, ?) = ?", (6, "alpha/")).fetchone() == (0,)
    assert index.execute("SELECT blob FROM messages WHERE blob LIKE '%/%/%' LIMIT 1").fetchone() is None


def test_an_unmounted_shared_folder_is_not_taken_for_an_empty_one(tmp_path):
    root, a, _b, site = make_cluster(tmp_path)

    async def first_run() -> str:
        storage = node(a, root, "alpha")
        await storage.open()
        try:
            return await store(storage, site, make_message(3000))
        finally:
            await storage.close()

    qid = asyncio.run(first_run())
    mounted = tmp_path / "elsewhere"
    root.rename(mounted)  # unmounted: an empty mount point is left
    root.mkdir()
    with pytest.raises(SharedBlobsUnavailable, match="is the shared file system mounted"):
        asyncio.run(node(a, root, "alpha").open())
    assert os.listdir(root) == []  # nothing made on the wrong file system
    mounted.rename(root / "mounted")
    (root / "mounted" / blob_layout.MARKER).unlink()  # mounted, but the marker removed by hand
    with pytest.raises(SharedBlobsUnavailable, match=r"holds node folders \(alpha\).* touch .*mailhub-blobs"):
        asyncio.run(node(a, root / "mounted", "alpha").open())
    (root / "mounted" / blob_layout.MARKER).touch()  # the command the message gives (started below)
    (root / "mounted").rename(mounted)
    root.rmdir()
    with pytest.raises(SharedBlobsUnavailable, match="is not a folder"):
        asyncio.run(node(a, root, "alpha").open())
    mounted.rename(root)

    async def away_while_serving() -> tuple[str | None, bool, dict[str, str]]:
        storage = node(a, root, "alpha")
        await storage.open()
        try:
            (entry,) = await storage.mailbox(site)
            (root / blob_layout.MARKER).rename(tmp_path / "marker")  # the folder cannot be reached
            problem = storage.serving_problem(entry)
            marked = await storage.mark_damaged(qid, "missing", "scrub")
            (tmp_path / "marker").rename(root / blob_layout.MARKER)
            return problem, marked, dict(storage.damaged)
        finally:
            await storage.close()

    problem, marked, damaged = asyncio.run(away_while_serving())
    assert problem is None  # the file is there: only a missing file asks whether the folder is
    assert not marked and damaged == {}  # a mail is never marked damaged while the folder is away


def test_the_default_keeps_the_data_folder_layout_and_the_two_are_not_mixed(tmp_path):
    root, a, _b, _site = make_cluster(tmp_path)
    local = tmp_path / "local"  # a hub of its own (its own index) that ran with storage.blobs empty
    conn = db.connect(local)
    try:
        site = add_site(conn, "beta", ["beta@hub.test"], "secret-password-1", ["hub.test"]).id
    finally:
        conn.close()

    async def default_run() -> str:
        storage = Storage(local)
        await storage.open()
        try:
            assert storage.layout.prefix == "" and storage.layout.number is None
            return await store(storage, site, make_message(3000))
        finally:
            await storage.close()

    qid = asyncio.run(default_run())
    blob = row(local, qid)[0]
    assert blob.count("/") == 1 and (local / "blobs" / blob).is_file()  # '<hour>/<queue ID>' as ever
    assert not any((local / name).is_symlink() for name in blob_layout.LINKED)
    with pytest.raises(StorageError, match="index holds mail of the data-folder layout"):
        asyncio.run(node(local, root, "alpha").open())
    assert not (local / "blobs").is_symlink() and (local / "blobs" / blob).is_file()
    # its folders moved away by hand: still refused (its mail would be looked for in the shared
    # folder, found missing and marked damaged), nothing made in the shared folder
    (local / "blobs").rename(tmp_path / "old-blobs")
    with pytest.raises(StorageError, match=r"index holds mail .*set storage.blobs back to empty"):
        asyncio.run(node(local, root, "alpha").open())
    assert not (local / "blobs").exists() and not (root / "alpha").exists()
    (tmp_path / "old-blobs").rename(local / "blobs")
    fresh = tmp_path / "fresh"  # no mail in its index, a file left in blobs/: refused, not moved
    db.connect(fresh).close()
    (fresh / "blobs").mkdir()
    (fresh / "blobs" / "left").write_bytes(b"x")
    with pytest.raises(StorageError, match="holds files of the data-folder layout"):
        asyncio.run(node(fresh, root, "alpha").open())
    assert (fresh / "blobs" / "left").is_file()

    async def shared_then_default() -> None:
        storage = node(a, root, "alpha")
        await storage.open()
        await storage.close()
        await Storage(a).open()

    with pytest.raises(StorageError, match="storage.blobs is empty but"):
        asyncio.run(shared_then_default())


def test_two_hubs_with_one_node_name_are_refused(tmp_path):
    root, a, b, _site = make_cluster(tmp_path)

    async def play() -> None:
        first = node(a, root, "alpha")
        await first.open()
        try:
            await node(b, root, "alpha").open()
        finally:
            await first.close()

    with pytest.raises(StorageError, match=r"node.name 'alpha' must be unique .*lease: about 90 s"):
        asyncio.run(play())
    assert not (b / "blobs").exists()


def test_a_node_name_must_be_a_folder_name():
    for bad in ("", "../x", "a/b", ".hidden", "2026120703", "spool", "x" * 64):
        assert blob_layout.node_name_problem(bad) is not None, bad
    for good in ("hub1", "hub-2.eu", "A_b"):
        assert blob_layout.node_name_problem(good) is None
    assert blob_layout.node_name_problem(blob_layout.default_node_name()) is None


def test_a_writer_settling_a_failed_commit_cuts_back_only_its_own_packs(tmp_path):
    """Node A's index writer died mid-commit and the new one settles it (IndexWriter.settle): the
    frames past the committed end of node B's open pack are B's batch in flight, never A's to cut."""
    from storage.index_writer import IndexWriter

    root, a, b, site = make_cluster(tmp_path)

    async def b_writes() -> str:
        node_b = node(b, root, "bravo")
        await node_b.open()
        try:
            return row(b, await store(node_b, site, make_message(3000)))[0]
        finally:
            await node_b.close()

    pack = asyncio.run(b_writes())
    with open(root / pack, "ab") as f:
        f.write(b"B's batch in flight")
    size = (root / pack).stat().st_size
    asyncio.run(open_and_close(node(a, root, "alpha")))  # node A's links made
    writer = IndexWriter(a, 0)
    try:
        assert writer.settle(["0" * 19], [], "alpha/") is None
        assert (root / pack).stat().st_size == size  # B's pack untouched
        assert writer.settle(["0" * 19], [], "") is None  # (what it did before: every pack cut back)
        assert (root / pack).stat().st_size < size
    finally:
        writer.close()


async def open_and_close(storage: Storage) -> None:
    await storage.open()
    await storage.close()


def test_storage_check_and_backup_of_a_node_in_a_shared_folder(tmp_path):
    from storage.backup import backup
    from storage.check import check

    root, a, b, site = make_cluster(tmp_path)
    mails = [make_message(3000, "small"), make_message(BIG, "big")]

    async def play() -> list[str]:
        node_b, node_a = node(b, root, "bravo"), node(a, root, "alpha")
        await node_a.open()
        try:
            qids = [await store(node_a, site, mail) for mail in mails]
            await node_b.open()  # (its index writer numbers its group commits after A's)
            return qids + [await store(node_b, site, mails[0])]
        finally:
            await node_a.close()
            await node_b.close()

    qids = asyncio.run(play())
    hour = row(a, qids[0])[0].split("/")[1]
    (root / "bravo" / hour / spool.new_queue_id(2)).write_bytes(b"B's blob in flight")
    report = check(a)
    assert report.problems == [] and report.strays == [] and report.unindexed_files == []
    assert report.blob_files == 2  # A's pack and A's big mail; B's are B's to check
    (root / "alpha" / hour / spool.new_queue_id(1)).write_bytes(b"A's own stray blob")
    assert check(a).unindexed_files  # its own part is still checked
    done = backup(a, tmp_path / "copy")
    assert done.gone == [] and done.messages == 3
    for qid, mail in zip(qids, mails + mails[:1]):
        blob, offset, size = row(a, qid)
        assert read(tmp_path / "copy" / "blobs" / blob, offset, size) == mail


def test_a_hub_on_a_shared_folder_takes_and_serves_mail_and_answers_451_while_it_is_away(make_hub, tmp_path):
    import imaplib
    import poplib
    import smtplib

    from conftest import ALPHA_BETA_B2, PASSWORD
    from pop3util import send

    root = tmp_path / "shared"
    root.mkdir()
    hub = make_hub(sites=ALPHA_BETA_B2, MAILHUB_STORAGE_BLOBS=str(root), MAILHUB_NODE_NAME="hub-one").start()
    mails = [make_message(3000, "packed"), make_message(BIG, "own file")]
    qids = [send(hub, ["beta@hub.test"], mail) for mail in mails]
    for qid in qids:
        (blob,) = hub.query("SELECT blob FROM messages WHERE queue_id = ?", qid)[0]
        assert blob.startswith("hub-one/") and (root / blob).is_file()
    pop = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=60)
    pop.user("beta")
    pop.pass_(PASSWORD)
    got = [b"\r\n".join(pop.retr(n)[1]) + b"\r\n" for n in (1, 2)]
    pop.quit()
    assert [g.endswith(m) for g, m in zip(got, mails)] == [True, True]

    root.rename(tmp_path / "away")  # the shared file system is gone
    try:
        client = smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=60)
        client.ehlo("gateway.test")
        client.login("alpha", PASSWORD)
        client.mail("alpha@hub.test")
        client.rcpt("beta@hub.test")
        code, reply = client.data(make_message(BIG, "while away"))
        client.quit()
        pop = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=60)
        pop.user("beta")
        pop.pass_(PASSWORD)
        with pytest.raises(poplib.error_proto) as refused:
            pop.retr(2)
        pop.quit()
        imap = imaplib.IMAP4("127.0.0.1", hub.ports["imap"], timeout=60)
        imap.login("beta", PASSWORD)
        imap.select("INBOX")
        with pytest.raises(imaplib.IMAP4.abort, match="UNAVAILABLE"):
            imap.fetch("1", "(BODY.PEEK[])")
    finally:
        (tmp_path / "away").rename(root)
    assert code == 451, reply
    assert refused.value.args[0].startswith(b"-ERR [SYS/TEMP] message 2 cannot be read now"), refused.value
    assert send(hub, ["beta@hub.test"], mails[1])  # back: taken again
    assert hub.query("SELECT count(*) FROM damaged") == [(0,)]


def test_rebuild_index_reads_every_nodes_blobs_and_ledger(tmp_path):
    """The index is lost; node B rebuilds it from an old copy (sites, no mail) and the shared
    folder: every node's mail comes back (B's file of its own is proven by B's ledger only), and a
    mail node A deleted stays deleted (A's ledger only says so)."""
    import shutil

    from storage.rebuild import rebuild_index

    root, a, b, site = make_cluster(tmp_path)
    old = tmp_path / "old-index.sqlite3"
    shutil.copyfile(a / db.INDEX_NAME, old)
    mails = [make_message(3000, "a"), make_message(BIG, "b big"), make_message(3100, "p1"), make_message(3200, "p2")]

    async def play() -> list[str]:
        node_a, node_b = node(a, root, "alpha", release_freed_after=3600), node(b, root, "bravo")  # (no hole)
        await node_a.open()
        try:
            qids = [await store(node_a, site, mails[0])]
            await node_b.open()
            try:
                qids += [await store(node_b, site, mail) for mail in mails[1:]]
                uids = {e.queue_id: e.uid for e in await node_a.mailbox(site)}
                await node_a.delete(site, [uids[qids[2]]])  # node A deletes B's p1
            finally:
                await node_b.close()
        finally:
            await node_a.close()
        return qids

    qids = asyncio.run(play())
    (b / db.INDEX_NAME).unlink()  # B's index is gone
    report = rebuild_index(b, old)
    assert report.restored == 3, report
    conn = sqlite3.connect(b / db.INDEX_NAME)
    try:
        entries = {q for (q,) in conn.execute("SELECT queue_id FROM mailbox")}
    finally:
        conn.close()
    assert entries == {qids[0], qids[1], qids[3]}
    for qid, mail in zip(qids, mails):
        if qid in entries:
            blob, offset, size = row(b, qid)
            assert read(root / blob, offset, size) == mail


def test_a_stale_size_from_the_attribute_cache_is_asked_again_before_a_mail_is_called_short(tmp_path, monkeypatch):
    """On NFS, stat() may answer from the client's attribute cache: the size another node's pack had
    before it appended the mail just committed. The serving check asks again through an open file
    (which revalidates) before it calls the mail cut short (and has it marked damaged)."""
    from storage import verify

    pack = tmp_path / "pack"
    pack.write_bytes(b"x" * 5000)
    real_stat = os.stat

    def cached_stat(path, *args, **kwargs):
        result = real_stat(path, *args, **kwargs)
        if Path(path) == pack:  # the size as cached before the append
            return os.stat_result((*result[:6], 3000, *result[7:]))
        return result

    monkeypatch.setattr(verify.os, "stat", cached_stat)
    assert os.stat(pack).st_size == 3000
    assert verify.size_problem(pack, 3000, 2000) is None
    assert verify.size_problem(pack, 3000, 2001) == "blob file cut short (2000 of 2001 bytes)"


def test_two_nodes_on_one_postgresql_index_store_at_once_and_serve_and_free_each_others_mail(tmp_path, pg_index):
    """Two nodes (data folders of their own, one PostgreSQL index, one shared folder) both open and
    taking mail in turns: each mail is stored under its node's folder, served by the other node,
    and a mail freed by the other node goes without touching the open pack of its own node."""
    from storage.postgres.connection import PgConnection

    url, reset = pg_index
    reset()
    conn = PgConnection.connect(url)
    try:
        site = add_site(conn, "beta", ["beta@hub.test"], "secret-password-1", ["hub.test"]).id
    finally:
        conn.close()
    root = tmp_path / "shared"
    root.mkdir()

    async def play():
        nodes = [Storage(tmp_path / n, release_freed_after=0, blobs=root, node=n, index_url=url) for n in ("a", "b")]
        for storage in nodes:
            await storage.open()
        try:
            sent = {}
            for i in range(3):  # both nodes' group commits at the same time
                mails = [make_message(3000 + i, f"mail a{i}"), make_message(3100 + i, f"mail b{i}")]
                qids = await asyncio.gather(*(store(n, site, m) for n, m in zip(nodes, mails)))
                sent.update({q: (m, owner) for q, m, owner in zip(qids, mails, "ab")})
            entries = {e.queue_id: e for e in await nodes[0].mailbox(site)}
            served = {
                q: (
                    nodes[1 - "ab".index(n)].serving_problem(entries[q]),
                    read(entries[q].path, entries[q].offset, entries[q].size),
                )
                for q, (_m, n) in sent.items()
            }
            open_pack = nodes[1]._packs.open_blob
            b_mails = [q for q, (_m, n) in sent.items() if n == "b"]
            await nodes[0].delete(site, [entries[q].uid for q in b_mails])  # node a frees all of b's
            still_there = (root / open_pack).exists()
            later = make_message(4000, "after")
            qid = await store(nodes[1], site, later)
            (entry,) = [e for e in await nodes[0].mailbox(site) if e.queue_id == qid]
            paths = {q: e.path for q, e in entries.items()}
            return sent, served, paths, open_pack, still_there, read(entry.path, entry.offset, entry.size) == later
        finally:
            for storage in nodes:
                await storage.close()

    sent, served, paths, open_pack, still_there, later_ok = asyncio.run(play())
    for qid, (mail, owner) in sent.items():
        assert served[qid] == (None, mail)
        assert f"/blobs/{owner}/" in str(paths[qid]) and qid[13:15] == ("01" if owner == "a" else "02")
    assert open_pack.startswith("b/") and still_there and later_ok


def test_each_node_numbers_its_group_commits_in_a_stream_of_its_own(index):
    """Node N's group commits are k * 256 + N, each after its own last one still in the index (a
    node with none follows the index's last commit: it never takes a number in use); one hub
    counts 1, 2, 3... as ever. On both engines."""
    from storage import ledger

    assert ledger.next_seq(0, None) == 1 and ledger.next_seq(41, None) == 42
    assert ledger.stream_last(index, 3) == (0, 0) and ledger.next_seq(0, 3) == 259
    index.execute("INSERT INTO commits (seq, attempt, mails) VALUES (300, 1, '')")  # a single hub's, before
    assert ledger.stream_last(index, 3) == (300, 1) and ledger.next_seq(300, 3) == 515
    index.execute("INSERT INTO commits (seq, attempt, mails) VALUES (515, 7, '')")  # node 3's
    index.execute("INSERT INTO commits (seq, attempt, mails) VALUES (770, 9, '')")  # node 2's, later
    assert ledger.stream_last(index, 3) == (515, 7) and ledger.next_seq(515, 3) == 771
    assert ledger.stream_last(index, 2) == (770, 9) and ledger.next_seq(770, 2) == 1026
    assert ledger.stream_last(index, None) == (770, 9)


def test_a_removal_another_writer_commits_late_is_never_pruned_before_a_ledger_holds_it(tmp_path, pg_index):
    """Ids of ledger_pending rows are taken when a transaction inserts them, not when it commits:
    another node's (or the command line's) removal with a lower id may commit after this node's
    writer appended a higher one. The writer deletes only the rows it made durable in its own
    ledger: that removal stays in the index (for its node's ledger, or this node's next flush) and
    ends in this node's ledger once this node flushes again - never in no ledger at all (a rebuild
    would bring the deleted mail back: delivered twice)."""
    import psycopg

    from storage import ledger
    from storage.postgres.connection import PgConnection

    url, reset = pg_index
    reset()
    conn = PgConnection.connect(url)
    try:
        site = add_site(conn, "beta", ["beta@hub.test"], "secret-password-1", ["hub.test"]).id
    finally:
        conn.close()
    root = tmp_path / "shared"
    root.mkdir()
    other = psycopg.connect(url)  # the other writer, its transaction open across node a's steps

    async def play() -> tuple[int, bool, bool]:
        a = Storage(tmp_path / "a", release_freed_after=0, blobs=root, node="a", index_url=url)
        await a.open()
        try:
            await store(a, site, make_message(3000, "first"))
            (late,) = other.execute(
                "INSERT INTO ledger_pending (kind, queue_id, rcpt, at) VALUES ('o', 'LATE', 'x@far.test', 0)"
                " RETURNING id"
            ).fetchone()
            (entry,) = await a.mailbox(site)
            await a.delete(site, [entry.uid])  # a higher id, appended to a's ledger at once
            other.commit()  # the lower id commits only now
            await store(a, site, make_message(3100, "second"))  # a group commit: a prunes
            check = PgConnection.connect(url)
            try:
                kept = check.execute("SELECT 1 FROM ledger_pending WHERE id = ?", (late,)).fetchone() is not None
            finally:
                check.close()
            (entry,) = await a.mailbox(site)
            await a.delete(site, [entry.uid])  # a's next flush appends what it had not seen
            return late, kept, ("LATE", "x@far.test") in ledger.read(tmp_path / "a").outbound_done
        finally:
            await a.close()

    try:
        late, kept, in_ledger = asyncio.run(play())
    finally:
        other.close()
    assert late > 0 and kept and in_ledger


def test_a_folder_with_a_marker_but_none_of_the_index_s_mail_is_refused(tmp_path):
    """A new node (no mail of its own: recovery's 'most blobs missing' has nothing to count) given
    another folder with a marker (another cluster's, an old copy) does not start: it would mark
    every mail it serves damaged."""
    root, a, b, site = make_cluster(tmp_path)

    async def fill() -> None:
        storage = node(a, root, "alpha")
        await storage.open()
        try:
            for i in range(5):
                await store(storage, site, make_message(3000 + i, f"mail {i}"))
        finally:
            await storage.close()

    asyncio.run(fill())
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / blob_layout.MARKER).write_bytes((root / blob_layout.MARKER).read_bytes())

    async def start_and_stop(root: Path) -> None:
        storage = node(b, root, "beta")
        await storage.open()
        await storage.close()

    with pytest.raises(SharedBlobsUnavailable, match="holds none of the index's 5 newest mails"):
        asyncio.run(start_and_stop(wrong))
    assert os.listdir(wrong) == [blob_layout.MARKER] and not (b / "blobs").exists()

    async def right() -> str | None:
        storage = node(b, root, "beta")
        await storage.open()
        try:
            return storage.serving_problem((await storage.mailbox(site))[0])
        finally:
            await storage.close()

    assert asyncio.run(right()) is None
    # the newest mails truly lost and marked damaged (storage verify): not looked for any more
    conn = sqlite3.connect(a / db.INDEX_NAME)
    try:
        for qid, blob in conn.execute("SELECT queue_id, blob FROM messages").fetchall():
            (root / blob).unlink(missing_ok=True)
            conn.execute("INSERT INTO damaged VALUES (?, 'blob file missing', 'verify', 0, NULL)", (qid,))
        conn.commit()
    finally:
        conn.close()
    asyncio.run(start_and_stop(root))


def test_other_nodes_packs_left_in_the_trash_are_forgotten_once_freed_by_their_node(tmp_path):
    from storage import envelope

    root = tmp_path / "shared"
    (root / "b" / "2026120700").mkdir(parents=True)
    pack = root / "b" / "2026120700" / "PACK"
    pack.write_bytes(envelope.FRAME_MAGIC + b"\0" * 60)
    layout = blob_layout.BlobLayout(tmp_path / "a", root, "a", 1)
    assert layout.releasable(["b/2026120700/PACK"]) == []  # another node's pack: left to it
    assert layout._foreign_packs == {"b/2026120700/PACK"}
    pack.unlink()  # its node freed it (and forgot its trash row)
    assert layout.releasable(["a/2026120700/OWN"]) == ["a/2026120700/OWN"]
    assert layout._foreign_packs == set()  # not remembered for the process's life


@pytest.mark.postgresql
def test_a_name_claimed_by_another_hub_at_the_same_moment_gets_that_hub_s_number(pg_index):
    """Two hubs given one name start at the same moment (the second is refused later by the node
    folder's lock, with its message): the one whose claim comes second takes the first one's
    number, not an error from the index's unique key."""
    import threading

    import psycopg

    from storage.postgres.connection import PgConnection

    url, reset = pg_index
    reset()
    first = psycopg.connect(url)  # its claim of number 1 for 'twice' in flight, not yet committed
    first.execute("INSERT INTO meta (key, value) VALUES ('blob_node:twice', 1), ('blob_node_number:1', 0)")
    result: dict[str, object] = {}

    def second() -> None:
        conn = PgConnection.connect(url)
        try:
            result["number"] = blob_layout.register_node(conn, "twice")
        except Exception as exc:  # what the test reports
            result["error"] = exc
        finally:
            conn.close()

    thread = threading.Thread(target=second)
    thread.start()
    try:
        with psycopg.connect(url, autocommit=True) as watch:  # the second waits on the first's key
            wait_for(  # not raising: the result below tells whether the second waited
                lambda: watch.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
                ).fetchone(),
                timeout=30,
                interval=0.01,
                raise_on_timeout=False,
            )
    finally:
        first.commit()
        first.close()
        thread.join(30)
    assert result == {"number": 1}


def test_two_nodes_names_swapped_are_refused_before_recovery_touches_the_other_s_mail(tmp_path):
    """Each node with an index of its own (SQLite) on one shared folder, their node.name values
    swapped: node A's data folder named 'beta' would have had its recovery take beta's committed
    mail for orphans and move it to A's quarantine. It is refused, naming the way back."""
    root = tmp_path / "shared"
    root.mkdir()
    sites = {}
    for name in ("a", "b"):
        conn = db.connect(tmp_path / name)
        try:
            sites[name] = add_site(conn, "beta", ["beta@hub.test"], "secret-password-1", ["hub.test"]).id
        finally:
            conn.close()

    async def take(data_dir: Path, name: str, site: int) -> str:
        storage = node(data_dir, root, name)
        await storage.open()
        try:
            return await store(storage, site, make_message(3000, f"mail of {name}"))
        finally:
            await storage.close()

    asyncio.run(take(tmp_path / "a", "alpha", sites["a"]))
    qid = asyncio.run(take(tmp_path / "b", "beta", sites["b"]))
    blob = root / row(tmp_path / "b", qid)[0]
    with pytest.raises(StorageError, match="was node 'alpha'.* names swapped\\? Set node.name back to 'alpha'"):
        asyncio.run(take(tmp_path / "a", "beta", sites["a"]))
    assert blob.is_file() and not list((tmp_path / "a").glob("quarantine/**/*" + qid + "*"))
    assert os.readlink(tmp_path / "a" / "spool") == str(root / "alpha" / "spool")  # links left as they were
    asyncio.run(take(tmp_path / "a", "gamma", sites["a"]))  # a rename to a name no node has used


def test_a_node_without_storage_blobs_on_a_cluster_s_index_is_refused(tmp_path):
    """A node that forgot storage.blobs, on the index of a cluster whose mail is in a shared
    folder, does not start: it would look for that mail in its data folder (missing: marked
    damaged) and take mail no other node could serve."""
    root, a, _b, site = make_cluster(tmp_path)

    async def take() -> str:
        storage = node(a, root, "alpha")
        await storage.open()
        try:
            return await store(storage, site, make_message(3000))
        finally:
            await storage.close()

    qid = asyncio.run(take())
    forgot = tmp_path / "forgot"
    forgot.mkdir()
    os.symlink(a / db.INDEX_NAME, forgot / db.INDEX_NAME)

    async def start_and_stop() -> None:
        storage = Storage(forgot, release_freed_after=0)
        await storage.open()
        await storage.close()

    with pytest.raises(StorageError, match=r"storage.blobs is empty but the index holds mail of a shared blob folder"):
        asyncio.run(start_and_stop())
    conn = sqlite3.connect(a / db.INDEX_NAME)
    try:
        assert conn.execute("SELECT count(*) FROM damaged").fetchone() == (0,)
    finally:
        conn.close()
    assert row(a, qid)[0].startswith("alpha/")


@pytest.mark.postgresql
def test_a_node_whose_clock_runs_ahead_waits_the_delay_on_the_index_s_clock(tmp_path, pg_index, monkeypatch):
    """freed_at of a freed range is written by PostgreSQL's trigger (the server's clock, one for
    every node): a node whose clock runs two hours ahead does not release a range another node
    freed a moment ago (a reader on that node may still be sending it), only one freed over
    release_freed_after seconds ago."""
    import time

    from storage import index_writer
    from storage.postgres.connection import PgConnection

    url, reset = pg_index
    reset()
    writer = index_writer.IndexWriter(tmp_path, 3600.0, url)
    other = PgConnection.connect(url)  # another node's deletions
    try:
        ahead = time.time() + 7200.0
        monkeypatch.setattr(index_writer.time, "time", lambda: ahead)
        other.execute("INSERT INTO blob_holes (blob, start, size, freed_at) VALUES ('b/p', 0, 10, unix_now())")
        other.execute("INSERT INTO blob_holes (blob, start, size, freed_at) VALUES ('b/p', 10, 5, unix_now() - 3601)")
        assert writer.freed() == ([], [("b/p", 10, 5)])
    finally:
        other.close()
        writer.close()


def test_a_single_hub_whose_blobs_folder_is_an_operator_s_link_to_another_disk_still_starts(tmp_path):
    """storage.blobs empty, blobs/ a symbolic link the operator made to a folder on another disk
    (no marker, no spool link into it): the single hub starts and stores its mail there, as before
    shared blob folders existed. The hub's own links into a shared folder are still refused."""
    local, disk = tmp_path / "local", tmp_path / "disk2" / "blobs"
    conn = db.connect(local)
    try:
        site = add_site(conn, "beta", ["beta@hub.test"], "secret-password-1", ["hub.test"]).id
    finally:
        conn.close()
    disk.mkdir(parents=True)
    (tmp_path / "disk2" / "spool").mkdir()
    os.symlink(disk, local / "blobs")
    os.symlink(tmp_path / "disk2" / "spool", local / "spool")

    async def take() -> str:
        storage = Storage(local, release_freed_after=0)
        await storage.open()
        try:
            return await store(storage, site, make_message(3000))
        finally:
            await storage.close()

    qid = asyncio.run(take())
    assert (disk / row(local, qid)[0]).is_file()
    from storage.check import check

    report = check(local)  # its blobs checked as a single hub's, not as node 'disk2's
    assert report.problems == [] and report.blob_files == 1 and report.strays == []


def test_the_writer_prunes_exactly_the_removals_it_wrote_never_a_gap_between_them(index):
    """Runs of consecutive ids go in one statement each; an id between two runs (another writer's
    removal, perhaps not in any ledger yet) stays. On both engines."""
    from storage.index_writer import IndexWriter

    index.executemany(
        "INSERT INTO ledger_pending (kind, queue_id, rcpt, at) VALUES ('o', ?, 'x@far.test', 0)",
        [(f"Q{i}",) for i in range(7)],
    )
    ids = [i for (i,) in index.execute("SELECT id FROM ledger_pending ORDER BY id").fetchall()]
    IndexWriter._prune_removals(index, {ids[0], ids[1], ids[2], ids[4], ids[6]})
    assert [i for (i,) in index.execute("SELECT id FROM ledger_pending ORDER BY id").fetchall()] == [ids[3], ids[5]]


def test_a_freed_file_in_a_shared_folder_waits_its_delay_before_it_is_removed(tmp_path):
    """On NFS a file one node removes is gone for the others too (a node still sending it gets
    ESTALE): a freed file of one mail waits release_freed_after seconds in the trash, as a freed
    range of a pack does; a restart in between neither removes it nor quarantines it."""
    root, a, _b, site = make_cluster(tmp_path)
    clock = {"now": 1000.0}

    def opened() -> Storage:
        storage = node(a, root, "alpha", release_freed_after=3600)
        storage.monotonic = lambda: clock["now"]
        return storage

    async def take_and_delete() -> tuple[Path, bool]:
        storage = opened()
        await storage.open()
        try:
            qid = await store(storage, site, make_message(BIG, "big"))
            (entry,) = await storage.mailbox(site)
            path = entry.path
            await storage.delete(site, [entry.uid])  # freed: the trash is emptied after it
            await storage.empty_trash()
            return path, path.is_file() and qid in path.name
        finally:
            await storage.close()

    path, kept = asyncio.run(take_and_delete())
    assert kept  # not at once

    async def restart_and_wait() -> tuple[bool, bool]:
        storage = opened()
        await storage.open()  # recovery: neither removed nor quarantined
        try:
            after_restart = path.is_file()
            await storage.empty_trash()  # the delay starts again from here (a restart forgets)
            clock["now"] += 3599.0
            await storage.empty_trash()
            clock["now"] += 2.0
            early = path.is_file()
            await storage.empty_trash()
            return after_restart and early, path.exists()
        finally:
            await storage.close()

    kept_until_due, still_there = asyncio.run(restart_and_wait())
    assert kept_until_due and not still_there
    assert not list(a.glob("quarantine/**/*" + path.name + "*"))
