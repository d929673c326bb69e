# Where the index is, and the one way to open it: IndexLocation(data_dir, url) - SQLite's
# index.sqlite3 in the data folder (url "") or a PostgreSQL database (storage.index =
# "postgresql://..."). connect() and connect_readonly() give a storage.sql.Connection on either
# engine; prepare() migrates a PostgreSQL schema (once per database and process); require_sqlite()
# refuses, with one line naming PostgreSQL's own tool, what has no meaning there (VACUUM INTO,
# integrity_check, the index file). Every opener of the index (the hub, its index writer process,
# readers in worker threads, the command line) goes through here.
# Must never import psycopg at module level (the PostgreSQL extra is optional), nor show a password.
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from . import db, sql
from .errors import StorageError
from .index_url import redacted

if TYPE_CHECKING:
    from .postgres.connection import PgConnection

# Seconds a connection attempt to PostgreSQL may take before it fails with one line.
CONNECT_TIMEOUT: Final = 10

_migrated: set[str] = set()  # the URLs this process has migrated (prepare): once per database
_migrating = threading.Lock()


class NotOnPostgres(StorageError):
    """A command that works on the SQLite index file only, asked of a PostgreSQL index (exit 2)."""


@dataclass(frozen=True, slots=True)
class IndexLocation:
    """The index of a hub: SQLite in `data_dir` (url ""), or the PostgreSQL database at `url`."""

    data_dir: Path
    url: str = ""

    @property
    def engine(self) -> sql.Dialect:
        return sql.POSTGRESQL if self.url else sql.SQLITE

    @property
    def is_postgresql(self) -> bool:
        return bool(self.url)

    def where(self) -> str:
        """The index as an operator reads it in a message: the file, or the URL without its password."""
        return redacted(self.url) if self.url else str(db.index_path(self.data_dir))

    def prepare(self) -> None:
        """Make the index ready to serve: SQLite creates the file and its schema; PostgreSQL applies
        the migrations the database lacks (once per database in this process). Raises StorageError
        with one line (no password) when PostgreSQL cannot be reached."""
        if not self.url:
            db.connect(self.data_dir).close()
            return
        with _migrating:
            if self.url in _migrated:
                return
            conn = _pg_connection(self.url, CONNECT_TIMEOUT)
            try:
                from .postgres.schema import migrate_schema

                migrate_schema(conn.raw)
            except StorageError:  # SchemaTooNew: its own line
                raise
            except Exception as exc:  # psycopg's (no permission, the connection lost): one line
                text = " ".join(str(exc).split()) or type(exc).__name__
                raise StorageError(f"cannot migrate the index at {self.where()}: {text}") from None
            finally:
                conn.close()
            _migrated.add(self.url)

    def connect(self, timeout: int = CONNECT_TIMEOUT, migrate: bool = True) -> sql.Connection:
        """A read-write connection (autocommit; transactions through storage.db.transaction). SQLite:
        db.connect (schema and pragmas); PostgreSQL: a PgConnection to a migrated database
        (`migrate=False`: the caller knows it is, as the index writer the hub started)."""
        if not self.url:
            return db.connect(self.data_dir)
        if migrate:
            self.prepare()
        return _pg_connection(self.url, timeout)

    def connect_readonly(self, any_thread: bool = False, timeout: int = CONNECT_TIMEOUT) -> sql.Connection:
        """A connection that never changes the index (reports, metrics, readers beside a running hub).
        SQLite: the file opened read-only (`any_thread`: usable from other threads than this one, one
        at a time); PostgreSQL: a session whose transactions are all READ ONLY."""
        if not self.url:
            return db.connect_readonly(self.data_dir, check_same_thread=not any_thread)
        conn = _pg_connection(self.url, timeout)
        conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        return conn

    def require_sqlite(self, what: str, instead: str) -> None:
        """Raise NotOnPostgres ("`what` works on an SQLite index only; ... use `instead`") when the
        index is on PostgreSQL."""
        if self.url:
            raise NotOnPostgres(
                f"{what} works on the SQLite index file only; this hub's index is PostgreSQL"
                f" ({self.where()}): use {instead}"
            )


def _pg_connection(url: str, timeout: int) -> "PgConnection":
    """PgConnection.connect, or StorageError (one line) when psycopg, an optional extra, is missing."""
    try:
        from .postgres.connection import PgConnection
    except ImportError as exc:
        raise StorageError(
            f"storage.index is a PostgreSQL URL, which needs psycopg 3 ({exc}):"
            " pip install 'dicom-mail-hub[postgresql]'"
        ) from None
    return PgConnection.connect(url, timeout)
