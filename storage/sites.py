# Site (participant) records: name, login password hash, e-mail addresses.
# Synchronous functions on an index connection (storage.sql: SQLite or PostgreSQL), used by the CLI
# and by the server's site cache.
# Must never see a password in the clear except to hash it.
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import audit, db, events, sql
from .errors import StorageError
from .passwords import hash_password

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ADDRESS_RE = re.compile(r"^[^@\s<>]+@[A-Za-z0-9.-]+$")
# The shortest password `site add` and `site passwd` accept (docs/operator-guide.md#sites says why).
MIN_PASSWORD_LENGTH = 12
# Local parts no site may have in any local domain: postmaster (RFC 5321 §4.5.1: must reach the
# operator), abuse (RFC 2142) and mailer-daemon (the sender of the hub's bounces).
RESERVED_LOCAL_PARTS = ("postmaster", "abuse", "mailer-daemon")


class SiteError(StorageError):
    """A site command was given invalid or conflicting input."""


@dataclass
class Site:
    id: int
    name: str
    password_hash: str
    created_at: float
    addresses: list[str] = field(default_factory=list)
    limits: dict[str, float] = field(default_factory=dict)  # overrides of the config's quotas


def validate_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise SiteError(f"invalid site name {name!r}: use letters, digits, '.', '_' or '-'")
    return name


def validate_address(address: str, local_domains: Sequence[str]) -> str:
    address = address.strip()
    if not _ADDRESS_RE.match(address):
        raise SiteError(f"invalid address {address!r}")
    domain = address.rsplit("@", 1)[1].lower()
    if local_domains and domain not in local_domains:
        raise SiteError(f"address {address!r} is not in a local domain ({', '.join(local_domains)})")
    local = address.rsplit("@", 1)[0].lower()
    if local in RESERVED_LOCAL_PARTS:
        raise SiteError(
            f"address {address!r} is reserved: {local}@ of every local domain is the hub operator's"
            " (postmaster: RFC 5321, abuse: RFC 2142, mailer-daemon: the hub's bounces)"
        )
    return address


def validate_password(password: str) -> str:
    if not password:
        raise SiteError("empty password")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise SiteError(
            f"password too short: {len(password)} characters, at least {MIN_PASSWORD_LENGTH}"
            " (or let --generate-password make one)"
        )
    return password


def add_site(
    conn: sql.Connection, name: str, addresses: list[str], password: str, local_domains: Sequence[str]
) -> Site:
    validate_name(name)
    if not addresses:
        raise SiteError("a site needs at least one --address")
    validate_password(password)
    checked = [validate_address(a, local_domains) for a in addresses]
    seen = set()
    for address in checked:
        if address.lower() in seen:
            raise SiteError(f"address {address!r} given twice")
        seen.add(address.lower())
    password_hash = hash_password(password)
    with db.transaction(conn):
        if conn.execute("SELECT 1 FROM sites WHERE name = ?", (name,)).fetchone():
            raise SiteError(f"site {name!r} exists already")
        for address in checked:
            owner = conn.execute(
                "SELECT s.name FROM addresses a JOIN sites s ON s.id = a.site_id WHERE a.address = ?", (address,)
            ).fetchone()
            if owner:
                raise SiteError(f"address {address!r} belongs to site {owner[0]!r}")
        (site_id,) = conn.execute(
            "INSERT INTO sites (name, password_hash, created_at) VALUES (?, ?, ?) RETURNING id",
            (name, password_hash, time.time()),
        ).fetchone()
        conn.executemany("INSERT INTO addresses (address, site_id) VALUES (?, ?)", [(a, site_id) for a in checked])
    return get_site(conn, name)


def get_site(conn: sql.Connection, name: str) -> Site:
    row = conn.execute("SELECT id, name, password_hash, created_at FROM sites WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise SiteError(f"no site named {name!r}")
    site = Site(*row)
    order = f"lower(address){sql.BYTE_ORDER[sql.dialect(conn)]}"  # NOCASE order on both engines
    site.addresses = [
        a for (a,) in conn.execute(f"SELECT address FROM addresses WHERE site_id = ? ORDER BY {order}", (site.id,))
    ]
    return site


def list_sites(conn: sql.Connection) -> list[Site]:
    sites = {
        row[0]: Site(*row)
        for row in conn.execute("SELECT id, name, password_hash, created_at FROM sites ORDER BY name")
    }
    order = f"lower(address){sql.BYTE_ORDER[sql.dialect(conn)]}"  # NOCASE order on both engines
    for address, site_id in conn.execute(f"SELECT address, site_id FROM addresses ORDER BY {order}"):
        sites[site_id].addresses.append(address)
    cursor = conn.execute("SELECT * FROM site_limits")
    names = [d[0] for d in cursor.description]
    for row in cursor:
        limits = {n: v for n, v in zip(names, row) if n != "site_id" and v is not None}
        if row[0] in sites:
            sites[row[0]].limits = limits
    return list(sites.values())


def set_password(conn: sql.Connection, name: str, password: str) -> None:
    validate_password(password)
    password_hash = hash_password(password)
    with db.transaction(conn):
        if conn.execute("UPDATE sites SET password_hash = ? WHERE name = ?", (password_hash, name)).rowcount == 0:
            raise SiteError(f"no site named {name!r}")


def remove_site(conn: sql.Connection, name: str, actor: str | None = None) -> int:
    """Remove a site, its addresses and its mailbox; return how many mails were dropped. Each
    dropped mail gets an audit record (deleted by the operator `actor`), which outlives the site."""
    with db.transaction(conn):
        site = get_site(conn, name)
        uids = [uid for (uid,) in conn.execute("SELECT uid FROM mailbox WHERE site_id = ?", (site.id,))]
        audit.record_entries(conn, audit.DELETED_BY_OPERATOR, site.id, uids, actor or "operator", "site removed")
        conn.execute(
            "INSERT INTO events (at, kind, queue_id, site, detail) SELECT ?, ?, queue_id, ?, 'site removed'"
            " FROM mailbox WHERE site_id = ?",
            (time.time(), events.DELETED, site.name, site.id),
        )
        dropped = conn.execute("DELETE FROM mailbox WHERE site_id = ?", (site.id,)).rowcount
        conn.execute("DELETE FROM sites WHERE id = ?", (site.id,))
    return dropped


def sites_version(conn: sql.Connection) -> int:
    return int(conn.execute("SELECT value FROM meta WHERE key = 'sites_version'").fetchone()[0])
