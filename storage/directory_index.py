# The participant directory's rows in the index: the sites' OpenPGP public keys (site_keys: the
# current one and the retired ones), the per-site encryption policy override (site_policy), and the
# directory's counters and marks in meta (directory_version and keys_version, moved by the triggers
# of storage/schema.sql; the marks of what the directory mailer last sent). Parsing keys, building
# and signing the directory are directory/'s business; this module only reads and writes rows.
# Must never parse or check key material, nor import from directory/, relay/ or mailhub/.
from . import db, sql
from .sites import Site, get_site, list_sites

_KEY_COLUMNS = "fingerprint, encryption_key_ids, armored, imported_at, retired_at"
_KEY_ORDER = "retired_at IS NOT NULL, coalesce(retired_at, 0) DESC, id DESC"  # current first, then newest
KeyRow = tuple[str, str, str, float, float | None]  # fingerprint, key IDs (space-separated), armored, times


def replace_site_key(
    conn: sql.Connection, site_name: str, fingerprint: str, encryption_key_ids: str, armored: str, now: float
) -> bool:
    """Make the key the site's current one, retiring its current key at `now`, in one transaction;
    False (and nothing changed) when it is the current key already. Raises SiteError for an
    unknown site."""
    with db.transaction(conn):
        site = get_site(conn, site_name)
        current = conn.execute(
            "SELECT fingerprint FROM site_keys WHERE site_id = ? AND retired_at IS NULL", (site.id,)
        ).fetchone()
        if current and current[0] == fingerprint:
            return False
        conn.execute("UPDATE site_keys SET retired_at = ? WHERE site_id = ? AND retired_at IS NULL", (now, site.id))
        conn.execute(
            "INSERT INTO site_keys (site_id, fingerprint, encryption_key_ids, armored, imported_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (site.id, fingerprint, encryption_key_ids, armored, now),
        )
    return True


def site_key_rows(conn: sql.Connection, site_id: int) -> list[KeyRow]:
    """One site's keys, current first, then the retired ones, newest first."""
    return conn.execute(
        f"SELECT {_KEY_COLUMNS} FROM site_keys WHERE site_id = ? ORDER BY {_KEY_ORDER}", (site_id,)
    ).fetchall()


def all_site_key_rows(conn: sql.Connection) -> dict[int, list[KeyRow]]:
    """Every site's keys by site ID, each list ordered as site_key_rows'."""
    keys: dict[int, list[KeyRow]] = {}
    for row in conn.execute(f"SELECT site_id, {_KEY_COLUMNS} FROM site_keys ORDER BY site_id, {_KEY_ORDER}"):
        keys.setdefault(row[0], []).append(row[1:])
    return keys


def set_policy_override(conn: sql.Connection, site_id: int, encryption: str | None) -> None:
    """A site's encryption policy ('on', 'off'), or None to follow the hub's."""
    if encryption is None:
        conn.execute("DELETE FROM site_policy WHERE site_id = ?", (site_id,))
    else:
        conn.execute(
            "INSERT INTO site_policy (site_id, encryption) VALUES (?, ?) ON CONFLICT (site_id)"
            " DO UPDATE SET encryption = excluded.encryption",
            (site_id, encryption),
        )


def policy_overrides(conn: sql.Connection) -> dict[int, str]:
    """Every site's override by site ID (sites following the hub's policy have none)."""
    return dict(conn.execute("SELECT site_id, encryption FROM site_policy"))


def directory_version(conn: sql.Connection) -> int:
    """Moves whenever what the participant list shows changes (sites, addresses, keys)."""
    return int(conn.execute("SELECT value FROM meta WHERE key = 'directory_version'").fetchone()[0])


def keys_version(conn: sql.Connection) -> int:
    """Moves whenever a site's keys or policy override change."""
    return int(conn.execute("SELECT value FROM meta WHERE key = 'keys_version'").fetchone()[0])


def marks(conn: sql.Connection, *names: str) -> dict[str, int]:
    """The directory mailer's marks (meta rows) that are set, by name, and directory_version."""
    wanted = ("directory_version", *names)
    return dict(conn.execute(f"SELECT key, value FROM meta WHERE key IN ({','.join('?' * len(wanted))})", wanted))


def marks_and_sites(conn: sql.Connection, *names: str) -> tuple[dict[str, int], list[Site]]:
    """marks() and every site, read together (one read transaction: the version and the sites it
    counts agree)."""
    conn.execute(sql.BEGIN_READ[sql.dialect(conn)])
    try:
        return marks(conn, *names), list_sites(conn)
    finally:
        conn.execute("COMMIT")


def set_mark(conn: sql.Connection, name: str, value: int) -> None:
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (name, value),
    )


def set_mark_if_unset(conn: sql.Connection, name: str, value: int) -> None:
    conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT DO NOTHING", (name, value))


def mark(conn: sql.Connection, name: str) -> int | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (name,)).fetchone()
    return None if row is None else row[0]


def set_mark_to_version_if_unset(conn: sql.Connection, name: str) -> None:
    """Set the mark to the present directory_version unless it is set (one statement)."""
    conn.execute(
        "INSERT INTO meta (key, value) SELECT ?, value FROM meta WHERE key = 'directory_version'"
        " ON CONFLICT DO NOTHING",
        (name,),
    )
