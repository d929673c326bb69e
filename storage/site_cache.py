# The server's view of the sites: an in-memory copy of names, password hashes and addresses,
# reloaded by a thread when the CLI changes them (storage/index_watch.py: a version counter bumped
# by triggers, checked every 0.5 s; lookups read memory only), and password checks
# run off the event loop with a short-lived cache of verified logins; sessions that log in at the
# same time with the same credentials share one check (a gateway opens its sessions together, and
# one scrypt check costs ~60-100 ms of CPU). The checks run in a small pool of their own at a lower
# CPU priority (hashlib.scrypt releases the GIL: bench/scrypt_gil.py), with a bounded queue: past
# it a login gets LoginBusy at once (a temporary failure), so a flood of logins can neither queue
# without end nor take the CPU from mail traffic. Never stores a password.
import asyncio
import hashlib
import hmac
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import sql
from .index_watch import IndexWatcher
from .passwords import parameters_of, unmatchable_hash, verify_password
from .sites import Site, list_sites, sites_version

_RECHECK_SECONDS = 0.5
_VERIFIED_TTL = 300.0
_HASH_NICENESS = 10  # the hashing threads yield the CPU to the event loop and the index writer


class LoginBusy(Exception):
    """More password checks are waiting than the queue allows: answer with a temporary failure."""


class SiteCache:
    def __init__(
        self,
        data_dir: Path,
        hash_threads: int = 2,
        max_queued_checks: int = 256,
        connect: Callable[[], sql.Connection] | None = None,
    ):
        """`connect`: the watcher's connections (default: the data folder's SQLite index)."""
        self._pool = ThreadPoolExecutor(
            max_workers=hash_threads, thread_name_prefix="password-check", initializer=_lower_priority
        )
        self._max_queued = max_queued_checks
        self._pending = 0  # checks submitted to the pool and not finished
        self._sites: tuple[dict[str, Site], dict[str, Site]] = ({}, {})  # by name, by address (lower case)
        self._unknown_name_hash = unmatchable_hash()  # at the sites' cost (_load)
        self._verified: dict[tuple[str, str], tuple[bytes, float]] = {}
        self._checking: dict[tuple[str, str, bytes], asyncio.Future[bool]] = {}  # checks in flight
        self._key = os.urandom(32)
        self._watcher = IndexWatcher(data_dir, "sites", sites_version, self._load, _RECHECK_SECONDS, connect)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._watcher.close()

    @property
    def version(self) -> int:
        """The index's sites version (meta sites_version) of the sites loaded now."""
        return self._watcher.version

    @property
    def checks_pending(self) -> int:
        return self._pending

    def _load(self, conn: sql.Connection) -> None:
        """The watcher's thread (and the first load): both maps swapped in at once."""
        sites = list_sites(conn)
        self._sites = ({s.name: s for s in sites}, {a.lower(): s for s in sites for a in s.addresses})
        self._unknown_name_hash = _unknown_name_hash(sites)

    def by_name(self, name: str) -> Site | None:
        return self._sites[0].get(name)

    def by_address(self, address: str) -> Site | None:
        return self._sites[1].get(address.lower())

    def all_sites(self) -> list[Site]:
        return list(self._sites[0].values())

    async def authenticate(self, name: str, password: str) -> Site | None:
        """The site when the password is right, else None; LoginBusy when the check cannot be
        queued now."""
        site = self.by_name(name)
        if site is None:
            # Same cost as a real check, so that timing does not reveal which names exist.
            await self._check(password, self._unknown_name_hash)
            return None
        tag = hmac.new(self._key, password.encode(), hashlib.sha256).digest()
        cached = self._verified.get((site.name, site.password_hash))
        if cached and cached[1] > time.monotonic() and hmac.compare_digest(cached[0], tag):
            return site
        check = (site.name, site.password_hash, tag)
        if check not in self._checking:
            self._checking[check] = asyncio.ensure_future(self._check(password, site.password_hash))
            self._checking[check].add_done_callback(lambda _done: self._checking.pop(check, None))
        ok = await asyncio.shield(self._checking[check])
        if not ok:
            return None
        self._verified[(site.name, site.password_hash)] = (tag, time.monotonic() + _VERIFIED_TTL)
        return site

    async def _check(self, password: str, stored: str) -> bool:
        if self._pending >= self._max_queued:
            raise LoginBusy(f"{self._pending} password checks waiting")
        self._pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, verify_password, password, stored)
        finally:
            self._pending -= 1


def _lower_priority() -> None:
    """Run this pool thread at a lower CPU priority (Linux sets niceness per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _HASH_NICENESS)
    except (OSError, AttributeError):
        pass


def _unknown_name_hash(sites: list[Site]) -> str:
    """What a login with an unknown name is checked against: a hash no password matches, at the
    scrypt cost most of the sites' hashes have (the hub's own when there are none), so that
    refusing an unknown name takes as long as refusing a known one. A fixed cost would answer
    faster or slower than the sites hashed at another one (an older hub's, or the tests' cheaper
    cost), and tell which names exist."""
    costs = Counter(filter(None, (parameters_of(site.password_hash) for site in sites)))
    return unmatchable_hash(costs.most_common(1)[0][0]) if costs else unmatchable_hash()
