# `mailhub storage migrate URL`: copies a hub's SQLite index into an empty PostgreSQL database at
# the current schema version, then checks the copy. Steps:
#   0. the target reached and found empty first (a wrong URL fails before a big index is copied);
#   1. a consistent snapshot of the index (VACUUM INTO a temporary folder, as storage/backup.py
#      does: the hub may keep serving), brought to the current SQLite schema (storage/db.py);
#   2. one PostgreSQL transaction: refuse a database that holds any table, apply the migrations
#      (storage/postgres/schema.py), turn the counting triggers off (the counters are copied as
#      they are), COPY every table in batches of rows (bounded memory), set each identity sequence
#      past the largest id copied and past SQLite's sqlite_sequence (a UID is never given twice),
#      triggers back on, COMMIT: all or nothing;
#   3. the check: per table the row count and an order-independent digest of all rows (the sum of
#      the rows' SHA-256 modulo 2**256), read back from both sides.
# Never writes to the hub's data folder; never prints or keeps the password of the URL.
import hashlib
import math
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from .. import db
from ..errors import StorageError
from ..index_url import _secrets
from ..index_url import redacted as redacted  # (imported from here by older code)
from .schema import latest_version, migrate_schema

BATCH_ROWS = 2000  # rows read from SQLite (and written to COPY) at a time
_DIGEST_MODULUS = 2**256
# copied first: the tables the others' foreign keys name
_PARENTS = ("meta", "sites", "messages")
# URL parameters that hold a secret (libpq: the password, the password of the TLS client key)


class MigrateError(StorageError):
    """The copy failed (it was rolled back): one line, without the password."""


class TargetNotEmpty(MigrateError):
    """The PostgreSQL database holds tables already."""


@dataclass
class TableCheck:
    table: str
    sqlite_rows: int
    postgresql_rows: int
    sqlite_digest: str
    postgresql_digest: str

    @property
    def equal(self) -> bool:
        return self.sqlite_rows == self.postgresql_rows and self.sqlite_digest == self.postgresql_digest


@dataclass
class MigrateReport:
    target: str  # the URL without its password
    schema_version: int = 0
    rows_copied: int = 0
    seconds: float = 0.0
    tables: list[TableCheck] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return bool(self.tables) and all(t.equal for t in self.tables)

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "schema_version": self.schema_version,
            "rows_copied": self.rows_copied,
            "seconds": round(self.seconds, 3),
            "equal": self.equal,
            "tables": [{**asdict(t), "equal": t.equal} for t in self.tables],
        }


def _one_line(exc: BaseException, url: str) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = text.replace(url, redacted(url))
    for secret in _secrets(url):
        text = text.replace(secret, "***")
    return text


def connect(url: str) -> psycopg.Connection[Any]:
    """A connection to the target; MigrateError with one line (no password) if there is none."""
    try:
        return psycopg.connect(url, connect_timeout=10, autocommit=True)
    except (psycopg.Error, ValueError) as exc:
        raise MigrateError(f"cannot connect to {redacted(url)}: {_one_line(exc, url)}") from None


def migrate(
    data_dir: Path, url: str, batch_rows: int = BATCH_ROWS, progress: Callable[[str], None] | None = None
) -> MigrateReport:
    """Copy the hub's index in `data_dir` into the empty database at `url`, then check the copy.
    `progress` is told of each table copied and checked (for a long copy's operator). The target is
    reached and found empty before the index is copied (a wrong URL fails at once)."""
    tell = progress or (lambda line: None)
    started = time.monotonic()
    report = MigrateReport(redacted(url))
    conn = connect(url)
    work = Path(tempfile.mkdtemp(prefix="mailhub-migrate-"))
    try:
        try:
            _refuse_if_not_empty(conn)
        except psycopg.Error as exc:
            raise MigrateError(f"reading {report.target} failed: {_one_line(exc, url)}") from None
        try:
            snapshot = _snapshot(Path(data_dir), work)
        except sqlite3.OperationalError as exc:
            raise MigrateError(
                f"the snapshot of the index into {work} failed: {exc} (TMPDIR: a folder with room for a copy"
                " of the index)"
            ) from None
        try:
            try:
                report.schema_version, report.rows_copied = _copy(snapshot, conn, batch_rows, tell)
            except psycopg.Error as exc:
                raise MigrateError(
                    f"copying into {report.target} failed, nothing was kept: {_one_line(exc, url)}"
                ) from None
            try:
                report.tables = check(snapshot, conn, tell)
            except psycopg.Error as exc:
                raise MigrateError(
                    f"the copy in {report.target} was committed, but checking it failed: {_one_line(exc, url)}"
                ) from None
        finally:
            snapshot.close()
    finally:
        conn.close()
        shutil.rmtree(work, ignore_errors=True)
    report.seconds = time.monotonic() - started
    return report


def _snapshot(data_dir: Path, work: Path) -> sqlite3.Connection:
    """A consistent copy of the live index in `work`, at the current SQLite schema."""
    live = db.connect_readonly(data_dir)
    try:
        live.execute("VACUUM INTO ?", (str(db.index_path(work)),))
    finally:
        live.close()
    return db.connect(work)  # adds the tables and columns an older index lacks (on the copy)


def sqlite_tables(conn: sqlite3.Connection) -> list[str]:
    names = [
        name
        for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
        )
    ]
    return [t for t in _PARENTS if t in names] + [t for t in names if t not in _PARENTS]


def _sqlite_columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in conn.execute(f'PRAGMA table_info("{table}")')]


def _pg_tables(conn: psycopg.Connection[Any]) -> list[str]:
    rows = conn.execute(
        "SELECT c.relname FROM pg_class c WHERE c.relnamespace = current_schema()::regnamespace"
        " AND c.relkind IN ('r', 'p') ORDER BY c.relname"
    ).fetchall()
    return [str(r[0]) for r in rows]


def _pg_columns(conn: psycopg.Connection[Any], table: str) -> list[str]:
    rows = conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped"
        " ORDER BY attnum",
        (table,),
    ).fetchall()
    return [str(r[0]) for r in rows]


def _copy(
    snapshot: sqlite3.Connection, conn: psycopg.Connection[Any], batch_rows: int, tell: Callable[[str], None]
) -> tuple[int, int]:
    """Everything in one transaction; returns (schema version, rows copied)."""
    copied = 0
    with conn.transaction():
        _refuse_if_not_empty(conn)
        migrate_schema(conn)
        tables = sqlite_tables(snapshot)
        target_tables = set(_pg_tables(conn)) - {"schema_migrations"}
        if set(tables) != target_tables:
            raise MigrateError(
                f"the index's tables differ from schema version {latest_version()}: only in SQLite"
                f" {sorted(set(tables) - target_tables)}, only in PostgreSQL {sorted(target_tables - set(tables))}"
            )
        for table in tables:
            conn.execute(sql.SQL("ALTER TABLE {} DISABLE TRIGGER USER").format(sql.Identifier(table)))
        conn.execute("DELETE FROM meta")  # the migration's defaults: the index's own values replace them
        for table in tables:
            rows = _copy_table(snapshot, conn, table, batch_rows)
            copied += rows
            tell(f"copied {table}: {rows} row(s)")
        _advance_sequences(snapshot, conn, tables)
        for table in tables:
            conn.execute(sql.SQL("ALTER TABLE {} ENABLE TRIGGER USER").format(sql.Identifier(table)))
    return latest_version(), copied


def _present(conn: psycopg.Connection[Any]) -> list[str]:
    """The tables, views and sequences of every schema but PostgreSQL's own: another application's
    in a schema of its own count too (not only those in the search path's first schema)."""
    rows = conn.execute(
        "SELECT CASE WHEN n.oid = current_schema()::regnamespace THEN c.relname"
        " ELSE n.nspname || '.' || c.relname END FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
        " AND n.nspname NOT LIKE 'pg\\_toast%%' AND n.nspname NOT LIKE 'pg\\_temp\\_%%'"
        " ORDER BY 1"
    ).fetchall()
    return [str(r[0]) for r in rows]


def _refuse_if_not_empty(conn: psycopg.Connection[Any]) -> None:
    present = _present(conn)
    if present:
        shown = ", ".join(present[:5]) + (" ..." if len(present) > 5 else "")
        raise TargetNotEmpty(
            f"the database holds {len(present)} table(s), view(s) or sequence(s) already ({shown}): migrate"
            " copies into an empty database only (createdb a new one, or drop these)"
        )


def _copy_table(snapshot: sqlite3.Connection, conn: psycopg.Connection[Any], table: str, batch_rows: int) -> int:
    columns = _pg_columns(conn, table)
    if set(columns) != set(_sqlite_columns(snapshot, table)):
        raise MigrateError(
            f"table {table}: columns differ (SQLite {_sqlite_columns(snapshot, table)}, PostgreSQL {columns})"
        )
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns))
    )
    rows = 0
    with conn.cursor() as cur, cur.copy(statement) as copy:
        for batch in _batches(snapshot, table, columns, batch_rows):
            for row in batch:
                copy.write_row(row)
            rows += len(batch)
    return rows


def _batches(conn: sqlite3.Connection, table: str, columns: list[str], size: int) -> Iterator[list[Any]]:
    quoted = ", ".join(f'"{c}"' for c in columns)
    cursor = conn.execute(f'SELECT {quoted} FROM "{table}"')
    try:
        while batch := cursor.fetchmany(size):
            yield batch
    finally:
        cursor.close()


def _advance_sequences(snapshot: sqlite3.Connection, conn: psycopg.Connection[Any], tables: list[str]) -> None:
    """Each identity column's next value: past the largest copied and past SQLite's AUTOINCREMENT
    high-water mark (sqlite_sequence keeps the largest id ever given, also of rows deleted since)."""
    used = dict(snapshot.execute("SELECT name, seq FROM sqlite_sequence").fetchall())
    identities = conn.execute(
        "SELECT c.relname, a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
        " WHERE c.relnamespace = current_schema()::regnamespace AND a.attidentity <> '' AND a.attnum > 0"
    ).fetchall()
    for table, column in identities:
        if table not in tables:
            continue
        row = conn.execute(
            sql.SQL("SELECT coalesce(max({}), 0) FROM {}").format(sql.Identifier(column), sql.Identifier(table))
        ).fetchone()
        highest = max(int(row[0]) if row is not None else 0, int(used.get(table) or 0))
        if highest > 0:
            conn.execute("SELECT setval(pg_get_serial_sequence(%s, %s), %s)", (table, column, highest))


def check(
    snapshot: sqlite3.Connection, conn: psycopg.Connection[Any], tell: Callable[[str], None] | None = None
) -> list[TableCheck]:
    """Row count and digest of each table on both sides (PostgreSQL read in one snapshot)."""
    results = []
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        for table in sqlite_tables(snapshot):
            columns = _pg_columns(conn, table)
            sqlite_rows, sqlite_digest = digest(
                row for batch in _batches(snapshot, table, columns, BATCH_ROWS) for row in batch
            )
            pg_rows, pg_digest = digest(_pg_rows(conn, table, columns))
            results.append(TableCheck(table, sqlite_rows, pg_rows, sqlite_digest, pg_digest))
            if tell is not None:
                tell(f"checked {table}: {'equal' if results[-1].equal else 'DIFFERENT'}")
    return results


def _pg_rows(conn: psycopg.Connection[Any], table: str, columns: list[str]) -> Iterator[tuple[Any, ...]]:
    statement = sql.SQL("SELECT {} FROM {}").format(
        sql.SQL(", ").join(map(sql.Identifier, columns)), sql.Identifier(table)
    )
    with conn.cursor(name=f"check_{table}") as cur:  # a server-side cursor: read in batches
        cur.itersize = BATCH_ROWS
        cur.execute(statement)
        yield from cur


def _canonical(value: Any) -> Any:
    """The same value the same way from either side: numbers as int when integral (SQLite's INTEGER
    column may hold a REAL; PostgreSQL's numeric comes as Decimal), else as float."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float, Decimal)):
        if isinstance(value, int) or (math.isfinite(value) and value == int(value)):
            return int(value)
        return float(value)
    if isinstance(value, memoryview):
        return bytes(value)
    return value


def digest(rows: Iterable[Iterable[Any]]) -> tuple[int, str]:
    """(row count, order-independent digest): the sum of each row's SHA-256 modulo 2**256, so that
    equal multisets of rows give equal digests whatever the order (duplicates counted)."""
    count = total = 0
    for row in rows:
        encoded = repr(tuple(_canonical(v) for v in row)).encode()
        total = (total + int.from_bytes(hashlib.sha256(encoded).digest(), "big")) % _DIGEST_MODULUS
        count += 1
    return count, f"{total:064x}"
