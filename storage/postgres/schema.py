# The index's schema on PostgreSQL, versioned: numbered SQL files in migrations/ (NNNN_name.sql,
# version NNNN, from 1 without gaps), the table schema_migrations naming those applied, and
# migrate_schema() applying the missing ones in order, each in one transaction with its row (inside
# a caller's transaction they become savepoints of it). A database at a version newer than this
# code knows is refused, never touched. Must never edit or re-run an applied migration.
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg

from ..errors import StorageError

_FILE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")
# one migrating session at a time per database (several hub nodes may start together)
_LOCK_KEY = 0x6D61696C687562  # "mailhub"


class SchemaTooNew(StorageError):
    """The database was migrated by a newer version of the hub."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """The migrations this code knows, in order (version 1, 2, ...)."""
    found = []
    for entry in resources.files(__package__).joinpath("migrations").iterdir():
        match = _FILE.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise StorageError(f"storage/postgres/migrations: versions {[m.version for m in found]} are not 1, 2, ...")
    return found


def latest_version() -> int:
    return len(migrations())


def schema_version(conn: psycopg.Connection[Any]) -> int:
    """The highest migration applied to the database (0: none, or no schema_migrations table)."""
    row = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return 0
    row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
    return int(row[0]) if row is not None else 0


def migrate_schema(conn: psycopg.Connection[Any]) -> list[int]:
    """Apply the migrations the database lacks, each in a transaction of its own together with its
    schema_migrations row; returns the versions applied. Raises SchemaTooNew, with nothing changed,
    for a database whose version is newer than the newest migration known here."""
    known = migrations()
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        current = schema_version(conn)
        if current > len(known):
            raise SchemaTooNew(
                f"the PostgreSQL index is at schema version {current}, newer than this hub knows"
                f" ({len(known)}): use the hub version that migrated it, or upgrade this one"
            )
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
    applied: list[int] = []
    for migration in known[current:]:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            if schema_version(conn) >= migration.version:  # another session applied it meanwhile
                continue
            conn.execute(migration.sql.encode())
            conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (migration.version, migration.name)
            )
            applied.append(migration.version)
    return applied
