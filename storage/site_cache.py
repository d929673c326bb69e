# The server's view of the sites: an in-memory copy of names, password hashes and addresses,
# reloaded when the CLI changes them (a version counter bumped by triggers), and password checks
# run off the event loop with a short-lived cache of verified logins; sessions that log in at the
# same time with the same credentials share one check (a gateway opens its sessions together, and
# one scrypt check costs ~60 ms of CPU). Never stores a password.
import asyncio
import hashlib
import hmac
import os
import sqlite3
import time

from . import db
from .passwords import verify_password
from .sites import Site, list_sites, sites_version

_RECHECK_SECONDS = 0.5
_VERIFIED_TTL = 300.0


class SiteCache:
    def __init__(self, data_dir):
        self._conn: sqlite3.Connection = db.connect(data_dir)
        self._version = -1
        self._checked_at = 0.0
        self._by_name: dict[str, Site] = {}
        self._by_address: dict[str, Site] = {}
        self._verified: dict[tuple[str, str], tuple[bytes, float]] = {}
        self._checking: dict[tuple[str, str, bytes], asyncio.Future] = {}   # checks in flight
        self._key = os.urandom(32)

    def close(self) -> None:
        self._conn.close()

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < _RECHECK_SECONDS:
            return
        self._checked_at = now
        version = sites_version(self._conn)
        if version == self._version:
            return
        sites = list_sites(self._conn)
        self._by_name = {s.name: s for s in sites}
        self._by_address = {a.lower(): s for s in sites for a in s.addresses}
        self._version = version

    def by_name(self, name: str) -> Site | None:
        self._refresh()
        return self._by_name.get(name)

    def by_address(self, address: str) -> Site | None:
        self._refresh()
        return self._by_address.get(address.lower())

    def all_sites(self) -> list[Site]:
        self._refresh()
        return list(self._by_name.values())

    async def authenticate(self, name: str, password: str) -> Site | None:
        site = self.by_name(name)
        if site is None:
            # Same cost as a real check, so that timing does not reveal which names exist.
            await asyncio.get_running_loop().run_in_executor(None, verify_password, password, _DUMMY_HASH)
            return None
        tag = hmac.new(self._key, password.encode(), hashlib.sha256).digest()
        cached = self._verified.get((site.name, site.password_hash))
        if cached and cached[1] > time.monotonic() and hmac.compare_digest(cached[0], tag):
            return site
        check = (site.name, site.password_hash, tag)
        if check not in self._checking:
            self._checking[check] = asyncio.get_running_loop().run_in_executor(None, verify_password, password,
                                                                                 site.password_hash)
            self._checking[check].add_done_callback(lambda _done: self._checking.pop(check, None))
        ok = await asyncio.shield(self._checking[check])
        if not ok:
            return None
        self._verified[(site.name, site.password_hash)] = (tag, time.monotonic() + _VERIFIED_TTL)
        return site


_DUMMY_HASH = "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
