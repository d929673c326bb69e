# Opening the SQLite index: one place for the pragmas and the schema, shared by the server's
# connections and the command-line tools. Must never hold message content.
import sqlite3
from importlib import resources
from pathlib import Path

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
)


def index_path(data_dir: Path) -> Path:
    return Path(data_dir) / INDEX_NAME


def pragma_statements() -> tuple[str, ...]:
    return _PRAGMAS


def connect(data_dir: Path) -> sqlite3.Connection:
    """A synchronous connection with the schema in place (creates the data folder)."""
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(index_path(data_dir), isolation_level=None, timeout=10)
    for pragma in _PRAGMAS:
        conn.execute(pragma)
    conn.executescript(_SCHEMA)
    _add_missing_columns(conn)
    return conn


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    for table, column, declaration in ADDED_COLUMNS:
        present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in present:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")


def connect_readonly(data_dir: Path) -> sqlite3.Connection:
    """A read-only connection for reports beside a running hub (never changes the index)."""
    path = index_path(data_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no index at {path}")
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


class transaction:
    """BEGIN IMMEDIATE ... COMMIT on an autocommit connection; ROLLBACK on error."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self):
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb):
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
        return False
