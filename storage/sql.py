# The connection the synchronous storage functions take, whatever the engine: a Protocol that
# sqlite3.Connection and storage.postgres.connection.PgConnection (psycopg 3) both satisfy, and the
# few named dialect switches for what the two engines spell differently (docs/postgresql.md). The
# storage functions write ONE SQL text for both engines (`?` placeholders, upserts, CASE, coalesce,
# RETURNING); only the constructs below differ, each chosen by name, never by rewriting SQL text.
# Must never import psycopg (the PostgreSQL extra is optional) nor hold message content.
import re
from collections.abc import Iterable, Iterator
from typing import Any, Final, Literal, Protocol

Dialect = Literal["sqlite", "postgresql"]
SQLITE: Final = "sqlite"
POSTGRESQL: Final = "postgresql"


class Cursor(Protocol):
    """What the storage functions use of a cursor: rows as tuples (access by index)."""

    @property
    def rowcount(self) -> int: ...

    @property
    def description(self) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """An autocommit connection to the index (SQLite with isolation_level=None, or PgConnection):
    transactions are the explicit ones of storage.db.transaction."""

    def execute(self, sql: str, parameters: Any = ..., /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> Cursor: ...

    @property
    def in_transaction(self) -> bool: ...

    def close(self) -> None: ...


class StreamingConnection(Connection, Protocol):
    """A connection whose default cursor holds a whole result (PgConnection): `rows` reads a large
    one in batches instead."""

    def rows(self, sql: str, parameters: Any = ..., size: int = ..., /) -> Iterator[Any]: ...


# Rows fetched from the server at once by `rows` on PostgreSQL (a batch of rows in memory, no more).
FETCH_SIZE: Final = 1000


def rows(conn: Connection, sql: str, parameters: Any = (), size: int = FETCH_SIZE) -> Iterator[Any]:
    """The rows of a SELECT whose result can be large, read as they are needed, so the memory stays
    bounded whatever the table's size. SQLite's cursor reads rows lazily already; on PostgreSQL the
    default cursor would hold the whole result, so PgConnection.rows reads it through a server-side
    cursor, `size` rows at a time, inside the caller's transaction or a read-only one of its own
    (ended when the iteration ends or the iterator is closed). Write nothing on the connection while
    iterating."""
    if dialect(conn) == POSTGRESQL:
        streaming: StreamingConnection = conn  # type: ignore[assignment]  # PgConnection
        return streaming.rows(sql, parameters, size)
    return iter(conn.execute(sql, parameters))


def dialect(conn: object) -> Dialect:
    """The engine behind a connection: PgConnection says so; anything else (sqlite3.Connection, or a
    wrapper around one) is SQLite."""
    return POSTGRESQL if getattr(conn, "dialect", SQLITE) == POSTGRESQL else SQLITE


# ---- the named switches ---------------------------------------------------------------------------

# Start a write transaction. SQLite: take the write lock at once (no deadlock between two readers
# that both want to write). PostgreSQL: row locks are taken as rows are written (one writer, the
# index writer process, as on SQLite; several nodes need more: docs/postgresql.md).
BEGIN_WRITE: Final[dict[Dialect, str]] = {SQLITE: "BEGIN IMMEDIATE", POSTGRESQL: "BEGIN"}

# Start a read transaction whose statements all see one snapshot (SQLite's deferred BEGIN does;
# PostgreSQL's default READ COMMITTED takes a snapshot per statement).
BEGIN_READ: Final[dict[Dialect, str]] = {
    SQLITE: "BEGIN",
    POSTGRESQL: "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
}

# Appended to lower(x) in ORDER BY, min() and max(): text in the order of SQLite's NOCASE (ASCII case
# folded, then bytes). SQLite's lower() compares bytewise already; on PostgreSQL it would keep the
# column's ICU collation `nocase`, which sorts punctuation first ('beta@' before 'beta2@').
BYTE_ORDER: Final[dict[Dialect, str]] = {SQLITE: "", POSTGRESQL: ' COLLATE "C"'}

# The integers of a JSON array given as one `?` parameter (e.g. '[3, 7]'), as a subquery's rows.
JSON_INTEGERS: Final[dict[Dialect, str]] = {
    SQLITE: "SELECT value FROM json_each(?)",
    POSTGRESQL: "SELECT value::bigint FROM jsonb_array_elements_text(?::jsonb)",
}


# Appended to a SELECT of rows to claim inside a write transaction (outbound.due): PostgreSQL locks
# them and skips those another node's transaction is claiming (several nodes); SQLite's writer holds
# the one write lock already (BEGIN IMMEDIATE).
CLAIM_ROWS: Final[dict[Dialect, str]] = {SQLITE: "", POSTGRESQL: " FOR UPDATE OF o SKIP LOCKED"}


# Appended to a SELECT of mailbox entries (alias b) a transaction is about to change: PostgreSQL
# locks them, so a second transaction doing the same (two nodes' expiry rounds at once: the old
# leader's still running) waits and then no longer finds an entry the first removed; SQLite's
# writer holds the one write lock already.
LOCK_ENTRY: Final[dict[Dialect, str]] = {SQLITE: "", POSTGRESQL: " FOR UPDATE OF b"}


# The index's own clock as Unix seconds, for times several nodes write and compare (the outbound
# claims' leases: judged by one clock, not by each node's, which may be minutes apart). SQLite has
# none to share (one node): the caller's `now` stands in.
INDEX_CLOCK: Final[dict[Dialect, str | None]] = {
    SQLITE: None,
    POSTGRESQL: "EXTRACT(EPOCH FROM clock_timestamp())::float8",
}


_NAME = re.compile(r"[a-z_][a-z0-9_]*")


def id_high_water(conn: object, table: str, column: str) -> str:
    """A SELECT of one row: the highest id the table's AUTOINCREMENT (SQLite: sqlite_sequence) or
    identity column (PostgreSQL: its sequence) has handed out, 0 before the first; it never goes
    down when rows are deleted. `table` and `column` are the code's own names, never input."""
    if not (_NAME.fullmatch(table) and _NAME.fullmatch(column)):
        raise ValueError(f"not a plain table or column name: {table!r}, {column!r}")
    if dialect(conn) == POSTGRESQL:
        return (
            "SELECT coalesce((SELECT last_value FROM pg_sequences WHERE format('%I.%I', schemaname, sequencename)"
            f" = pg_get_serial_sequence('{table}', '{column}')), 0)"
        )
    return f"SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = '{table}'), 0)"


def group_concat(conn: object, expression: str, separator: str) -> str:
    """The aggregate joining `expression`'s text values with `separator` (a literal: ',')."""
    if "'" in separator:
        raise ValueError("separator must not contain a quote")
    if dialect(conn) == POSTGRESQL:
        return f"string_agg(({expression})::text, '{separator}')"
    return f"group_concat({expression}, '{separator}')"
