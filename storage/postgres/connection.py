# A psycopg 3 (synchronous) connection with the surface the storage functions use of an sqlite3 one
# (storage.sql.Connection): execute/executemany with `?` placeholders, cursors with fetchone/fetchall,
# iteration, rowcount and description, rows as tuples, autocommit with the explicit transactions of
# storage.db.transaction, in_transaction; `rows` reads a large result through a server-side cursor.
# Values come back as SQLite gives them: numeric (meta.value, sum() of bigint) as int when whole,
# else float. PostgreSQL's errors are raised as the sqlite3 ones the storage code catches (the
# _ERRORS table; the original chained), a full disk as StorageFull.
# Must never rewrite SQL beyond the placeholders (dialect differences are named switches in
# storage/sql.py), nor log or show the connection's password.
import functools
import itertools
import sqlite3
from collections.abc import Iterable, Iterator
from decimal import Decimal
from typing import Any, Final
from urllib.parse import parse_qsl

import psycopg
from psycopg import errors as pg_errors
from psycopg.adapt import Dumper, Loader
from psycopg.pq import TransactionStatus

from ..errors import StorageError, StorageFull
from ..index_url import redacted
from ..sql import BEGIN_READ, FETCH_SIZE, POSTGRESQL, Cursor, StreamingConnection
from .from_sqlite import _one_line

# psycopg's errors -> what the storage code catches (first match wins; the message is PostgreSQL's)
_ERRORS: Final[tuple[tuple[type[psycopg.Error], type[Exception]], ...]] = (
    (pg_errors.DiskFull, StorageFull),  # 53100: as SQLITE_FULL (db.transaction -> 452 4.3.1)
    (pg_errors.IntegrityError, sqlite3.IntegrityError),  # class 23: unique, foreign key, not null, check
    (pg_errors.RaiseException, sqlite3.IntegrityError),  # a trigger's RAISE (as SQLite's RAISE(ABORT, ...))
    (pg_errors.SerializationFailure, sqlite3.OperationalError),  # 40001: try again, as SQLITE_BUSY
    (pg_errors.DeadlockDetected, sqlite3.OperationalError),  # 40P01
    (pg_errors.LockNotAvailable, sqlite3.OperationalError),  # 55P03: as SQLITE_BUSY after busy_timeout
    (psycopg.ProgrammingError, sqlite3.OperationalError),  # class 42 (syntax, no such table), as SQLite
    (pg_errors.DataError, sqlite3.DataError),
    (psycopg.OperationalError, sqlite3.OperationalError),  # the server went away, admin shutdown, ...
    (psycopg.Error, sqlite3.DatabaseError),
)


def mapped_error(exc: psycopg.Error) -> Exception:
    """The exception the storage code expects for a psycopg error (its message, its SQLSTATE)."""
    message = str(exc).split("\n", 1)[0]
    state = f" [{exc.sqlstate}]" if exc.sqlstate else ""
    for source, target in _ERRORS:
        if isinstance(exc, source):
            if target is StorageFull:
                return StorageFull(f"index: {message}{state}")
            return target(f"{message}{state}")
    return sqlite3.DatabaseError(f"{message}{state}")


@functools.lru_cache(maxsize=1024)
def placeholders(sql: str) -> str:
    """`?` -> `%s` outside string literals and quoted names; a `%` anywhere becomes `%%` (psycopg
    reads `%` as its own placeholder character)."""
    out: list[str] = []
    quote = ""
    for char in sql:
        if char == "%":
            out.append("%%")
        elif quote:
            out.append(char)
            if char == quote:
                quote = ""  # a doubled quote ('it''s') closes and reopens: the same result
        elif char in "'\"":
            quote = char
            out.append(char)
        elif char == "?":
            out.append("%s")
        else:
            out.append(char)
    if quote:
        raise ValueError(f"unterminated quoted text in SQL: {sql[:80]!r}")
    return "".join(out)


class _NumericLoader(Loader):
    """numeric as SQLite's dynamic types: whole numbers as int, others as float (never Decimal)."""

    def load(self, data: Any) -> int | float:
        value = Decimal(bytes(data).decode())
        return int(value) if value == value.to_integral_value() else float(value)


class _BoolDumper(Dumper):
    """True/False as 1/0 (the schema has no boolean columns: SQLite keeps them as integers)."""

    oid = psycopg.adapters.types["int8"].oid

    def dump(self, obj: Any) -> bytes:
        return b"1" if obj else b"0"


# libpq settings that end a connection to a server gone silent (its host down, the network cut):
# without them a request waited on a TCP connection for hours - the index writer, and with it every
# SMTP session of the node. Keepalive probes after 30 s idle (every 10 s, 3 unanswered: gone), and
# data sent but not acknowledged for 60 s. Those the URL sets itself are left as it says.
DEAD_SERVER: Final = {
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    "tcp_user_timeout": "60000",
}

_CURSOR_NUMBERS = itertools.count(1)  # a unique name for each server-side cursor of the process


class PgConnection:
    """One psycopg connection in autocommit mode, speaking to the storage functions as sqlite3 does."""

    dialect = POSTGRESQL

    def __init__(self, conn: psycopg.Connection[Any]):
        if not conn.autocommit:
            conn.autocommit = True  # transactions are explicit (BEGIN ... COMMIT), as on SQLite
        conn.adapters.register_loader("numeric", _NumericLoader)
        conn.adapters.register_dumper(bool, _BoolDumper)
        self.raw = conn

    @classmethod
    def connect(cls, url: str, connect_timeout: int = 10) -> "PgConnection":
        """Raises StorageError with one line that shows no password (not in the URL, nor where libpq
        quotes a URL it cannot read)."""
        given = {key.lower() for key, _value in parse_qsl(url.partition("?")[2])}
        dead_server: dict[str, Any] = {key: value for key, value in DEAD_SERVER.items() if key not in given}
        try:
            return cls(psycopg.connect(url, autocommit=True, connect_timeout=connect_timeout, **dead_server))
        except (psycopg.Error, ValueError) as exc:
            raise StorageError(f"cannot connect to the index at {redacted(url)}: {_one_line(exc, url)}") from None

    def execute(self, sql: str, parameters: Any = (), /) -> Cursor:
        try:
            return self.raw.execute(placeholders(sql), tuple(parameters))
        except psycopg.Error as exc:
            raise mapped_error(exc) from exc

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> Cursor:
        cursor = self.raw.cursor()
        try:
            cursor.executemany(placeholders(sql), [tuple(p) for p in parameters])
        except psycopg.Error as exc:
            raise mapped_error(exc) from exc
        return cursor

    def rows(self, sql: str, parameters: Any = (), size: int = FETCH_SIZE, /) -> Iterator[Any]:
        """The rows of a SELECT through a server-side (named) cursor, `size` at a time: a large
        result never sits whole in this process (psycopg's default cursor would load it all). A
        named cursor lives in a transaction: the caller's, or a REPEATABLE READ READ ONLY one begun
        here and ended when the rows end or the iterator is closed (storage.sql.rows)."""
        own = not self.in_transaction
        if own:
            self.execute(BEGIN_READ[POSTGRESQL])
        cursor = self.raw.cursor(name=f"mailhub_rows_{next(_CURSOR_NUMBERS)}")
        try:
            try:
                cursor.execute(placeholders(sql), tuple(parameters))
                while batch := cursor.fetchmany(size):
                    yield from batch
            except psycopg.Error as exc:
                raise mapped_error(exc) from exc
        finally:
            try:
                cursor.close()
            except psycopg.Error:
                pass  # the transaction failed already: the ROLLBACK below ends the cursor with it
            if own:
                self.rollback()  # read only: nothing to keep

    @property
    def in_transaction(self) -> bool:
        return self.raw.info.transaction_status != TransactionStatus.IDLE

    def commit(self) -> None:
        if self.in_transaction:
            self.execute("COMMIT")

    def rollback(self) -> None:
        if self.in_transaction:
            self.execute("ROLLBACK")

    def close(self) -> None:
        self.raw.close()

    def __enter__(self) -> "PgConnection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_CHECKED: type[StreamingConnection] = PgConnection  # mypy: the storage functions' Protocol, satisfied
