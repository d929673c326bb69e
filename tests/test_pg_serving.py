# The hub serving from PostgreSQL (storage.index, issue 27): what only PostgreSQL has. The URL is
# checked and never shown with its password (errors, config show, the writer's command line, logs);
# the index writer runs a transaction again after a serialization failure or a lost connection
# (never half of one; a COMMIT whose answer was lost is looked up, never done twice); a server that
# refuses connections gets 451 4.3.0 at SMTP and the hub serves again once it is back; the commands
# that work on the SQLite file refuse with one line naming PostgreSQL's tool. The protocol tests
# themselves run on PostgreSQL too: the modules marked both_engines (tests/conftest.py).
import concurrent.futures
import imaplib
import os
import poplib
import smtplib
import sqlite3
import threading
from pathlib import Path

import pytest

from mailhub import config, config_show
from storage import events, sites, sql
from storage.errors import CommitUnknown, StorageError
from storage.index_writer import RETRIES, BatchItem, IndexWriter, _index_batch
from storage.postgres.connection import PgConnection
from storage.records import Delivery, MessageMeta

from conftest import ALPHA_BETA, PASSWORD, make_message, wait_for

SECRET = "Pa55-w0rd-never-shown"


def test_storage_index_takes_only_postgresql_urls_and_never_shows_the_password():
    for value in (
        f"mysql://u:{SECRET}@db.test/mailhub",
        f"postgresql://u:{SECRET}@db.test:port/mailhub",
        f"postgresql://u:{SECRET}@db.test/",
        "index.sqlite3",
    ):
        with pytest.raises(config.ConfigError) as raised:
            config.load(environ={"MAILHUB_STORAGE_INDEX": value})
        text = str(raised.value)
        assert text.startswith("storage.index: ") and "(from MAILHUB_STORAGE_INDEX)" in text, text
        assert SECRET not in text and "\n" not in text, text
    url = f"postgresql://mailhub:{SECRET}@db.test:5432/mailhub?sslmode=require&password={SECRET}"
    cfg = config.load(environ={"MAILHUB_STORAGE_INDEX": url})
    shown = "postgresql://mailhub@db.test:5432/mailhub?sslmode=require"
    assert cfg.storage.index == url and cfg.index_location.where() == shown
    assert SECRET not in repr(cfg)
    assert {row["key"]: row["value"] for row in config_show.rows(cfg)}["storage.index"] == shown
    assert config.load(environ={}).index_location.engine == "sqlite"


@pytest.fixture
def pg_writer(pg_index, tmp_path):
    url, reset = pg_index
    reset()
    writer = IndexWriter(tmp_path, 0.0, url)
    yield writer
    writer.close()


def _fail_with(conn, sqlstate: str) -> None:
    conn.execute(f"DO $$ BEGIN RAISE EXCEPTION 'made to fail' USING ERRCODE = '{sqlstate}'; END $$")


def _events(conn, queue_id: str) -> int:
    return conn.execute("SELECT count(*) FROM events WHERE queue_id = ?", (queue_id,)).fetchone()[0]


def _event(queue_id: str) -> tuple:
    return events.row(events.Event(1.0, events.REFUSED, queue_id, "alpha"))


@pytest.mark.postgresql
@pytest.mark.parametrize("sqlstate", ["40001", "40P01"])  # serialization failure, deadlock
def test_a_transaction_is_run_again_after_a_transient_failure_and_kept_once(pg_writer, sqlstate):
    tries = []

    def body(conn):
        tries.append(1)
        conn.execute(events.INSERT, _event("RETRIED"))
        if len(tries) < 3:
            _fail_with(conn, sqlstate)
        return len(tries)

    assert pg_writer.in_transaction(body) == 3
    assert _events(pg_writer.conn, "RETRIED") == 1  # the failed tries left nothing


@pytest.mark.postgresql
def test_two_writers_in_a_real_deadlock_both_commit(pg_writer, pg_index, tmp_path):
    """Two index writers (as two nodes have) lock two rows in opposite orders: PostgreSQL ends one
    transaction with a deadlock (after deadlock_timeout, 1 s), that writer runs it again, both commit."""
    other = IndexWriter(tmp_path / "other", 0.0, pg_index[0])
    try:
        pg_writer.in_transaction(
            lambda c: c.executemany("INSERT INTO meta (key, value) VALUES (?, 0)", [("deadlock_a",), ("deadlock_b",)])
        )
        both_hold_one = threading.Barrier(2, timeout=30)
        tries = {"a": 0, "b": 0}

        def body(conn, first, second, name):
            tries[name] += 1
            conn.execute("UPDATE meta SET value = value + 1 WHERE key = ?", (first,))
            if tries[name] == 1:
                both_hold_one.wait()  # each holds its first row: the second update waits on the other
            conn.execute("UPDATE meta SET value = value + 1 WHERE key = ?", (second,))

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            done = [
                pool.submit(pg_writer.in_transaction, body, "deadlock_a", "deadlock_b", "a"),
                pool.submit(other.in_transaction, body, "deadlock_b", "deadlock_a", "b"),
            ]
            for future in done:
                future.result(timeout=60)
        assert sorted(tries.values()) == [1, 2]  # one was chosen as the victim and ran again
        values = pg_writer.conn.execute("SELECT key, value FROM meta WHERE key LIKE 'deadlock_%' ORDER BY key")
        assert values.fetchall() == [("deadlock_a", 2), ("deadlock_b", 2)]  # each update counted once
    finally:
        other.close()


@pytest.mark.postgresql
def test_a_transaction_that_keeps_failing_is_given_up_with_nothing_kept(pg_writer):
    tries = []

    def body(conn):
        tries.append(1)
        conn.execute(events.INSERT, _event("GIVEN-UP"))
        _fail_with(conn, "40001")

    with pytest.raises(StorageError, match=rf"tried {RETRIES + 1} times"):
        pg_writer.in_transaction(body)
    assert len(tries) == RETRIES + 1
    assert _events(pg_writer.conn, "GIVEN-UP") == 0
    with pytest.raises(sqlite3.IntegrityError):  # not transient: not run again
        pg_writer.in_transaction(lambda conn: _fail_with(conn, "23505"))


@pytest.mark.postgresql
def test_a_transaction_whose_connection_was_ended_is_run_again_on_a_new_one(pg_writer):
    first = pg_writer.conn
    tries = []

    def body(conn):
        tries.append(1)
        if len(tries) == 1:  # the server ends the session (as a restart or pg_terminate_backend does)
            conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        conn.execute(events.INSERT, _event("RECONNECTED"))

    pg_writer.in_transaction(body)
    assert len(tries) == 2 and pg_writer.conn is not first
    assert _events(pg_writer.conn, "RECONNECTED") == 1


class _LosesCommitAnswer:
    """The writer's PgConnection, whose next COMMIT is carried out by the server and then the
    connection is lost before the answer arrives (the one case where whether it took is unknown)."""

    def __init__(self, conn):
        self.inner, self.raw, self.dialect = conn, conn.raw, conn.dialect

    def execute(self, sql, parameters=()):
        if sql == "COMMIT":
            self.inner.execute(sql)
            self.raw.close()
            raise sqlite3.OperationalError("server closed the connection unexpectedly")
        return self.inner.execute(sql, parameters)

    def executemany(self, sql, parameters):
        return self.inner.executemany(sql, parameters)

    def rows(self, *args):
        return self.inner.rows(*args)

    @property
    def in_transaction(self):
        return self.inner.in_transaction

    def close(self):
        self.inner.close()


def _mail_to(site, queue_id: str) -> BatchItem:
    """A mail to `site` from a peer network (no sending site: no sender's counters shared)."""
    meta = MessageMeta(mail_from="a@peer.test", sender_site=None, dot_lines=False, message_id=f"<{queue_id}@hub.test>")
    item = BatchItem(
        queue_id, 100, 1.0, meta, [Delivery(site.id, site.addresses[0], site.name)], [], None, f"h/{queue_id}"
    )
    item.sha256 = "ab" * 32
    return item


@pytest.mark.postgresql
def test_a_second_writer_takes_no_uid_of_a_site_before_the_first_one_committed(pg_writer, pg_index):
    """IMAP: UIDs of a mailbox become visible in their order. Writer A (a node) delivers to alpha and
    has not committed; writer B's delivery to alpha waits for alpha's UID counter row BEFORE it takes
    a UID, so B's UID is above A's and appears after it (a UID taken first and committed later would
    show a client UID 3 after it saw UID 4)."""
    alpha = sites.add_site(pg_writer.conn, "alpha", ["alpha@hub.test"], PASSWORD, ["hub.test"])
    a, b = PgConnection.connect(pg_index[0]), PgConnection.connect(pg_index[0])
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        a.execute("BEGIN")
        _index_batch(a, [_mail_to(alpha, "QA")], [])
        (uid_a,) = a.execute("SELECT uid FROM mailbox WHERE queue_id = 'QA'").fetchone()
        b_pid = b.execute("SELECT pg_backend_pid()").fetchone()[0]

        def deliver_b():
            b.execute("BEGIN")
            _index_batch(b, [_mail_to(alpha, "QB")], [])
            b.execute("COMMIT")

        done = pool.submit(deliver_b)
        wait_for(
            lambda: pg_writer.conn.execute(
                "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = ?", (b_pid,)
            ).fetchone()[0],
            timeout=30,
            message="B waiting for alpha's UID counter row",
        )
        high = pg_writer.conn.execute(sql.id_high_water(pg_writer.conn, "mailbox", "uid")).fetchone()[0]
        assert high == uid_a  # B waits without a UID
        a.execute("COMMIT")
        done.result(timeout=30)
        uids = pg_writer.conn.execute("SELECT queue_id, uid FROM mailbox ORDER BY uid").fetchall()
        assert [q for q, _ in uids] == ["QA", "QB"] and uids[1][1] > uid_a
    finally:
        a.close()  # (a failure above: A's transaction ends here, so B's ends too)
        pool.shutdown(wait=True)
        b.close()


@pytest.mark.postgresql
def test_a_commit_whose_answer_was_lost_is_looked_up_never_done_twice(pg_writer):
    site = sites.add_site(pg_writer.conn, "alpha", ["alpha@hub.test"], PASSWORD, ["hub.test"])
    item = _mail_to(site, "QLOST")
    seq = pg_writer.seq + 1
    pg_writer.conn = _LosesCommitAnswer(pg_writer.conn)
    # a group commit: its `commits` row says it took; the senders get their 250, nothing is redone
    assert pg_writer.commit_batch([item], [], seq, 77) == ["ab" * 32]
    conn = pg_writer.conn
    assert not isinstance(conn, _LosesCommitAnswer) and pg_writer.seq == seq
    assert conn.execute("SELECT count(*) FROM messages WHERE queue_id = 'QLOST'").fetchone()[0] == 1
    assert conn.execute("SELECT count(*) FROM mailbox").fetchone()[0] == 1
    # anything else: reported unknown (the hub acknowledges nothing), never run a second time
    pg_writer.conn = _LosesCommitAnswer(conn)
    with pytest.raises(CommitUnknown, match="whether it took is unknown"):
        pg_writer.in_transaction(lambda c: c.execute(events.INSERT, _event("ONCE")))
    pg_writer.reconnect_if_lost()  # (as the writer process does before its next request)
    assert _events(pg_writer.conn, "ONCE") == 1


def _send(hub, n: int) -> None:
    with smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30) as client:
        client.login("alpha", PASSWORD)
        client.sendmail("alpha@hub.test", ["beta@hub.test"], make_message(3000, subject=f"mail {n}"))


def _end_sessions(postgres_server, url: str) -> None:
    """Every session of the hub's database ended by the server, as a restart does."""
    database = url.rsplit("/", 1)[1]
    postgres_server.admin(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        f" WHERE datname = '{database}' AND pid <> pg_backend_pid()"
    )


def _pop3_messages(hub) -> list[bytes]:
    """beta's mails over POP3 (a login refused while the node's cluster link reconnects is tried again)."""

    def login():
        client = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=30)
        try:
            client.user("beta")
            client.pass_(PASSWORD)
            return client
        except poplib.error_proto:
            client.quit()
            return None

    client = wait_for(login, timeout=30, interval=0.2, message="beta's POP3 login")
    try:
        count = len(client.list()[1])
        return [b"\r\n".join(client.retr(i)[1]) for i in range(1, count + 1)]
    finally:
        client.quit()


@pytest.mark.postgresql
def test_a_hub_on_postgresql_serves_on_after_the_server_ended_its_sessions_and_after_an_outage(
    make_hub, pg_index, postgres_server
):
    url, reset = pg_index
    reset()
    user, rest = url.split("://", 1)[1].split("@", 1)
    with_secret = f"postgresql://{user}:{SECRET}@{rest}"  # (the test server trusts this user)
    hub = make_hub(ALPHA_BETA, MAILHUB_STORAGE_INDEX=with_secret).start()
    writer_pid = hub._hub.storage._writer.pid
    assert SECRET not in Path(f"/proc/{writer_pid}/cmdline").read_text()
    assert not (hub.data_dir / "index.sqlite3").exists()
    _send(hub, 1)
    _end_sessions(postgres_server, url)
    _send(hub, 2)  # the writer connects again and runs the commit again: 250
    assert len(_pop3_messages(hub)) == 2  # the readers connect again too

    database = url.rsplit("/", 1)[1]
    postgres_server.admin(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
    try:
        _end_sessions(postgres_server, url)
        with pytest.raises(smtplib.SMTPDataError) as refused:
            _send(hub, 3)
        assert refused.value.smtp_code == 451 and refused.value.smtp_error.startswith(b"4.3.0"), refused.value
        imap = imaplib.IMAP4("127.0.0.1", hub.ports["imap"], timeout=30)
        imap.login("beta", PASSWORD)
        with pytest.raises(imaplib.IMAP4.abort, match="mailbox index unavailable, try again later"):
            imap.select("INBOX")  # the session ends with one BYE, not a traceback
    finally:
        postgres_server.admin(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
    assert "cannot connect to the index at postgresql://" in hub.log_text()
    log_text = hub.log_text()
    assert "the mailbox index cannot be read" in log_text
    assert "Traceback" not in log_text, log_text[log_text.find("Traceback") - 300 :][:3000]
    _send(hub, 4)  # the server is back: served again without a restart
    fetched = _pop3_messages(hub)
    assert [m for m in fetched if b"Subject: mail 3" in m] == [] and len(fetched) == 3
    conn = hub.db()
    try:
        assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 3
    finally:
        conn.close()
    assert SECRET not in hub.log_text()


@pytest.mark.postgresql
def test_the_commands_for_the_sqlite_file_refuse_a_postgresql_index_in_one_line(make_hub, pg_index, tmp_path):
    url, reset = pg_index
    reset()
    user, rest = url.split("://", 1)[1].split("@", 1)
    hub = make_hub(MAILHUB_STORAGE_INDEX=f"postgresql://{user}:{SECRET}@{rest}")
    for args, tool in (
        (("storage", "rebuild-index"), "pg_dump"),
        (("storage", "backup", str(tmp_path / "backup")), "pg_dump"),
        (("storage", "migrate", url), "pg_dump"),
    ):
        result = hub.cli(*args, check=False)
        assert result.returncode == 2, (args, result.stderr)
        line = result.stderr.strip()
        assert "\n" not in line and tool in line and "SQLite index file only" in line, line
        assert SECRET not in result.stderr + result.stdout and "Traceback" not in result.stderr
    # what works on any index works on PostgreSQL, beside the running hub
    hub.add_site("alpha")
    hub.add_site("beta")
    hub.start()
    _send(hub, 1)
    ((queue_id,),) = hub.query("SELECT queue_id FROM messages")
    assert "beta" in hub.cli("site", "list").stdout and "1 mails" in hub.cli("site", "list").stdout
    assert queue_id in hub.cli("trace", queue_id).stdout
    assert queue_id in hub.cli("audit", "--site", "beta").stdout
    assert "alpha" in hub.cli("stats").stdout
    assert "index         ok: 1 mail(s)" in hub.cli("storage", "check").stdout
    assert "1 mail(s)" in hub.cli("storage", "verify", "--quiet").stdout
    assert "no damaged mails known" in hub.cli("storage", "damaged").stdout


@pytest.mark.postgresql
def test_check_warns_of_an_index_it_cannot_reach_or_that_is_too_new(pg_url, tmp_path):
    from mailhub.check import WARNING, index_problems

    def problems(url: str):
        return index_problems(config.load(environ={"MAILHUB_DATA_DIR": str(tmp_path), "MAILHUB_STORAGE_INDEX": url}))

    ((level, text),) = [(f.level, f.text) for f in problems(f"postgresql://mailhub:{SECRET}@127.0.0.1:1/mailhub")]
    assert level == WARNING and text.startswith("storage.index: cannot connect to the index at postgresql://mailhub@")
    assert SECRET not in text and "\n" not in text
    assert problems(pg_url) == []  # reachable (migrated at the hub's start)
    conn = PgConnection.connect(pg_url)
    try:
        conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL)")
        conn.execute("INSERT INTO schema_migrations VALUES (999, 'from_the_future')")
    finally:
        conn.close()
    ((level, text),) = [(f.level, f.text) for f in problems(pg_url)]
    assert level == WARNING and "schema version 999, newer than this hub knows" in text


@pytest.mark.postgresql
def test_a_schema_that_cannot_be_migrated_stops_the_start_in_one_line(postgres_server, pg_url, tmp_path):
    from storage.index import IndexLocation

    role = f"nocreate_{os.getpid()}"
    postgres_server.admin(f"CREATE ROLE {role} LOGIN")  # (trusted on the test server; PUBLIC may not create)
    try:
        url = pg_url.replace("://mailhub@", f"://{role}:{SECRET}@")
        with pytest.raises(StorageError) as raised:
            IndexLocation(tmp_path, url).prepare()
        text = str(raised.value)
        assert text.startswith("cannot migrate the index at postgresql://") and "permission denied" in text, text
        assert SECRET not in text and "\n" not in text
    finally:
        postgres_server.admin(f"DROP ROLE {role}")


class _CommitStillRunning(_LosesCommitAnswer):
    """The writer's PgConnection whose COMMIT reaches the server and is still being carried out there
    (a deferred trigger waits; in production: a synchronous standby's answer, a slow disk) when the
    connection breaks on the writer's side: the transaction may still commit after any lookup."""

    def execute(self, sql, parameters=()):
        if sql == "COMMIT":
            self.raw.pgconn.send_query(b"COMMIT")
            self.raw.pgconn.flush()
            self.raw.close()  # (the server's backend, busy in its COMMIT, notices nothing of it)
            raise sqlite3.OperationalError("server closed the connection unexpectedly")
        return self.inner.execute(sql, parameters)


@pytest.mark.postgresql
def test_a_lost_commit_still_running_on_the_server_is_never_taken_for_one_that_failed(pg_writer, pg_index):
    """The answer to a group commit's COMMIT is lost while the server is still carrying it out. Its
    `commits` row is not there yet; redoing the batch (the first try then committing too) found the
    mails' rows taken and failed - the hub removed the files of mails the index holds. The old session
    must be over (ended by the writer) before the lookup decides: one commit, or CommitUnknown."""
    site = sites.add_site(pg_writer.conn, "alpha", ["alpha@hub.test"], PASSWORD, ["hub.test"])
    item = _mail_to(site, "QSLOW")
    seq = pg_writer.seq + 1
    holder = PgConnection.connect(pg_index[0])
    pid = pg_writer.conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    holder.execute(
        "CREATE FUNCTION test_hold_commit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        f" IF pg_backend_pid() = {int(pid)} THEN PERFORM pg_advisory_xact_lock(4242); END IF; RETURN NULL; END $$"
    )
    holder.execute(
        "CREATE CONSTRAINT TRIGGER test_hold_commit AFTER INSERT ON commits DEFERRABLE INITIALLY DEFERRED"
        " FOR EACH ROW EXECUTE FUNCTION test_hold_commit()"
    )
    holder.execute("SELECT pg_advisory_lock(4242)")
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        pg_writer.conn = _CommitStillRunning(pg_writer.conn)
        outcome = pool.submit(pg_writer.commit_batch, [item], [], seq, 78)
        try:
            outcome.result(timeout=5)
        except concurrent.futures.TimeoutError:
            pass  # (without the fix: the redo waits on the first try's rows)
        holder.execute("SELECT pg_advisory_unlock(4242)")  # the first try's COMMIT may now end
        try:
            digests = outcome.result(timeout=30)
        except CommitUnknown:
            digests = None  # the hub keeps the files and acknowledges nothing: allowed
        count = holder.execute("SELECT count(*) FROM messages WHERE queue_id = 'QSLOW'").fetchone()[0]
        commits = holder.execute("SELECT count(*) FROM commits WHERE seq = ?", (seq,)).fetchone()[0]
        if digests is not None:
            assert digests == ["ab" * 32] and count == 1 and commits == 1
        wait_for(
            lambda: holder.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ?", (pid,)).fetchone()[0] == 0,
            timeout=30,
            message="the first session over",
        )
        assert holder.execute("SELECT count(*) FROM messages WHERE queue_id = 'QSLOW'").fetchone()[0] == (
            1 if digests is not None else count
        )
    finally:
        holder.execute("DROP TRIGGER test_hold_commit ON commits")
        holder.execute("DROP FUNCTION test_hold_commit()")
        holder.close()
        pool.shutdown(wait=True)


@pytest.mark.postgresql
def test_the_writer_waits_for_the_disk_and_not_forever_on_another_nodes_lock(pg_index, tmp_path, monkeypatch):
    """A database whose synchronous_commit is off answered COMMIT before the WAL was flushed (a crash
    of PostgreSQL lost mail acknowledged with 250): the writer's session sets it on. A UID counter row
    another node's transaction holds (that node stopped, cut off) is waited for LOCK_TIMEOUT at most:
    the writer hung, and every SMTP session of the node with it; now the commit fails (451), nothing kept."""
    from storage import index_writer

    url, reset = pg_index
    reset()
    monkeypatch.setattr(index_writer, "LOCK_TIMEOUT", 0.2)
    monkeypatch.setattr(index_writer, "RETRY_PAUSE", 0.01)
    holder = PgConnection.connect(url)
    database = holder.execute("SELECT current_database()").fetchone()[0]
    holder.execute(f'ALTER DATABASE "{database}" SET synchronous_commit = off')
    try:
        writer = IndexWriter(tmp_path, 0.0, url)
        try:
            assert writer.conn.execute("SHOW synchronous_commit").fetchone()[0] == "on"
            assert writer.conn.execute("SHOW idle_in_transaction_session_timeout").fetchone()[0] == "1min"
            site = sites.add_site(writer.conn, "alpha", ["alpha@hub.test"], PASSWORD, ["hub.test"])
            holder.execute(
                "INSERT INTO imap_uid_next (site_id, uid_next) VALUES (?, 1) ON CONFLICT DO NOTHING", (site.id,)
            )
            holder.execute("BEGIN")
            holder.execute("SELECT 1 FROM imap_uid_next WHERE site_id = ? FOR UPDATE", (site.id,))
            pool = concurrent.futures.ThreadPoolExecutor(1)
            try:
                outcome = pool.submit(writer.commit_batch, [_mail_to(site, "QWAIT")], [], writer.seq + 1, 5)
                with pytest.raises(StorageError, match="lock timeout"):
                    outcome.result(timeout=30)
            finally:
                holder.execute("ROLLBACK")
                pool.shutdown(wait=True)
            assert holder.execute("SELECT count(*) FROM messages WHERE queue_id = 'QWAIT'").fetchone()[0] == 0
        finally:
            writer.close()
    finally:
        holder.execute(f'ALTER DATABASE "{database}" RESET synchronous_commit')
        holder.close()


@pytest.mark.postgresql
def test_a_read_stuck_behind_a_lock_is_cancelled_and_frees_its_pool_thread(pg_index, tmp_path, monkeypatch):
    """The event loop's reads run on POOL_SIZE pooled connections: a read waiting on a lock (a table
    locked by hand, a VACUUM FULL) waited forever, and POOL_SIZE of them stopped every session's reads.
    The server cancels it after STATEMENT_TIMEOUT; the session gets a temporary error; the pool serves on."""
    import asyncio

    from storage import index_reader
    from storage.index import IndexLocation

    url, reset = pg_index
    reset()
    monkeypatch.setattr(index_reader, "STATEMENT_TIMEOUT", 0.3)
    holder = PgConnection.connect(url)

    async def scenario():
        reader = await index_reader.open_reader(IndexLocation(tmp_path, url))
        try:
            holder.execute("BEGIN")
            holder.execute("LOCK TABLE mailbox IN ACCESS EXCLUSIVE MODE")
            try:
                reads = [reader.fetchall("SELECT count(*) FROM mailbox") for _ in range(index_reader.POOL_SIZE + 1)]
                results = await asyncio.wait_for(asyncio.gather(*reads, return_exceptions=True), timeout=30)
            finally:
                holder.execute("ROLLBACK")
            assert all(isinstance(r, sqlite3.OperationalError) and "statement timeout" in str(r) for r in results)
            assert await reader.fetchall("SELECT count(*) FROM mailbox") == [(0,)]
        finally:
            await reader.close()

    try:
        asyncio.run(scenario())
    finally:
        holder.close()


def test_a_password_with_a_slash_question_mark_or_hash_left_unencoded_is_never_shown():
    """A generated password often holds '/', '?' or '#': left as it is in the URL (not percent-encoded),
    urlsplit ends the user part there - the configuration's one-line error showed the password, whole
    or its first part ('postgresql://u:pa/ss@host/db', 'postgresql://u:pa'). Now it says what to do."""
    from storage.index_url import _secrets, redacted

    for password in ("Xq7k/Zr9w", "Xq7k?Zr9w", "Xq7k#Zr9w", "Xq7k/Zr9w?Vb3m#Np2@Lc5"):
        url = f"postgresql://mailhub:{password}@db.test:5432/mailhub"
        for shown in (redacted(url), _one_line_error(url)):
            for piece in ("Xq7k", "Zr9w", "Vb3m", "Np2", "Lc5"):
                assert piece not in shown, (password, shown)
        assert "percent-encode" in redacted(url)
        assert password in _secrets(url)
    assert redacted("postgresql://mailhub:s3cret@db.test:5432/mailhub") == "postgresql://mailhub@db.test:5432/mailhub"


def _one_line_error(url: str) -> str:
    with pytest.raises(config.ConfigError) as raised:
        config.load(environ={"MAILHUB_STORAGE_INDEX": url})
    return str(raised.value)


@pytest.mark.postgresql
def test_a_read_that_finds_every_pool_connection_busy_fails_in_one_line_after_a_bounded_wait(
    pg_index, tmp_path, monkeypatch
):
    """Many sessions, every pooled read connection busy with a slow read: a further read queued
    without end. It fails after READ_WAIT with one line (its session: a temporary error), the busy
    reads end as they would, and the pool serves on."""
    import asyncio

    from storage import index_reader
    from storage.index import IndexLocation

    url, reset = pg_index
    reset()
    monkeypatch.setattr(index_reader, "READ_WAIT", 0.5)
    holder = PgConnection.connect(url)

    async def scenario():
        reader = await index_reader.open_reader(IndexLocation(tmp_path, url))
        try:
            holder.execute("BEGIN")
            holder.execute("LOCK TABLE mailbox IN ACCESS EXCLUSIVE MODE")
            try:
                busy = [
                    asyncio.ensure_future(reader.fetchall("SELECT count(*) FROM mailbox"))
                    for _ in range(index_reader.POOL_SIZE)
                ]
                started = asyncio.get_running_loop().time()
                with pytest.raises(StorageError, match="read connections to postgresql://.* are busy") as raised:
                    await asyncio.wait_for(reader.fetchall("SELECT 1"), timeout=20)
                assert asyncio.get_running_loop().time() - started < 15 and "\n" not in str(raised.value)
            finally:
                holder.execute("ROLLBACK")
            await asyncio.gather(*busy, return_exceptions=True)
            assert await reader.fetchall("SELECT count(*) FROM mailbox") == [(0,)]
        finally:
            await reader.close()

    try:
        asyncio.run(scenario())
    finally:
        holder.close()


@pytest.mark.postgresql
def test_a_writer_left_on_a_server_that_became_read_only_connects_again(pg_writer):
    """Failover: the old primary, demoted to a standby, keeps the writer's connection and refuses
    every write (25006 read_only_sql_transaction) - each commit got 451, for good, until the hub was
    restarted. The writer now takes a new connection (the URL's host, or target_session_attrs,
    leads to the new primary) and runs the transaction there."""
    first = pg_writer.conn
    first.execute("SET default_transaction_read_only = on")  # (as a standby does to every session)
    pg_writer.in_transaction(lambda c: c.execute(events.INSERT, _event("AFTER-FAILOVER")))
    assert pg_writer.conn is not first and _events(pg_writer.conn, "AFTER-FAILOVER") == 1


def test_a_url_of_several_hosts_for_failover_is_taken_and_a_bad_port_in_it_refused():
    """libpq's failover URL names several hosts, each with its port ('h1:5432,h2:5432', with
    target_session_attrs=read-write it connects to the primary): storage.index refused it as 'not
    a valid URL' (urlsplit reads one port), so a failover needed a name moved by hand."""
    url = f"postgresql://mailhub:{SECRET}@db1.test:5432,db2.test:5433/mailhub?target_session_attrs=read-write"
    cfg = config.load(environ={"MAILHUB_STORAGE_INDEX": url})
    assert cfg.storage.index == url
    assert cfg.index_location.where() == (
        "postgresql://mailhub@db1.test:5432,db2.test:5433/mailhub?target_session_attrs=read-write"
    )
    for bad in ("db1.test:5432,db2.test:port", "db1.test:99999,db2.test", "db1.test:5432,"):
        with pytest.raises(config.ConfigError, match="not a valid URL") as raised:
            config.load(environ={"MAILHUB_STORAGE_INDEX": f"postgresql://mailhub:{SECRET}@{bad}/mailhub"})
        assert SECRET not in str(raised.value)


@pytest.mark.postgresql
def test_index_connections_give_up_on_a_server_gone_silent_unless_the_url_says_otherwise(pg_index):
    """A server whose host went down or whose network was cut sends nothing, not even a reset: a
    connection without TCP keepalive or tcp_user_timeout waited for hours (the index writer, and
    with it every SMTP session of the node). Every index connection sets them; the URL's own win."""

    def settings(url: str) -> dict:
        conn = PgConnection.connect(url)
        try:
            return {o.keyword.decode(): (o.val or b"").decode() for o in conn.raw.pgconn.info}
        finally:
            conn.close()

    url = pg_index[0]
    found = settings(url)
    assert found["keepalives"] == "1" and found["keepalives_idle"] == "30" and found["tcp_user_timeout"] == "60000"
    joiner = "&" if "?" in url else "?"
    assert settings(f"{url}{joiner}keepalives_idle=7")["keepalives_idle"] == "7"
