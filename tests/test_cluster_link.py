# The cluster link (storage/postgres/cluster.py) on a real PostgreSQL: two links in one process act
# as two nodes. Mailbox locks across nodes, freed when the node holding them dies (a killed process,
# a terminated backend), the leader lock passing on, other nodes' mailbox changes (NOTIFY from an
# index transaction, delivered at commit only) fed to the listeners, live downloads, bad payloads.
import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import psycopg
import pytest

from storage import cluster_events
from storage.cluster_events import Changes
from storage.postgres.cluster import MAILBOX_SPACE, ClusterLink, ClusterUnavailable
from storage.postgres.connection import PgConnection

from conftest import until, wait_for


class Heard:
    def __init__(self):
        self.calls = []

    def committed(self, *args):
        self.calls.append(("committed", args))

    def fetched_committed(self, *args):
        self.calls.append(("fetched", args))

    def removed(self, *args):
        self.calls.append(("removed", args))

    def remote_downloaded(self, *args):
        self.calls.append(("downloaded", args))

    def remote_polled(self, *args):
        self.calls.append(("polled", args))


def link(url, node, **kw):
    kw.setdefault("leader_interval", 0.1)
    kw.setdefault("backoff", (0.05, 0.2))
    return ClusterLink(url, node, **kw)


def backend_pid(url, application):
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND datname = current_database()",
            (application,),
        ).fetchone()
        return row[0] if row else None


def test_a_mailbox_lock_is_held_by_one_node_at_a_time(pg_url):
    async def main():
        a, b = link(pg_url, "a"), link(pg_url, "b")
        await a.start()
        await b.start()
        try:
            assert await a.try_lock(7)
            assert not await b.try_lock(7)  # held by node a
            assert await b.locked_elsewhere(7) and not await a.locked_elsewhere(7)
            assert await b.try_lock(8)  # another mailbox
            a.unlock(7)
            await until(lambda: b.try_lock(7), timeout=20.0, interval=0.05, message="node b takes mailbox 7")
            assert b.held == {7, 8} and a.held == set()
            assert not await a.try_lock(7)
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_a_killed_node_frees_its_mailbox_locks(pg_url):
    """A real process takes the lock and is killed with SIGKILL: PostgreSQL ends its session and the
    other node takes the mailbox."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, psycopg\n"
            "c = psycopg.connect(sys.argv[1], autocommit=True)\n"
            "assert c.execute('SELECT pg_try_advisory_lock(%s, 3)', (int(sys.argv[2]),)).fetchone()[0]\n"
            "print('locked', flush=True)\n"
            "time.sleep(600)\n",
            pg_url,
            str(MAILBOX_SPACE),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"

        async def main():
            b = link(pg_url, "b")
            await b.start()
            try:
                assert not await b.try_lock(3)
                assert await b.locked_elsewhere(3)
                os.kill(holder.pid, signal.SIGKILL)
                await until(
                    lambda: b.try_lock(3),
                    timeout=20.0,
                    interval=0.05,
                    message="node b takes the killed holder's mailbox",
                )
                assert b.held == {3}
            finally:
                await b.close()

        asyncio.run(main())
    finally:
        holder.kill()
        holder.wait()


def test_a_lost_link_drops_its_locks_and_leadership_and_comes_back(pg_url):
    async def main():
        a, b = link(pg_url, "a"), link(pg_url, "b")
        lost, missed = [], []
        a.on_locks_lost = lambda sites: lost.append((sites, a.is_leader(), set(a.held)))
        a.on_missed = missed.append
        await a.start()
        await until(a.is_leader, timeout=20.0, message="node a leader")
        await b.start()
        try:
            assert await a.try_lock(1) and await a.try_lock(2)
            pid = backend_pid(pg_url, "mailhub cluster link a")
            with psycopg.connect(pg_url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            await until(lambda: lost, timeout=20.0, message="node a's locks lost with its link")
            assert lost == [({1, 2}, False, set())]  # leadership gone first, then the locks
            assert await b.try_lock(1)  # the mailbox is free for the other node at once
            await until(lambda: a.connected and a.reconnects == 1, timeout=20.0, message="node a reconnected once")
            assert missed == [None]  # what came meanwhile is to be read from the index
            assert not await a.try_lock(1)  # back, and node b holds it now
            assert await a.try_lock(2)
            await until(lambda: a.is_leader() or b.is_leader(), timeout=20.0, message="a leader again")
            await asyncio.sleep(0.3)  # a negative window: no second leader within a few tries
            assert a.is_leader() != b.is_leader()  # one leader
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_no_lock_while_the_link_is_down(pg_url, postgres_server):
    async def main():
        a = link(pg_url, "a", backoff=(30.0, 30.0))
        await a.start()
        try:
            pid = backend_pid(pg_url, "mailhub cluster link a")
            with psycopg.connect(pg_url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            await until(lambda: not a.connected, timeout=20.0, message="node a's link down")
            with pytest.raises(ClusterUnavailable):
                await a.try_lock(4)
            a.unlock(4)  # nothing held: nothing to do, no error
        finally:
            await a.close()

    asyncio.run(main())


def test_the_leader_lock_passes_on_when_the_leader_stops(pg_url):
    async def main():
        a, b = link(pg_url, "a"), link(pg_url, "b")
        changes = []
        b.on_leader = changes.append
        await a.start()
        await until(a.is_leader, timeout=20.0, message="node a leader")
        await b.start()
        try:
            await asyncio.sleep(0.3)  # a negative window: b tried a few times and did not become leader
            assert not b.is_leader() and changes == []
            await a.close()
            await until(b.is_leader, timeout=20.0, message="node b leader once a stopped")
            assert changes == [True]
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_other_nodes_changes_reach_the_listeners_at_commit_only(pg_url):
    async def main():
        a, b = link(pg_url, "a"), link(pg_url, "b")
        heard_a, heard_b = Heard(), Heard()
        a.listeners.append(heard_a)
        b.listeners.append(heard_b)
        await a.start()
        await b.start()
        try:
            writer = PgConnection.connect(pg_url)
            try:
                # what node a's index writer sends in a transaction of its own
                writer.execute("BEGIN")
                cluster_events.notify(writer, Changes("a", committed=[(1, [2, 3], 100, 1.5)]))
                writer.execute("ROLLBACK")  # never committed: nobody hears of it
                writer.execute("BEGIN")
                cluster_events.notify(
                    writer,
                    Changes(
                        "a",
                        committed=[(None, [2], 50, 2.0)],
                        fetched=[(2, 11, 1, 100)],
                        removed=[(3, 12, 1, 100, True)],
                    ),
                )
                writer.execute("COMMIT")
            finally:
                writer.close()
            await until(lambda: len(heard_b.calls) == 3, timeout=20.0, message="node b heard 3 changes")
            assert heard_b.calls == [
                ("committed", (None, [2], 50, 2.0)),
                ("fetched", (2, 11, 1, 100)),
                ("removed", (3, 12, 1, 100, True)),
            ]
            a.note_download(2, 4096)  # a's live sends, for b's drain rates
            a.note_poll(2)
            await until(lambda: len(heard_b.calls) == 5, timeout=20.0, message="node b heard 5 changes")
            assert heard_b.calls[3:] == [("downloaded", (2, 4096)), ("polled", (2,))]
            await asyncio.sleep(0.2)  # a negative window: node a hears nothing of its own changes
            assert heard_a.calls == []  # a's own: its listeners heard of them in the process
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_a_bad_payload_is_refused_and_the_link_goes_on(pg_url):
    async def main():
        b = link(pg_url, "b")
        heard = Heard()
        b.listeners.append(heard)
        await b.start()
        try:
            with psycopg.connect(pg_url, autocommit=True) as other:
                for bad in ["not json", '{"n": "x", "c": [["a", [1], 2, 3]]}', '{"c": []}', '{"n": "x", "f": [1]}']:
                    other.execute("SELECT pg_notify('mailhub_events', %s)", (bad,))
                other.execute(
                    "SELECT pg_notify('mailhub_events', %s)", (cluster_events.payloads(Changes("x", polled=[9]))[0],)
                )
            await until(lambda: heard.calls == [("polled", (9,))], timeout=20.0, message="the good payload heard")
            assert b.dropped == 4
            assert await b.try_lock(1)
        finally:
            await b.close()

    asyncio.run(main())


def test_long_lists_are_split_under_the_notify_limit():
    changes = Changes(
        "node-" + "x" * 300,
        committed=[(i + 1, [r + 1 for r in range(i % 7)], i * 1000, 1.7e9 + i) for i in range(900)],
        fetched=[(i, i, None, 5) for i in range(1, 901)],
        removed=[(i, i, i, 5, i % 2 == 0) for i in range(1, 901)],
        downloaded=[(i, 1 << 40) for i in range(1, 501)],
        polled=list(range(1, 501)),
        flagged=list(range(1, 301)),
    )
    texts = cluster_events.payloads(changes)
    assert len(texts) > 5
    assert all(len(t.encode()) <= cluster_events.MAX_PAYLOAD for t in texts)
    back = [cluster_events.decode(t, now=1.7e9) for t in texts]
    for kind in ("committed", "fetched", "removed", "downloaded", "polled", "flagged"):
        assert [row for part in back for row in getattr(part, kind)] == getattr(changes, kind)
    assert {part.node for part in back} == {changes.node[: cluster_events.NODE_MAX]}
    assert cluster_events.payloads(Changes("n")) == []


def test_the_index_writer_tells_other_nodes_of_its_commits_and_deletions(pg_index, tmp_path):
    """The index writer on PostgreSQL NOTIFYs in each transaction: node b's listeners hear of node
    a's deliveries, downloads and deletions with the arguments a's own listeners get."""
    from storage import sites
    from storage.index_writer import BatchItem, IndexWriter
    from storage.records import Delivery, Downloads, MessageMeta

    url, reset = pg_index
    reset()
    writer = IndexWriter(tmp_path, 0.0, node="a")
    writer.conn.close()
    writer.conn = PgConnection.connect(url)
    for name in ("alpha", "beta"):
        sites.add_site(writer.conn, name, [f"{name}@hub.test"], "pw-" * 4, ["hub.test"])
    alpha, beta = (sites.get_site(writer.conn, n).id for n in ("alpha", "beta"))

    def item(queue_id, size, at):
        meta = MessageMeta(mail_from="x@hub.test", sender_site=alpha, dot_lines=False, message_id=None)
        return BatchItem(
            queue_id, size, at, meta, [Delivery(beta, "beta@hub.test")], [], None, f"11/{queue_id}", sha256="ab" * 32
        )

    async def main():
        a, b = link(url, "a"), link(url, "b")
        heard_a, heard_b = Heard(), Heard()
        a.listeners.append(heard_a)
        b.listeners.append(heard_b)
        await a.start()
        await b.start()
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(
                None, lambda: writer.commit_batch([item("Q1", 100, 1.5e9), item("Q2", 200, 1.5e9 + 1)], [], seq=1)
            )
            await until(lambda: len(heard_b.calls) == 2, timeout=20.0, message="node b heard 2 commits")
            assert heard_b.calls == [
                ("committed", (alpha, [beta], 100, 1.5e9)),
                ("committed", (alpha, [beta], 200, 1.5e9 + 1)),
            ]
            uids = [u for (u,) in writer.conn.execute("SELECT uid FROM mailbox ORDER BY uid")]
            downloads = Downloads(polled_at=1.6e9, fetched_uids=uids, retrieved={"Q1": (1.6e9, 100)})
            result = await loop.run_in_executor(None, writer.delete_entries, beta, uids[:1], downloads, "beta")
            await until(lambda: len(heard_b.calls) == 5, timeout=20.0, message="node b heard 5 changes")
            fetched, removed = result
            assert heard_b.calls[2:] == [("fetched", (beta, *row)) for row in fetched] + [
                ("removed", (beta, *row)) for row in removed
            ]
            assert len(fetched) == 2 and len(removed) == 1
            await asyncio.sleep(0.2)  # a negative window: node a hears nothing of its own changes
            assert heard_a.calls == []
        finally:
            await a.close()
            await b.close()

    try:
        asyncio.run(main())
    finally:
        writer.close()


def test_cluster_mailbox_locks_one_session_across_nodes_and_closed_when_the_link_goes(pg_url):
    """relay/mailbox_locks.py on two links: the in-process lock first, then the cluster's; a lost
    link closes the sessions that held locks, and new logins are refused until it is back."""
    from relay.mailbox_locks import ClusterMailboxLocks, LocksUnavailable, MailboxLocks

    async def main():
        a, b = link(pg_url, "a", backoff=(0.5, 0.5)), link(pg_url, "b")
        closed = []
        locks_a, locks_b = ClusterMailboxLocks(a, closed.append), ClusterMailboxLocks(b, closed.append)
        await a.start()
        await b.start()
        try:
            s1, s2, s3 = "session 1", "session 2", "session 3"
            assert await locks_a.acquire(5, s1)
            assert not await locks_a.acquire(5, s2)  # same node: the in-process lock says no
            assert not await locks_b.acquire(5, s3)  # other node: the advisory lock says no
            assert locks_b.holder(5) is None and await locks_b.in_use(5) and await locks_a.in_use(5)
            locks_a.release(5, s2)  # not the holder: nothing happens
            assert not await locks_b.acquire(5, s3)
            locks_a.release(5, s1)
            await until(lambda: locks_b.acquire(5, s3), timeout=20.0, interval=0.05, message="node b takes mailbox 5")
            assert not await locks_a.in_use(6)
            assert await locks_a.acquire(6, s1)
            with psycopg.connect(pg_url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (backend_pid(pg_url, "mailhub cluster link a"),))
            await until(  # its lock went: the session is closed
                lambda: closed == [s1], timeout=20.0, message="session 1 closed with node a's link"
            )
            assert locks_a.holder(6) is None
            with pytest.raises(LocksUnavailable):
                await locks_a.acquire(7, s2)
            assert locks_a.holder(7) is None  # the in-process lock was let go too
            assert await locks_a.in_use(7)  # cannot tell: as if held
            await until(lambda: a.connected, timeout=20.0, message="node a reconnected")
            assert await locks_a.acquire(7, s2)
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())

    async def local():
        locks = MailboxLocks()
        assert await locks.acquire(1, "x") and not await locks.acquire(1, "y")
        assert await locks.in_use(1) and 1 in locks and locks.holder(1) == "x"
        locks.release(1, "y")
        assert locks.holder(1) == "x"
        locks.release(1, "x")
        assert not await locks.in_use(1)

    asyncio.run(local())


# ---- the outbound queue's claims ------------------------------------------------------------------


def _queue(conn, count):
    from storage import db

    with db.transaction(conn):
        conn.execute(
            "INSERT INTO messages (queue_id, blob, size, sha256, dot_lines, received_at, mail_from, refs)"
            " VALUES ('Q', 'b/Q', 10, 'x', 0, 1, 'a@hub.test', ?)",
            (count,),
        )
        conn.executemany(
            "INSERT INTO outbound (queue_id, rcpt, queued_at, next_attempt_at, attempts) VALUES (?, ?, ?, ?, ?)",
            [("Q", f"r{i}@far.test", 1.0, 100.0 + i, 0) for i in range(count)],
        )


def test_two_nodes_claiming_at_once_never_get_the_same_row(pg_index, tmp_path):
    """Two transactions claim due rows concurrently: the second skips the rows the first holds
    (FOR UPDATE SKIP LOCKED) instead of waiting or taking them; after both commit, a third node gets
    none until the leases run out, then all of them (their nodes died)."""
    from storage import db
    from storage.outbound import due_and_version

    url, reset = pg_index
    reset()
    a, b, c = (PgConnection.connect(url) for _ in range(3))
    try:
        _queue(a, 10)
        a.execute("BEGIN")
        _, got_a = due_and_version(a, tmp_path, 1000.0, "[]", 6, 3, "a", 300.0)
        b.execute("BEGIN")
        b.execute("SET LOCAL lock_timeout = '5s'")  # waiting instead of skipping would fail here
        _, got_b = due_and_version(b, tmp_path, 1000.0, "[]", 6, 3, "b", 300.0)
        a.execute("COMMIT")
        b.execute("COMMIT")
        ids_a, ids_b = {r.id for r in got_a}, {r.id for r in got_b}
        assert len(ids_a) == 6 and len(ids_b) == 4 and not ids_a & ids_b
        with db.transaction(c):
            assert due_and_version(c, tmp_path, 1100.0, "[]", 20, 10, "c", 300.0)[1] == []
        with db.transaction(a):  # node a asks again: its own claims are its own (it excludes its rows in flight)
            assert {r.id for r in due_and_version(a, tmp_path, 1100.0, "[]", 20, 10, "a", 300.0)[1]} == ids_a
        with db.transaction(c):  # the leases of a and b ran out: they died mid-delivery
            taken = due_and_version(c, tmp_path, 1400.0, "[]", 20, 10, "c", 300.0)[1]
        assert {r.id for r in taken} == ids_a | ids_b
        claimed = set(c.execute("SELECT DISTINCT claimed_by, claimed_until FROM outbound").fetchall())
        assert claimed == {("c", 1700.0)}
    finally:
        for conn in (a, b, c):
            conn.close()


def test_claim_leases_go_by_the_databases_clock_not_the_nodes(pg_index, tmp_path):
    """Node c's clock runs 1000 s ahead (more than the 300 s lease): it still sees node a's fresh
    claims as held and takes none of them (by its own clock, a's leases had run out: both nodes
    delivered the same recipients); a's claims and renewals end at the database's now + lease
    whatever a's clock says."""
    from storage import db
    from storage.outbound import due_and_version, renew

    url, reset = pg_index
    reset()
    a, c = PgConnection.connect(url), PgConnection.connect(url)
    try:
        _queue(a, 4)
        real = time.time()
        with db.transaction(a):
            taken = due_and_version(a, tmp_path, real - 500.0, "[]", 2, 2, "a", 300.0, True)[1]  # a's clock behind
        assert len(taken) == 2
        (until, last) = a.execute(
            "SELECT min(claimed_until), max(claimed_until) FROM outbound WHERE claimed_by = 'a'"
        ).fetchone()
        assert real + 290 < until <= last < time.time() + 310  # the database's now + 300
        with db.transaction(c):
            got = due_and_version(c, tmp_path, real + 1000.0, "[]", 10, 10, "c", 300.0, True)[1]
        assert {r.id for r in got}.isdisjoint(r.id for r in taken) and len(got) == 2  # only the free ones
        with db.transaction(a):
            assert renew(a, [r.id for r in taken], "a", real - 500.0 + 300.0, 300.0) == 2
        (renewed,) = a.execute("SELECT min(claimed_until) FROM outbound WHERE claimed_by = 'a'").fetchone()
        assert renewed >= last
    finally:
        a.close()
        c.close()


def test_claims_are_renewed_by_their_node_and_cleared_by_a_deferral(index, tmp_path):
    from storage import db, outbound

    _queue(index, 3)
    with db.transaction(index):
        rows = outbound.due_and_version(index, tmp_path, 1000.0, "[]", 5, 5, "a", 300.0)[1]
    ids = [r.id for r in rows]
    assert len(ids) == 3
    with db.transaction(index):
        assert outbound.renew(index, ids, "a", 1500.0) == 3
        assert outbound.renew(index, ids, "b", 9000.0) == 0  # not b's
    with db.transaction(index):  # a's renewed leases hold past the first ones' end
        assert outbound.due_and_version(index, tmp_path, 1400.0, "[]", 5, 5, "b", 300.0)[1] == []
    with db.transaction(index):
        outbound.settle(index, [ids[0]], [outbound.Deferral(ids[1], 1000.0, 1, "451 busy", False)], 1001.0)
    with db.transaction(index):  # the deferred row is free for any node at once; ids[2] is still a's
        assert [r.id for r in outbound.due_and_version(index, tmp_path, 1400.0, "[]", 5, 5, "b", 300.0)[1]] == [ids[1]]


def _started_and_waiting(second, watch, waiting: str, outcome: dict, what: str, timeout: float):
    """`second` (a writer's transaction) started on a thread of its own and seen blocked: `waiting`
    (a count of locks not granted, asked on `watch`) above zero while it still runs, not done
    without waiting. Returns the thread."""
    import threading

    thread = threading.Thread(target=second)
    thread.start()
    wait_for(
        lambda: watch.execute(waiting).fetchone()[0] or not thread.is_alive(),
        timeout=timeout,
        message=lambda: f"{what} waiting on a lock: {outcome}",
    )
    assert thread.is_alive(), outcome  # it waits (a lock not granted), not done without waiting
    return thread


def _two_writers_commit_at_once(pg_index, limits: dict, received_at: float, check_after=None) -> dict:
    """Node a's writer commits mail Q1 to beta (Delivery with `limits`) and holds its transaction
    open; node b's writer commits Q2 to beta meanwhile and must wait on beta's advisory lock. Once b
    waits, a commits. Returns b's refusals ({item index: cause}); Q1 alone must be in the mailbox.
    `check_after(conn)` looks at the index afterwards."""

    from storage import sites
    from storage.index_writer import BatchItem, _index_batch
    from storage.records import Delivery, MessageMeta

    url, reset = pg_index
    reset()
    a, b, watch = (PgConnection.connect(url) for _ in range(3))
    try:
        sites.add_site(a, "beta", ["beta@hub.test"], "pw-" * 4, ["hub.test"])
        beta = sites.get_site(a, "beta").id

        def item(queue_id):
            meta = MessageMeta(mail_from="x@hub.test", sender_site=None, dot_lines=False)
            to = [Delivery(beta, "beta@hub.test", **limits)]
            return BatchItem(queue_id, 10, received_at, meta, to, [], None, f"11/{queue_id}", sha256="ab" * 32)

        a.execute("BEGIN")
        assert _index_batch(a, [item("Q1")], []) == {}
        outcome = {}

        def second():
            b.execute("BEGIN")
            outcome["refused"] = _index_batch(b, [item("Q2")], [])
            b.execute("COMMIT")

        waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        thread = _started_and_waiting(second, watch, waiting, outcome, "the second writer", timeout=20)
        a.execute("COMMIT")
        thread.join(20)
        assert watch.execute("SELECT queue_id FROM mailbox").fetchall() == [("Q1",)]
        if check_after is not None:
            check_after(watch)
        return outcome["refused"]
    finally:
        for conn in (a, b, watch):
            conn.close()


def test_two_nodes_never_fill_a_limited_mailbox_past_its_limit_together(pg_index):
    """Two nodes' writers commit a mail each to a mailbox with room for one, at the same time: the
    second waits for the first's commit (an advisory lock per limited mailbox) and then leaves its
    mail out, where both would have read an empty mailbox and both mails gone in."""
    assert _two_writers_commit_at_once(pg_index, {"max_messages": 1}, 1.0) == {0: None}


def test_two_nodes_never_take_a_volume_quota_past_its_limit_together(pg_index):
    """Two nodes' writers commit a mail each to a site with the day's received volume room for one,
    at the same time (each node's ledger had admitted its own, not knowing of the other's): the
    second waits for the first's commit on the site's advisory lock, reads the volume that commit
    left and leaves its mail out, refused for the received volume (zero overshoot)."""
    from storage.errors import REFUSED_RECEIVED

    def one_mail_counted(conn):
        volume = "SELECT received_bytes FROM site_volume WHERE period = '2017-07-14'"
        assert conn.execute(volume).fetchall() == [(10,)]

    limits = {"max_received_day": 15, "max_received_month": 100}
    assert _two_writers_commit_at_once(pg_index, limits, 1.5e9, one_mail_counted) == {0: REFUSED_RECEIVED}


def test_two_leaders_store_a_lifecycle_notice_and_a_directory_update_once(pg_index):
    """Two nodes' writers (two leaders for a moment) commit the same lifecycle notice, each with the
    mark "sent up to here" at its id, at the same time: the second waits on the mark's row, sees it
    moved and leaves its notice out (AlreadyMarked), so the site gets one mail; a later notice is
    stored, an earlier one refused; the directory's marks likewise, claimed by changing them."""

    from storage import lifecycle, sites
    from storage.errors import REFUSED_MARKED, AlreadyMarked, refusal
    from storage.index_writer import BatchItem, _index_batch
    from storage.records import Delivery, MessageMeta

    url, reset = pg_index
    reset()
    a, b, watch = (PgConnection.connect(url) for _ in range(3))
    try:
        sites.add_site(a, "beta", ["beta@hub.test"], "pw-" * 4, ["hub.test"])
        beta = sites.get_site(a, "beta").id

        def notice(queue_id, notice_id):
            meta = MessageMeta(mail_from="", sender_site=None, dot_lines=False)
            to = [Delivery(beta, "beta@hub.test")]
            mark = (lifecycle.NOTICE_MARK, notice_id)
            return BatchItem(queue_id, 10, 1.5e9, meta, to, [], mark, f"11/{queue_id}", sha256="ab" * 32)

        a.execute("BEGIN")
        assert _index_batch(a, [notice("Q1", 5)], []) == {}
        outcome = {}

        def second():
            b.execute("BEGIN")
            outcome["refused"] = _index_batch(b, [notice("Q2", 5)], [])
            b.execute("COMMIT")

        waiting = "SELECT count(*) FROM pg_locks WHERE NOT granted"
        thread = _started_and_waiting(second, watch, waiting, outcome, "the second writer", timeout=20)
        a.execute("COMMIT")
        thread.join(20)
        assert outcome == {"refused": {0: REFUSED_MARKED}}
        assert isinstance(refusal(REFUSED_MARKED), AlreadyMarked)
        assert watch.execute("SELECT queue_id FROM mailbox").fetchall() == [("Q1",)]
        b.execute("BEGIN")  # in one batch: the next notice is stored, one already past the mark is not
        assert _index_batch(b, [notice("Q3", 6), notice("Q4", 4)], []) == {1: REFUSED_MARKED}
        b.execute("COMMIT")
        assert watch.execute("SELECT queue_id FROM mailbox ORDER BY queue_id").fetchall() == [("Q1",), ("Q3",)]
        assert watch.execute("SELECT value FROM meta WHERE key = ?", (lifecycle.NOTICE_MARK,)).fetchone() == (6,)
        # the directory's marks (a version, a hub key's stamp: no counter) are claimed by changing them:
        # the same update or announcement twice is left out, another value (lower too) is stored
        b.execute("BEGIN")
        stamps = [notice("Q5", 9), notice("Q6", 2), notice("Q7", 2)]
        for stamp in stamps:
            stamp.mark = ("hub_key_announced", stamp.mark[1])
        assert _index_batch(b, stamps, []) == {2: REFUSED_MARKED}
        b.execute("COMMIT")
        assert watch.execute("SELECT value FROM meta WHERE key = 'hub_key_announced'").fetchone() == (2,)
        a.execute("BEGIN")  # two leaders' directory updates of one version at once: one stored
        update = notice("Q8", 3)
        update.mark = ("directory_sent_version", 3)
        assert _index_batch(a, [update], []) == {}
        outcome.clear()
        again = notice("Q9", 3)
        again.mark = ("directory_sent_version", 3)

        def second_update():
            b.execute("BEGIN")
            outcome["refused"] = _index_batch(b, [again], [])
            b.execute("COMMIT")

        thread = _started_and_waiting(second_update, watch, waiting, outcome, "the second directory update", timeout=40)
        a.execute("COMMIT")
        thread.join(20)
        assert outcome == {"refused": {0: REFUSED_MARKED}}
        assert watch.execute("SELECT count(*) FROM mailbox WHERE queue_id IN ('Q8', 'Q9')").fetchone() == (1,)
    finally:
        for conn in (a, b, watch):
            conn.close()


def test_the_ledger_reads_the_index_figures_again_and_keeps_its_live_counts():
    """After a gap in other nodes' reports: held, waiting and volumes from the index again;
    reservations, downloads and polls stay."""
    from quotas.ledger import Ledger

    ledger = Ledger()
    ledger.load([(2, 1, 100, 1, 100, 1)], {(1, "2026-12-07"): (100, 0)}, {2: (5000, 10.0)}, 100.0, 20.0)
    ledger.committed(1, [2], 50, 1.7e9)  # heard; then a gap in which node B deleted everything
    ledger.reserve("t", 2, 1, 30)
    ledger.note_download(2, 700, 101.0)
    ledger.resync([(2, 1, 0, 0, 0, 0)], {})
    assert ledger.held(2) == (0, 0)
    assert ledger.waiting(2) == {1: 30}  # the reservation only
    assert ledger.downloaded(2) == 5700 and ledger.last_poll(2) == 101.0


def test_asking_every_node_gathers_split_answers_and_names_the_silent_ones(pg_url):
    """ask_nodes (`mailhub sessions --all`): node a's 500 rows come back whole over several
    payloads; a node whose link is there but does not answer is named; questions are bounded."""
    from storage.postgres.cluster import ANSWERS_PER_SECOND, ask_nodes

    rows = [{"protocol": "pop3", "site": f"site-{i}", "client": "192.0.2.1", "command": "STAT"} for i in range(500)]
    ghost = psycopg.connect(pg_url, autocommit=True, application_name="mailhub cluster link ghost")

    async def main():
        a = link(pg_url, "a")
        a.answers["sessions"] = lambda _: rows
        await a.start()
        try:
            loop = asyncio.get_running_loop()
            answers, missing = await loop.run_in_executor(None, lambda: ask_nodes(pg_url, "sessions", timeout=2.0))
            assert answers == {"a": rows} and missing == ["ghost"]
            with psycopg.connect(pg_url, autocommit=True) as other:  # not ours: no answer, no harm
                other.execute("SELECT pg_notify('mailhub_ask', %s)", ('{"q": "sessions", "r": "elsewhere"}',))
            # a flood of questions: at most ANSWERS_PER_SECOND answered in a second
            asked = ANSWERS_PER_SECOND + 3
            with psycopg.connect(pg_url, autocommit=True) as other:
                other.execute("LISTEN mailhub_reply_00000000000000ff")
                for _ in range(asked):
                    other.execute(
                        "SELECT pg_notify('mailhub_ask', %s)",
                        ('{"q": "sessions", "r": "mailhub_reply_00000000000000ff"}',),
                    )
                await asyncio.sleep(0.5)  # time-based: the answers of the flood's first second
                got = await loop.run_in_executor(None, lambda: list(other.notifies(timeout=1.0)))
            answered = {json.loads(n.payload)["of"] for n in got}
            assert len(got) == ANSWERS_PER_SECOND * answered.pop() and not answered
        finally:
            await a.close()

    try:
        asyncio.run(main())
    finally:
        ghost.close()


def test_a_mailbox_lock_is_never_taken_twice_on_one_link_and_always_let_go(pg_url):
    """Session advisory locks are reentrant on one connection: a second try_lock of a mailbox the
    node holds is refused (it was granted, and one unlock left the lock held for good); an unlock
    while the try_lock is still queued lets it go after; an unlock of a lock never taken sends
    nothing (PostgreSQL would warn 'you don't own a lock')."""

    async def main():
        a, b = link(pg_url, "a"), link(pg_url, "b")
        await a.start()
        await b.start()
        try:
            assert await a.try_lock(5)
            assert not await a.try_lock(5)  # re-entered: refused and given back at once
            a.unlock(5)
            await until(  # the one unlock freed it
                lambda: b.try_lock(5), timeout=20.0, interval=0.05, message="node b takes mailbox 5"
            )
            taking = asyncio.ensure_future(a.try_lock(6))
            await asyncio.sleep(0)  # one turn of the loop: the try_lock is sent, not yet answered
            a.unlock(6)  # while the try_lock is queued
            assert await taking
            await until(lambda: b.try_lock(6), timeout=20.0, interval=0.05, message="node b takes mailbox 6")
            assert a.held == set() and b.held == {5, 6}
            a.unlock(9)  # never taken
            assert not a._commands
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_a_hostile_payloads_figures_are_refused_or_bounded():
    """Any database user may NOTIFY: ids must be positive int4, sizes 0..1 TiB, no NaN/Infinity;
    a commit's time days ahead of this node's clock is taken as now (a time years ahead emptied the
    ledger's volume periods, a huge or negative size filled or emptied a mailbox's usage)."""
    now = 1.8e9
    for bad in [
        '{"n":"x","c":[[1,[2],-5,1.8e9]]}',  # negative size
        '{"n":"x","c":[[1,[2],1099511627777,1.8e9]]}',  # over 1 TiB
        '{"n":"x","c":[[1,[0],5,1.8e9]]}',  # site 0
        '{"n":"x","c":[[1,[2147483648],5,1.8e9]]}',  # beyond int4
        '{"n":"x","c":[[1,[2],5,NaN]]}',
        '{"n":"x","c":[[1,[2],5,Infinity]]}',
        '{"n":"x","c":[[1,[2],5,true]]}',
        '{"n":"x","c":[[1,[2],5,-1.0]]}',
        '{"n":"x","d":[[1,-100]]}',
        '{"n":"x","d":[[-1,100]]}',
        '{"n":"x","f":[[1,0,null,5]]}',
        '{"n":"x","r":[[1,3,null,-1,true]]}',
        '{"n":"x","p":[true]}',
    ]:
        with pytest.raises(cluster_events.BadPayload):
            cluster_events.decode(bad, now=now)
    far = cluster_events.decode('{"n":"x","c":[[1,[2],5,4.1e9],[null,[2],6,1.8e9],[3,[2],7,1.5e9]]}', now=now)
    assert far.committed == [(1, [2], 5, now), (None, [2], 6, 1.8e9), (3, [2], 7, 1.5e9)]  # old: kept
    ok = cluster_events.decode('{"n":"x","d":[[2147483647,1099511627776]],"r":[[1,3,null,0,false]]}', now=now)
    assert ok.downloaded == [(2147483647, 2**40)] and ok.removed == [(1, 3, None, 0, False)]


def test_a_flood_past_the_queue_bound_catches_up_at_most_once_a_period():
    """Rows beyond MAX_QUEUED_CHANGES are dropped and counted, and the node catches up from the
    index - a costly read - at most once per `missed_every` however long the flood lasts (each
    flood scheduled a catch-up of its own)."""
    from storage.postgres.cluster import MAX_QUEUED_CHANGES

    async def main():
        node = ClusterLink("postgresql://unused@127.0.0.1:1/none", "b")  # receiving alone: no connection
        node.missed_every = 1.0
        caught_up = []
        node.on_missed = lambda _: caught_up.append(time.monotonic())
        texts = cluster_events.payloads(Changes("hostile", polled=[7] * 3000))
        rows = 0

        def flood():
            nonlocal rows
            for _ in range(MAX_QUEUED_CHANGES // 3000 + 2):  # in one go: nothing delivered between
                for text in texts:
                    node._on_notify(psycopg.Notify(cluster_events.CHANNEL, text, 0))
                    rows += 3000

        flood()
        await until(lambda: len(caught_up) == 1, timeout=20.0, message="a first catch-up")
        for _ in range(3):
            flood()
            await asyncio.sleep(0)  # one turn of the loop between floods: the pacing under test
        await until(lambda: len(caught_up) == 2, timeout=20.0, message="a second catch-up")
        assert caught_up[1] - caught_up[0] >= 0.9
        assert node.received == rows and 0 < node.dropped < rows
        assert node._queued_rows == 0  # the rows kept were delivered (no listeners here)

    asyncio.run(main())


def test_two_leaders_expiring_one_entry_at_once_expire_it_once(pg_index):
    """The old leader's expiry round still runs when the new leader's starts (it notices the lost
    link seconds later): both transactions pick the same unfetched entry. The second waits for the
    first and then skips it - one expired event, one audit row, one notice to the sender (both
    counted it and the sender got two notices)."""
    import threading

    from storage import db, lifecycle

    url, reset = pg_index
    reset()
    a, b = PgConnection.connect(url), PgConnection.connect(url)
    try:
        with db.transaction(a):
            a.execute("INSERT INTO sites (id, name, password_hash, created_at) VALUES (1, 'alpha', 'x', 0)")
            a.execute(
                "INSERT INTO messages (queue_id, blob, size, sha256, dot_lines, received_at, mail_from, refs)"
                " VALUES ('Q1', 'b/Q1', 10, 'x', 0, 1, 'gw@far.test', 1)"
            )
            a.execute(
                "INSERT INTO mailbox (site_id, queue_id, rcpt, delivered_at) VALUES (1, 'Q1', 'alpha@hub.test', 1)"
            )
            (uid,) = a.execute("SELECT uid FROM mailbox").fetchone()
        group = lifecycle.ExpiryGroup(1, "alpha", "gw@far.test", None, [uid], 7.0)
        (b_pid,) = b.execute("SELECT pg_backend_pid()").fetchone()
        a.execute("BEGIN")
        first = lifecycle.expire(a, 1000.0, [group])
        second: list = []
        b_done = threading.Event()

        def other_leader():
            with db.transaction(b):
                second.append(lifecycle.expire(b, 1000.5, [group]))
            b_done.set()

        thread = threading.Thread(target=other_leader)
        thread.start()
        with psycopg.connect(url, autocommit=True) as watcher:  # b waits on a's row (to read it, or to delete it)
            wait_for(
                lambda: watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'", (b_pid,)
                ).fetchone()[0],
                timeout=30,
                message="b waiting for a's row lock",
            )
        a.execute("COMMIT")
        thread.join(timeout=30)
        assert b_done.is_set()
        assert first[1]["mails"] == 1 and first[1]["notices"] == 1
        assert second[0][0] == [] and second[0][1]["mails"] == 0 and second[0][1]["notices"] == 0
        assert a.execute("SELECT count(*) FROM lifecycle_notices").fetchone()[0] == 1
        assert a.execute("SELECT count(*) FROM audit WHERE event = 'expired'").fetchone()[0] == 1
    finally:
        a.close()
        b.close()
