# Large reads in bounded memory on both engines (issue 27, docs/postgresql.md): storage.sql.rows,
# which the reads that iterate over a large table use (audit.records/query, reports.events_of_mails,
# ledger.catch_up and pending_lines). On PostgreSQL it goes through a server-side cursor
# (PgConnection.rows); psycopg's default cursor would hold the whole result in the process. The
# memory test reads 200,000 audit rows (about 40 MB of result) on PostgreSQL and measures the
# process's peak RSS (VmHWM, reset through /proc/self/clear_refs): reading them through `rows`
# grows it by a few MB, the default cursor by about the result's size (the same measurement, so
# the bound is one that can fail). `mailhub audit --csv` writes its export as it reads it (the
# same measurement on SQLite).
import csv
import ctypes
import gc
import sqlite3

import psycopg
import pytest

from storage import audit, db, sql
from storage.postgres.connection import PgConnection

from conftest import ALPHA_BETA

ROWS = 200_000
DETAIL = 200  # characters of each row's detail: the result holds at least ROWS * DETAIL octets


def _kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def peak_growth(read) -> int:
    """Octets the process's peak RSS grew by while `read()` ran (free heap memory given back to the
    system first, so that memory freed by an earlier test is not reused unseen)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # the peak RSS (VmHWM) starts again from the current RSS
    before = _kib("VmRSS")
    read()
    return (_kib("VmHWM") - before) * 1024


def add_records(conn, count: int, at: float = 1000.0) -> None:
    with db.transaction(conn):
        for i in range(count):
            audit.record(conn, audit.ACCEPTED, "alpha", f"Q{i}", None, None, i, None, "beta", at=at + i)


def test_rows_on_both_engines(index):
    """The same rows in order on each engine; the PostgreSQL read's own transaction ends with the
    rows, or when the iterator is closed early; inside the caller's transaction it stays the
    caller's; a bad statement raises sqlite3's error."""
    add_records(index, 25)
    ids = [r[0] for r in sql.rows(index, "SELECT size FROM audit WHERE size >= ? ORDER BY id", (3,), 4)]
    assert ids == list(range(3, 25))
    assert not index.in_transaction
    assert [r.queue_id for r in audit.records(index, since=1020.0)] == ["Q20", "Q21", "Q22", "Q23", "Q24"]
    assert [r.queue_id for r in audit.query(index, until=1002.0)] == ["Q0", "Q1"]

    early = sql.rows(index, "SELECT queue_id FROM audit ORDER BY id", (), 2)
    assert next(early) == ("Q0",)
    early.close()
    assert not index.in_transaction
    add_records(index, 1, at=5000.0)  # the connection writes again: nothing left open
    assert audit.query(index, since=5000.0)[0].queue_id == "Q0"

    index.execute(sql.BEGIN_READ[sql.dialect(index)])
    assert sum(1 for _ in sql.rows(index, "SELECT id FROM audit", (), 7)) == 26
    assert index.in_transaction  # the caller's transaction, left to the caller
    index.execute("COMMIT")

    with pytest.raises(sqlite3.OperationalError):
        list(sql.rows(index, "SELECT nothing FROM no_such_table"))
    assert not index.in_transaction
    assert len(audit.query(index)) == 26


def test_large_read_on_postgresql_in_bounded_memory(pg_index):
    url, reset = pg_index
    reset()
    with psycopg.connect(url, autocommit=True) as raw:
        raw.execute(
            "INSERT INTO audit (at, event, site, queue_id, size, actor, detail)"
            " SELECT g, 'accepted', 'alpha', 'Q' || g, g, 'beta', repeat('d', %s) FROM generate_series(1, %s) g",
            (DETAIL, ROWS),
        )
    result_size = ROWS * DETAIL
    try:
        with PgConnection.connect(url) as conn:
            seen = {"count": 0, "last": 0.0}

            def stream():
                for record in audit.records(conn):
                    assert record.at > seen["last"] and len(record.detail) == DETAIL
                    seen["count"] += 1
                    seen["last"] = record.at

            streamed = peak_growth(stream)
            assert seen["count"] == ROWS

            def whole():  # psycopg's default cursor, as conn.execute uses it: the whole result at once
                assert sum(1 for _ in conn.execute("SELECT id, " + ", ".join(audit.COLUMNS) + " FROM audit")) == ROWS

            loaded = peak_growth(whole)
    finally:
        reset()
    assert loaded > result_size / 2, f"the measurement did not see the whole result: {loaded} octets"
    assert streamed < result_size / 8, f"streaming grew the peak RSS by {streamed} octets"


def test_the_audit_csv_export_is_written_as_it_is_read(make_hub, tmp_path):
    """`mailhub audit --csv` writes each record as the index yields it (audit.records): exporting
    20,000 records of 1,000 characters grows the peak RSS by far less than they take; --json,
    which gathers them in a list first, by more than half of it (the same measurement)."""
    count, detail = 20_000, 1000
    hub = make_hub(sites=ALPHA_BETA)
    conn = hub.db()
    with conn:
        conn.execute(
            "INSERT INTO audit (at, event, site, queue_id, size, actor, detail)"
            " WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < ?)"
            " SELECT n, 'accepted', 'alpha', 'Q' || n, n, 'beta', substr(hex(zeroblob(?)), 1, ?) FROM g",
            (count, detail, detail),
        )
    conn.close()
    size = count * detail
    out = tmp_path / "audit.csv"
    streamed = peak_growth(lambda: hub.cli("audit", "--csv", "-o", str(out)))
    with open(out, newline="") as exported:
        rows = csv.DictReader(exported)
        assert sum(1 for row in rows if row["event"] == "accepted" and len(row["detail"]) == detail) == count
    gathered = peak_growth(lambda: hub.cli("audit", "--json", "-o", str(tmp_path / "audit.json")))
    assert gathered > size / 2, f"the measurement did not see the records: {gathered} octets"
    assert streamed < size / 8, f"the CSV export grew the peak RSS by {streamed} octets"
