# Opening the SQLite index: one place for the pragmas and the schema, shared by the server's
# connections and the command-line tools. Must never hold message content.
import sqlite3
import zlib
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Generic, Literal, TypeVar

from . import sql
from .errors import StorageError, StorageFull

C = TypeVar("C", bound=sql.Connection)

INDEX_NAME = "index.sqlite3"
_SCHEMA = resources.files(__package__).joinpath("schema.sql").read_text()
_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
    "PRAGMA busy_timeout=10000",
)
# Columns added to tables after their first release: (table, column, declaration). schema.sql has
# them in its CREATE TABLE for new indexes; an older index gets them by ALTER TABLE on open.
ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("mailbox", "fetched_at", "REAL"),
    ("mailbox", "flags", "INTEGER NOT NULL DEFAULT 0"),
    ("messages", "structure", "TEXT"),
    ("messages", "blob_offset", "INTEGER NOT NULL DEFAULT 0"),
    ("blob_holes", "freed_at", "REAL NOT NULL DEFAULT 0"),
    ("messages", "crc32", "INTEGER"),
    ("mailbox", "warned_at", "REAL"),
    ("site_downloads", "last_fetch_at", "REAL"),
    ("outbound", "claimed_by", "TEXT"),
    ("outbound", "claimed_until", "REAL"),
)

# The schema's stamp, kept in the index's user_version once schema.sql and ADDED_COLUMNS are in
# place: a connection to an index with this stamp skips them (the script of CREATE ... IF NOT
# EXISTS took ~1.3 ms of the ~1.6 ms of each connection; the watchers, the index writer, the mailer
# and every command open one). Another stamp (another version of the hub, or none) runs them again.
_SCHEMA_STAMP = zlib.crc32((_SCHEMA + repr(ADDED_COLUMNS)).encode()) & 0x7FFFFFFF or 1


def index_path(data_dir: Path) -> Path:
    return Path(data_dir) / INDEX_NAME


def pragma_statements() -> tuple[str, ...]:
    return _PRAGMAS


class IndexDamaged(StorageError):
    """The index file cannot be read as an SQLite database, or fails its integrity check."""


def connect(data_dir: Path) -> sqlite3.Connection:
    """A synchronous connection with the schema in place (creates the data folder). Raises
    IndexDamaged for an index SQLite cannot read."""
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    path = index_path(data_dir)
    conn = sqlite3.connect(path, isolation_level=None, timeout=10)
    try:
        for pragma in _PRAGMAS:
            conn.execute(pragma)
        if conn.execute("PRAGMA user_version").fetchone()[0] != _SCHEMA_STAMP:
            conn.executescript(_SCHEMA)
            _add_missing_columns(conn)
            conn.execute(f"PRAGMA user_version = {_SCHEMA_STAMP}")
    except sqlite3.DatabaseError as exc:
        conn.close()
        if _damage(exc):
            raise IndexDamaged(damaged_message(path, exc)) from None
        raise
    return conn


def check(conn: sqlite3.Connection) -> None:
    """SQLite's quick integrity check of the whole index (start-up); raises IndexDamaged."""
    path = conn.execute("PRAGMA database_list").fetchone()[2]
    try:
        problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
    except sqlite3.DatabaseError as exc:
        if _damage(exc):
            raise IndexDamaged(damaged_message(path, exc)) from None
        raise
    if problems != ["ok"]:
        raise IndexDamaged(damaged_message(path, "; ".join(problems)))


def damaged_message(path: str | Path, error: BaseException | str) -> str:
    return (
        f"the index {path} is damaged ({error}); stop the hub and run `mailhub storage rebuild-index`"
        f" (see docs/storage.md)"
    )


def _damage(exc: sqlite3.DatabaseError) -> bool:
    """Damage, as opposed to a busy or full disk or a missing folder."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return not isinstance(exc, sqlite3.OperationalError)
    return code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    for table, column, declaration in ADDED_COLUMNS:
        present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in present:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")


def connect_readonly(data_dir: Path, check_same_thread: bool = True) -> sqlite3.Connection:
    """A read-only connection for reports beside a running hub (never changes the index)."""
    path = index_path(data_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no index at {path}")
    conn = sqlite3.connect(
        f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10, check_same_thread=check_same_thread
    )
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


class transaction(Generic[C]):
    """BEGIN IMMEDIATE ... COMMIT on an autocommit connection (PostgreSQL: BEGIN, sql.BEGIN_WRITE);
    ROLLBACK on error. Running out of space (the WAL cannot grow: SQLITE_FULL; PostgreSQL's
    disk_full) raises StorageFull (452 4.3.1), the transaction rolled back."""

    def __init__(self, conn: C):
        self.conn = conn

    def __enter__(self) -> C:
        try:
            self.conn.execute(sql.BEGIN_WRITE[sql.dialect(self.conn)])
        except sqlite3.OperationalError as exc:
            _raise_if_full(exc)
            raise
        return self.conn

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Literal[False]:
        commit_failed: sqlite3.OperationalError | StorageFull | None = None
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
                return False
            except (sqlite3.OperationalError, StorageFull) as error:
                commit_failed = error
        self._rollback()
        failure = commit_failed or exc
        if isinstance(failure, sqlite3.OperationalError):
            _raise_if_full(failure)
        if commit_failed is not None:
            raise commit_failed
        return False

    def _rollback(self) -> None:
        try:
            self.conn.execute("ROLLBACK")
        except sqlite3.OperationalError:
            if self.conn.in_transaction:  # else SQLite rolled back by itself (as on SQLITE_FULL)
                raise


_FULL_CODES = (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR_WRITE)


def _raise_if_full(exc: sqlite3.OperationalError) -> None:
    if getattr(exc, "sqlite_errorcode", None) in _FULL_CODES or "database or disk is full" in str(exc):
        raise StorageFull(f"index: {exc}") from exc
