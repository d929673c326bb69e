# The index on PostgreSQL, first slice (issue 27, docs/postgresql.md), against a real server
# (tests/pgutil.py): the server fixture itself; schema v1 (every table, column and index of the
# SQLite index, applied once however often migrate_schema runs, a newer database refused); the
# counting triggers agreeing with SQLite's (the statements the project's storage functions run on
# SQLite, recorded and replayed on PostgreSQL through PgConnection, the same text with only
# BEGIN IMMEDIATE switched, leave the same rows); and `mailhub storage migrate`
# copying a running hub filled over SMTP and POP3, checking the copy, refusing what it must.
import calendar
import json
import math
import os
import poplib
import pwd
import re
import shutil
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import tempfile
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from storage import audit, db, directory_index, lifecycle, outbound, sites, sql, usage
from storage.index_writer import BatchItem, IndexWriter
from storage.postgres import SchemaTooNew, latest_version, migrate_schema, schema_version
from storage.postgres.connection import PgConnection
from storage.postgres.from_sqlite import _canonical, check, digest
from storage.records import Delivery, Downloads, MessageMeta, Removal

from conftest import ALPHA_BETA_B2, PASSWORD, REPO, make_message, wait_for
from pgutil import PASSWORD_ROLE

# ---- the server -----------------------------------------------------------------------------------


def test_the_server_waits_for_its_wal_runs_unprivileged_and_gives_each_test_an_empty_database(postgres_server, pg_url):
    with psycopg.connect(pg_url) as conn:
        # fsync off (no test is about a crash of the machine under the server: tests/pgutil.py), but
        # every COMMIT waits for its WAL write, as on the hub's connections
        assert conn.execute("SHOW fsync").fetchone()[0] == "off"
        assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "on"
        assert conn.execute("SHOW listen_addresses").fetchone()[0] == "127.0.0.1"
        assert (
            conn.execute("SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace").fetchone()[0] == 0
        )
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        expected_uid = pwd.getpwnam("postgres").pw_uid if os.geteuid() == 0 else os.geteuid()
        assert os.stat(f"/proc/{backend}").st_uid == expected_uid
    # and on the unix socket in the server's temporary folder
    name = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(host=str(postgres_server.root), port=postgres_server.port, dbname=name, user="mailhub") as c:
        assert c.execute("SELECT current_database()").fetchone()[0] == name


# ---- schema v1 ------------------------------------------------------------------------------------


def _catalog(conn) -> list[tuple]:
    return conn.execute(
        "SELECT 'column', table_name || '.' || column_name || ' ' || data_type || ' ' || is_nullable || ' '"
        " || coalesce(column_default, '') FROM information_schema.columns WHERE table_schema = 'public'"
        " UNION ALL SELECT 'index', indexdef FROM pg_indexes WHERE schemaname = 'public'"
        " UNION ALL SELECT 'trigger', pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal"
        " UNION ALL SELECT 'function', proname || ' ' || md5(prosrc) FROM pg_proc"
        " WHERE pronamespace = 'public'::regnamespace"
        " UNION ALL SELECT 'meta', key || '=' || value FROM meta"
        " UNION ALL SELECT 'migration', version || ' ' || name || ' ' || applied_at FROM schema_migrations"
        " ORDER BY 1, 2"
    ).fetchall()


def test_schema_v1_has_every_table_column_and_index_of_the_sqlite_index_and_applies_once(pg_url, tmp_path):
    lite = db.connect(tmp_path)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert schema_version(conn) == 0
        assert migrate_schema(conn) == list(range(1, latest_version() + 1))
        assert schema_version(conn) == latest_version() >= 1
        before = _catalog(conn)
        assert migrate_schema(conn) == []  # applied twice: nothing changes
        assert _catalog(conn) == before

        def pg(sql, *args):
            return {row[0] for row in conn.execute(sql, args).fetchall()}

        tables = {name for (name,) in lite.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        tables -= {"sqlite_sequence"}
        assert pg("SELECT tablename FROM pg_tables WHERE schemaname = 'public'") == tables | {"schema_migrations"}
        for table in tables:
            columns = {row[1] for row in lite.execute(f"PRAGMA table_info({table})")}
            assert pg("SELECT column_name FROM information_schema.columns WHERE table_name = %s", table) == columns
        indexes = {
            name for (name,) in lite.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")
        }
        assert indexes <= pg("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")
        # a fresh index's settings, as a fresh SQLite index has them
        assert dict(conn.execute("SELECT key, value::bigint FROM meta").fetchall()) == dict(
            lite.execute("SELECT key, value FROM meta").fetchall()
        )
        # the collation of addresses: case-insensitive as SQLite's NOCASE
        conn.execute("INSERT INTO sites (name, password_hash, created_at) VALUES ('a', 'h', 0)")
        conn.execute("INSERT INTO addresses (address, site_id) VALUES ('Alpha@Hub.Test', 1)")
        assert conn.execute("SELECT site_id FROM addresses WHERE address = 'alpha@hub.test'").fetchone() == (1,)
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO addresses (address, site_id) VALUES ('ALPHA@HUB.TEST', 1)")
        # the audit trail stays append-only
        conn.execute("INSERT INTO audit (at, event) VALUES (1, 'accepted')")
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            conn.execute("UPDATE audit SET event = 'fetched'")
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            conn.execute("DELETE FROM audit")
    lite.close()


def test_a_database_of_a_newer_schema_is_refused_untouched(pg_url):
    with psycopg.connect(pg_url, autocommit=True) as conn:
        migrate_schema(conn)
        newer = latest_version() + 1
        conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, 'from_the_future')", (newer,))
        before = _catalog(conn)
        with pytest.raises(SchemaTooNew, match=f"schema version {newer}, newer than this hub knows"):
            migrate_schema(conn)
        assert _catalog(conn) == before


# ---- the triggers agree with SQLite's -------------------------------------------------------------


class Recorder:
    """An sqlite3 connection that notes every statement run through it, with its parameters."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn
        self.statements: list[tuple[str, list, bool]] = []  # (sql, parameter rows, executemany)

    def execute(self, sql, params=()):
        self.statements.append((sql, [tuple(params)], False))
        return self._conn.execute(sql, params)

    def executemany(self, sql, rows):
        rows = [tuple(r) for r in rows]
        self.statements.append((sql, rows, True))
        return self._conn.executemany(sql, rows)

    def __getattr__(self, name):
        return getattr(self._conn, name)


T_NOV = calendar.timegm((2026, 11, 30, 23, 59, 0))  # the last minute of a month (UTC)
T_DEC = T_NOV + 120  # the next month


def _item(queue_id, size, at, sender_site, deliveries, blob, offset=0, remote=(), packed=False) -> BatchItem:
    meta = MessageMeta(
        mail_from=f"{queue_id}@hub.test",
        sender_site=sender_site,
        dot_lines=False,
        message_id=f"<{queue_id}@hub.test>",
        set_id="1.2.3" if sender_site else None,
        sender_name=None,
    )
    return BatchItem(
        queue_id,
        size,
        at,
        meta,
        deliveries,
        list(remote),
        None,
        blob,
        sha256="ab" * 32,
        offset=offset,
        crc32=12345,
        packed=packed,
    )


def _sqlite_scenario(data_dir) -> Recorder:
    """Sites, limits, two group commits across a month's end (packed and single mails, a peer's,
    one with a remote recipient), a POP3 session (fetches, a deletion), IMAP flags, keys and policy
    overrides, an audit pruning, an outbound recipient done, an expiry, a site removed: through
    storage/'s functions (and one removal as start-up recovery makes it)."""
    writer = IndexWriter(data_dir, 0.0)
    rec = Recorder(writer.conn)
    writer.conn = rec
    for name in ("alpha", "beta", "gamma"):
        sites.add_site(rec, name, [f"{name}@hub.test", f"{name}2@hub.test"], PASSWORD, ["hub.test"])
    usage.set_limits(rec, "beta", {"mailbox_bytes": 10_000_000, "max_drain_time": 3600.0})
    usage.set_limits(rec, "beta", {"mailbox_messages": 500})
    alpha, beta, gamma = (sites.get_site(rec, n).id for n in ("alpha", "beta", "gamma"))

    def to(*ids):
        return [Delivery(i, f"site{i}@hub.test", site_name=f"site{i}") for i in ids]

    writer.commit_batch(
        [
            _item("Q1", 1000, T_NOV, alpha, to(beta, gamma), "11/P1", 0, packed=True),
            _item("Q2", 700, T_NOV, alpha, to(beta), "11/P1", 1000, packed=True),
            _item("Q3", 50_000, T_NOV, beta, to(alpha, gamma), "11/Q3"),
            _item("Q4", 3000, T_NOV, None, to(gamma), "11/Q4", remote=["far@other.test"]),
        ],
        [],
        seq=1,
        attempt=7,
        ends={"11/P1": 1700},
    )
    writer.commit_batch(
        [
            _item("Q5", 2000, T_DEC, alpha, to(beta, beta), "12/P2", 0, packed=True),
            _item("Q6", 400, T_DEC, gamma, to(alpha), "12/P2", 2000, packed=True),
        ],
        [],
        seq=2,
        attempt=8,
        ends={"12/P2": 2400},
    )
    uids = {}
    for uid, site_id, queue_id in rec.execute("SELECT uid, site_id, queue_id FROM mailbox ORDER BY uid").fetchall():
        uids.setdefault((site_id, queue_id), []).append(uid)
    # beta's POP3 session: Q1 and Q2 fetched, Q2 and one copy of Q5 deleted
    b1, b2, b5 = uids[(beta, "Q1")][0], uids[(beta, "Q2")][0], uids[(beta, "Q5")][0]
    downloads = Downloads(
        polled_at=T_DEC + 10,
        messages=2,
        bytes=1700,
        send_seconds=0.5,
        fetched_uids=[b1, b2],
        retrieved={"Q1": (T_DEC + 11, 1000), "Q2": (T_DEC + 12, 700)},
    )
    writer.delete_entries(beta, [b2, b5], downloads, "beta")
    writer.delete_entries(beta, [], Downloads(polled_at=T_DEC + 20, fetched_uids=[uids[(beta, "Q5")][1]]), "beta")
    writer.update_flags(alpha, uids[(alpha, "Q3")], 1 | 4, 0)
    # keys and policy overrides (directory and keys versions), a retention override
    directory_index.replace_site_key(rec, "alpha", "FP1", "K1", "armored 1", T_NOV)
    directory_index.replace_site_key(rec, "alpha", "FP2", "K2", "armored 2", T_DEC)  # retires FP1
    for site_id, policy in ((beta, "on"), (beta, "off"), (alpha, "on"), (alpha, None)):
        directory_index.set_policy_override(rec, site_id, policy)
    lifecycle.set_retention(rec, "beta", 7.0)
    # the audit trail pruned up to the first fetch (the guard lets only these rows go)
    assert audit.prune(rec, T_DEC + 11) > 0
    # a row moved aside without telling the ledger, as start-up recovery does (meta ledger_quiet)
    with db.transaction(rec):
        rec.execute("UPDATE meta SET value = 1 WHERE key = 'ledger_quiet'")
        rec.execute("DELETE FROM mailbox WHERE uid = ?", (uids[(alpha, "Q6")][0],))
        rec.execute("UPDATE meta SET value = 0 WHERE key = 'ledger_quiet'")
    writer.in_transaction(outbound.remove, [1])  # Q4's remote recipient done
    writer.delete_entries(gamma, uids[(gamma, "Q4")], None, "gamma", Removal(audit.EXPIRED, audit.HUB_ACTOR))
    sites.remove_site(rec, "gamma", actor="operator")
    writer.delete_entries(beta, [b1], None, "beta")  # Q1's last entry: pack 11/P1 has no mail left
    writer.freed()  # flushes the removals the site's removal noted to the ledger
    writer.close()
    return rec


def _rows(fetch, table: str, columns: list[str]) -> list[tuple]:
    quoted = ", ".join(f'"{c}"' for c in columns)
    return sorted((tuple(_canonical(v) for v in row) for row in fetch(f'SELECT {quoted} FROM "{table}"')), key=repr)


# columns a trigger fills with the current time, or ids given in the order rows of one statement are visited
_NOT_COMPARED = {"blob_holes": {"freed_at"}, "ledger_pending": {"id", "at"}, "events": {"id"}, "audit": {"id"}}


def test_the_triggers_keep_the_same_counters_as_sqlite(pg_url, tmp_path):
    recorded = _sqlite_scenario(tmp_path / "data")
    lite = db.connect(tmp_path / "data")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        migrate_schema(conn)
        pg = PgConnection(conn)
        replayed = 0
        for statement, rows, many in recorded.statements:
            if statement.lstrip().upper().startswith(("SELECT", "PRAGMA")):
                continue  # reads change nothing
            if not rows:
                continue  # an executemany of no rows
            if statement == sql.BEGIN_WRITE[sql.SQLITE]:  # the one switch these statements go through
                statement = sql.BEGIN_WRITE[sql.POSTGRESQL]
            # the same text as on SQLite: the storage functions' SQL is portable (docs/postgresql.md)
            if many:
                pg.executemany(statement, rows)
            else:
                pg.execute(statement, rows[0])
            replayed += 1
        assert replayed > 40
        tables = [t for (t,) in lite.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        compared = []
        for table in tables:
            if table == "sqlite_sequence":
                continue
            columns = [row[1] for row in lite.execute(f"PRAGMA table_info({table})")]
            columns = [c for c in columns if c not in _NOT_COMPARED.get(table, ())]
            on_sqlite = _rows(lambda q: lite.execute(q).fetchall(), table, columns)
            on_pg = _rows(lambda q: conn.execute(q.encode()).fetchall(), table, columns)
            assert on_pg == on_sqlite, f"table {table} differs"
            compared.append((table, len(on_sqlite)))
        print(f"\n{replayed} statements replayed; rows per table: {compared}")
    # the scenario reached every counter: so much is known without either database
    usage_rows = {(r, s): (hb, hm, wb, wm) for r, s, hb, hm, wb, wm in lite.execute("SELECT * FROM mailbox_usage")}
    assert usage_rows[(2, 1)] == (2000, 1, 0, 0)  # beta from alpha: Q5 fetched; Q1, Q2 and a Q5 gone
    assert usage_rows[(1, 2)] == (50_000, 1, 50_000, 1)  # alpha from beta: Q3
    assert dict(lite.execute("SELECT period, received_bytes FROM site_volume WHERE site_id = 2")) == {
        "2026-11-30": 1700,
        "2026-11": 1700,
        "2026-12-01": 4000,
        "2026-12": 4000,
    }
    assert lite.execute("SELECT queue_id, refs FROM messages ORDER BY 1").fetchall() == [("Q3", 1), ("Q5", 1)]
    assert lite.execute("SELECT count(*) FROM ledger_pending WHERE queue_id = 'Q6'").fetchone() == (0,)
    assert lite.execute("SELECT count(*) FROM audit WHERE at < ?", (T_DEC + 11,)).fetchone() == (0,)
    assert lite.execute("SELECT fingerprint, retired_at FROM site_keys ORDER BY id").fetchall() == [
        ("FP1", T_DEC),
        ("FP2", None),
    ]
    assert sorted(lite.execute("SELECT blob, start, size FROM blob_holes")) == [
        ("11/P1", 1000, 700),
        ("12/P2", 2000, 400),
    ]
    assert sorted(lite.execute("SELECT blob FROM blob_trash")) == [("11/P1",), ("11/Q4",)]  # emptied; Q4 expired
    assert lite.execute("SELECT blob FROM packs ORDER BY 1").fetchall() == [("12/P2",)]  # 11/P1's went with Q1
    assert dict(lite.execute("SELECT key, value FROM meta"))["sites_version"] > 6
    lite.close()


# ---- mailhub storage migrate ----------------------------------------------------------------------


def _send(hub, sender: str, *mails: tuple[list[str], int]) -> None:
    """Mails (recipients, size) from a site, over one SMTP session."""
    client = smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30)
    try:
        client.login(sender, PASSWORD)
        for rcpts, size in mails:
            client.sendmail(f"{sender}@hub.test", rcpts, make_message(size))
    finally:
        client.close()


def _pop3(hub, site: str, retrieve: int, delete: list[int]) -> None:
    client = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=30)
    try:
        client.user(site)
        client.pass_(PASSWORD)
        for number in range(1, retrieve + 1):
            client.retr(number)
        for number in delete:
            client.dele(number)
    finally:
        client.quit()


@pytest.fixture
def filled_hub(make_hub):
    """A running hub with mail between two sites (three addresses) over SMTP, some fetched and deleted
    over POP3, a site limit, and the newest mailbox entry deleted (so that SQLite's UID high-water
    mark is above every UID left)."""
    hub = make_hub(sites=ALPHA_BETA_B2)
    hub.cli("site", "set", "beta", "--mailbox-bytes", "50M")
    hub.start()
    _send(
        hub,
        "alpha",
        (["beta@hub.test", "b2@hub.test"], 400_000),  # a file of its own
        (["beta@hub.test"], 3000),
        (["alpha@hub.test", "beta@hub.test"], 3000),
    )
    _send(hub, "beta", (["alpha@hub.test"], 3000), *[(["alpha@hub.test"], 1500)] * 2)
    (entries,) = hub.query("SELECT count(*) FROM mailbox")[0]  # committed before each 250
    assert entries >= 7
    _pop3(hub, "beta", retrieve=3, delete=[1])  # fetched 3, deleted 1
    _pop3(hub, "alpha", retrieve=0, delete=[4])  # the newest entry of the hub
    wait_for(lambda: hub.query("SELECT count(*) FROM mailbox")[0][0] == entries - 2)
    wait_for(lambda: hub.query("SELECT count(*) FROM audit WHERE event = 'deleted_by_site'")[0][0] == 2)
    return hub


def test_migrate_copies_a_running_hub_and_checks_the_copy(filled_hub, pg_url):
    hub = filled_hub
    result = hub.cli("storage", "migrate", pg_url, "--json", check=False)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^migrate: copied mailbox: \d+ row\(s\)$", result.stderr, re.M), result.stderr
    assert "migrate: checked audit: equal" in result.stderr
    report = json.loads(result.stdout)
    assert report["equal"] is True and report["schema_version"] == latest_version()
    tables = {t["table"]: t for t in report["tables"]}
    lite = hub.db()
    for table, compared in tables.items():
        assert compared["equal"] and compared["sqlite_digest"] == compared["postgresql_digest"], table
    assert set(tables) == {t for (t,) in lite.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} - {
        "sqlite_sequence"
    }
    # (the idle hub writes none of these meanwhile)
    for table in ("sites", "addresses", "messages", "mailbox", "mailbox_usage", "site_volume", "events", "audit"):
        assert tables[table]["postgresql_rows"] > 0, table
        assert tables[table]["sqlite_rows"] == lite.execute(f"SELECT count(*) FROM {table}").fetchone()[0], table
    (uid_high,) = lite.execute("SELECT seq FROM sqlite_sequence WHERE name = 'mailbox'").fetchone()
    assert uid_high > lite.execute("SELECT max(uid) FROM mailbox").fetchone()[0]  # the newest entry was deleted
    with psycopg.connect(pg_url, autocommit=True) as conn:
        # the rows themselves, not only their digests (UIDVALIDITY is the site's created_at)
        for table, order in (("mailbox", "uid"), ("sites", "id"), ("imap_uid_next", "site_id")):
            assert (
                conn.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall()
                == lite.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall()
            )
        # the next UID is above every UID SQLite ever gave, and the triggers count again
        (queue_id,) = conn.execute("SELECT queue_id FROM messages LIMIT 1").fetchone()
        held = conn.execute("SELECT sum(held_messages) FROM mailbox_usage").fetchone()[0]
        conn.execute("UPDATE messages SET refs = refs + 1 WHERE queue_id = %s", (queue_id,))
        (uid,) = conn.execute(
            "INSERT INTO mailbox (site_id, queue_id, rcpt, delivered_at) VALUES (1, %s, 'alpha@hub.test', 0)"
            " RETURNING uid",
            (queue_id,),
        ).fetchone()
        assert uid == uid_high + 1
        assert conn.execute("SELECT sum(held_messages) FROM mailbox_usage").fetchone()[0] == held + 1
        assert conn.execute("SELECT uid_next FROM imap_uid_next WHERE site_id = 1").fetchone() == (uid + 1,)
        (event_id,) = conn.execute("INSERT INTO events (at, kind) VALUES (0, 'x') RETURNING id").fetchone()
        assert event_id == lite.execute("SELECT max(id) FROM events").fetchone()[0] + 1
    lite.close()
    # the table printed for people
    again = hub.cli("storage", "migrate", pg_url, check=False)
    assert again.returncode == 2 and "holds" in again.stderr and "empty" in again.stderr, again.stderr


def test_migrate_prints_the_table_and_refuses_what_it_must(make_hub, postgres_server, pg_url):
    hub = make_hub(sites=ALPHA_BETA_B2)  # a stopped hub's index (made by `site add`)
    lite = hub.db()
    with lite:  # SQLite's INTEGER column holds a REAL as it is: a time stamp left by an audit pruning
        lite.execute("UPDATE meta SET value = 1796083140.25 WHERE key = 'audit_prune_before'")
    result = hub.cli("storage", "migrate", pg_url, "--quiet", check=False)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert re.search(r"^mailbox\s+0\s+0\s+equal", result.stdout, re.M), result.stdout
    assert re.search(r"^addresses\s+3\s+3\s+equal", result.stdout, re.M), result.stdout
    assert re.search(r"^meta\s+8\s+8\s+equal", result.stdout, re.M), result.stdout
    assert "every table equal" in result.stdout
    # the check sees a difference: a changed value, a row more
    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'audit_prune_before'").fetchone()[0] == Decimal(
            "1796083140.25"
        )
        assert all(t.equal for t in check(lite, conn))
        conn.execute("UPDATE addresses SET address = 'B3@hub.test' WHERE address = 'b2@hub.test'")
        conn.execute("INSERT INTO site_volume (site_id, period) VALUES (1, '2026-12')")
        assert {t.table for t in check(lite, conn) if not t.equal} == {"addresses", "site_volume"}
        different = {t.table: t for t in check(lite, conn)}
        assert (different["addresses"].sqlite_rows, different["addresses"].postgresql_rows) == (3, 3)
        assert (different["site_volume"].sqlite_rows, different["site_volume"].postgresql_rows) == (0, 1)
    lite.close()
    # a non-empty database: refused, untouched
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DROP TABLE audit CASCADE")
        conn.execute("CREATE TABLE mine (x int)")
    refused = hub.cli("storage", "migrate", pg_url, check=False)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT to_regclass('audit')").fetchone() == (None,)
    # no server there: one line, never the password
    secret = "Pa55-never-shown"
    with socket.socket() as s:  # bound and kept, never listening: connections to it are refused
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
        for url in (
            f"postgresql://mailhub:{secret}@127.0.0.1:{closed}/nothing",
            f"postgresql://mailhub@127.0.0.1:{closed}/nothing?password={secret}",
        ):
            failed = hub.cli("storage", "migrate", url, check=False)
            assert failed.returncode == 1
            assert failed.stderr.startswith("mailhub: cannot connect to postgresql://mailhub@127.0.0.1:")
            assert failed.stderr.count("\n") == 1 and secret not in failed.stderr + failed.stdout, failed.stderr
    # a wrong password for a role that needs one
    postgres_server.admin(f"CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD 'the-right-one'")
    try:
        url = postgres_server.url(pg_url.rsplit("/", 1)[1], user=PASSWORD_ROLE, password=secret)
        failed = hub.cli("storage", "migrate", url, check=False)
        assert failed.returncode == 1 and "password authentication failed" in failed.stderr, failed.stderr
        assert failed.stderr.count("\n") == 1 and secret not in failed.stderr
    finally:
        postgres_server.admin(f"DROP ROLE {PASSWORD_ROLE}")
    # not a PostgreSQL URL: usage
    assert hub.cli("storage", "migrate", "mysql://x/y", check=False).returncode == 2


def test_the_digest_ignores_the_order_and_counts_every_row():
    rows = [(1, "a", None, 0.5), (2, "b", 3.0, None), (2, "b", 3.0, None)]
    count, total = digest(rows)
    assert (count, total) == digest(reversed(rows))
    assert total != digest(rows[:2])[1] and digest(rows[:2])[0] == 2  # a duplicate row counts
    assert total != digest([(1, "a", None, 0.5), (2, "b", 3.0, None), (2, "B", 3.0, None)])[1]
    # the same value from either side: SQLite's int or REAL, PostgreSQL's numeric or double
    assert digest([(5, 2.5, 7.0)]) == digest([(Decimal(5), Decimal("2.5"), 7)])
    assert digest([(math.inf,)]) == digest([(math.inf,)]) != digest([(-math.inf,)])


def test_a_password_is_shown_nowhere_even_in_a_url_that_only_libpq_can_read_or_as_sslpassword():
    from storage.postgres.from_sqlite import MigrateError, connect, redacted

    secret = "Pa55-never-shown"
    with socket.socket() as s:  # bound and kept, never listening: connections to it are refused
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
        for url in (
            f"postgresql://mailhub:{secret}@[::1/db",  # urlsplit refuses it; libpq quotes it whole
            f"postgresql://mailhub:{secret}@127.0.0.1:{closed}/db?sslpassword={secret}x&bogus=1",
            f"postgresql://mailhub@127.0.0.1:{closed}/db?sslpassword={secret}&sslmode=disable",
            f"postgresql://mailhub:{secret.replace('-', '%2D')}@127.0.0.1:{closed}/db",
        ):
            with pytest.raises(MigrateError) as caught:
                connect(url)
            text = str(caught.value)
            assert secret not in text and secret.replace("-", "%2D") not in text, text
        assert "Pa55" not in redacted(url) and "\n" not in text, redacted(url)
    assert (
        redacted(f"postgresql://u@h/db?sslmode=require&sslpassword={secret}") == "postgresql://u@h/db?sslmode=require"
    )
    # a unix socket given as host= keeps the URL's "//" (copied from the output, it still works)
    socket_url = "postgresql:///db?host=%2Frun%2Fpostgresql&user=hub"
    assert redacted(socket_url + f"&password={secret}") == socket_url


def test_a_database_holding_another_applications_schema_or_view_is_refused(make_hub, pg_url):
    from storage.postgres import TargetNotEmpty, migrate

    hub = make_hub(sites=ALPHA_BETA_B2)
    for setup in (
        "CREATE SCHEMA billing; CREATE TABLE billing.invoices (id int)",
        "CREATE VIEW status AS SELECT 1 AS up",
        "CREATE SEQUENCE tickets",
    ):
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(setup.encode())
        with pytest.raises(TargetNotEmpty) as caught:
            migrate(hub.data_dir, pg_url)
        assert "already" in str(caught.value), caught.value
        with psycopg.connect(pg_url, autocommit=True) as conn:
            assert conn.execute("SELECT to_regclass('messages')").fetchone() == (None,)  # untouched
            conn.execute(
                b"DROP SCHEMA IF EXISTS billing CASCADE; DROP VIEW IF EXISTS status; DROP SEQUENCE IF EXISTS tickets"
            )


def test_sigterm_during_migrate_rolls_back_and_leaves_no_copy_of_the_index(make_hub, pg_url, tmp_path):
    from storage.postgres.schema import _LOCK_KEY

    hub = make_hub(sites=ALPHA_BETA_B2)
    scratch = tmp_path / "tmp"  # the migrate's TMPDIR: where its snapshot of the index goes
    scratch.mkdir()
    with psycopg.connect(pg_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))  # migrate waits for it, mid-transaction
        migrate = subprocess.Popen(
            [sys.executable, "-m", "mailhub.cli", "storage", "migrate", pg_url, "--quiet"],
            env={**hub.env, "TMPDIR": str(scratch)},
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # started with SIGINT ignored, as a background job of a script is: SIGTERM must still stop it
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
        try:
            waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            wait_for(lambda: holder.execute(waiting).fetchone()[0] or migrate.poll() is not None, timeout=60)
            assert migrate.poll() is None and list(scratch.iterdir()), migrate.communicate()
            migrate.send_signal(signal.SIGTERM)
            _out, err = migrate.communicate(timeout=60)
        finally:
            if migrate.poll() is None:
                migrate.kill()
                migrate.wait()
    assert migrate.returncode == 130 and "interrupted" in err and "Traceback" not in err, (migrate.returncode, err)
    assert list(scratch.iterdir()) == []  # the snapshot of the index (password hashes and all) is gone
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM pg_class WHERE relname = 'schema_migrations'").fetchone() == (0,)


def test_a_server_left_by_a_killed_test_session_is_stopped_by_the_next_one():
    from pgutil import sweep_abandoned

    scratch = Path(tempfile.mkdtemp(prefix="mailhub-test-sweep-"))  # not under tmp_path: the user
    scratch.chmod(0o755)  # postgres must reach the server's folder
    try:
        session = subprocess.Popen(  # a test session that starts its server and is then killed
            [
                sys.executable,
                "-c",
                "import sys, time; from pgutil import PostgresServer; "
                "print(PostgresServer().start().root, flush=True); time.sleep(600)",
            ],
            cwd=REPO / "tests",
            env={**os.environ, "TMPDIR": str(scratch)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            line = session.stdout.readline().strip()
        finally:
            session.kill()
            _out, err = session.communicate()
        assert line, err
        root = Path(line)
        server_pid = int((root / "data" / "postmaster.pid").read_text().split()[0])
        assert _running(server_pid)  # running still, its session gone
        assert sweep_abandoned(str(scratch)) == [root]
        assert not root.exists()
        wait_for(lambda: not _running(server_pid), timeout=30)
    finally:
        sweep_abandoned(str(scratch))
        shutil.rmtree(scratch, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
