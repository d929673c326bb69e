# Password checks of storage.SiteCache: sessions logging in together with the same credentials
# share one scrypt check, a wrong password never passes (not even beside a right one in flight),
# a changed password takes effect at once, and the copy of the sites is reloaded by a thread, never
# by a lookup (which reads memory only). Each runs on both engines (the `index` fixture): the
# cache's watcher reads the index on connections of its own (`connect`).
import asyncio
import threading
from unittest import mock

from storage import site_cache
from storage.passwords import hash_password, parameters_of, verify_password
from storage.sites import add_site, set_password

from conftest import until, wait_for


def make_cache(index, index_connect, tmp_path) -> site_cache.SiteCache:
    add_site(index, "alpha", ["alpha@hub.test"], "right-password", ["hub.test"])
    return site_cache.SiteCache(tmp_path, connect=index_connect)


def test_concurrent_logins_share_one_check_and_wrong_passwords_fail(index, index_connect, tmp_path):
    cache = make_cache(index, index_connect, tmp_path)
    checks = []

    def counted(password, stored):
        checks.append(password)
        return verify_password(password, stored)

    async def play():
        with mock.patch.object(site_cache, "verify_password", counted):
            logins = [cache.authenticate("alpha", "right-password") for _ in range(10)]
            logins += [cache.authenticate("alpha", "wrong-password") for _ in range(3)]
            results = await asyncio.gather(*logins)
            again = await cache.authenticate("alpha", "right-password")  # cached
        return results, again

    try:
        results, again = asyncio.run(play())
    finally:
        cache.close()
    assert [r is not None for r in results] == [True] * 10 + [False] * 3
    assert again is not None and again.name == "alpha"
    assert sorted(checks) == ["right-password", "wrong-password"]


def test_an_unknown_name_is_checked_at_the_cost_of_the_sites_hashes(index, index_connect, tmp_path):
    """Refusing an unknown name takes as long as refusing a known one: its check runs at the scrypt
    cost most sites' hashes have (the hub's own with no sites), whatever cost that is."""
    checked = []

    def recorded(password, stored):
        checked.append(parameters_of(stored))
        return verify_password(password, stored)

    async def unknown_name_check(cache) -> str:
        checked.clear()
        with mock.patch.object(site_cache, "verify_password", recorded):
            assert await cache.authenticate("nobody", "any-password") is None
        (parameters,) = checked
        return parameters

    cache = site_cache.SiteCache(tmp_path, connect=index_connect)
    try:
        assert asyncio.run(unknown_name_check(cache)) == "16384$8$1"  # no sites: the hub's cost
    finally:
        cache.close()
    for name, n in (("alpha", 2**10), ("beta", 2**10), ("gamma", 2**14)):
        add_site(index, name, [f"{name}@hub.test"], "right-password", ["hub.test"])
        index.execute("UPDATE sites SET password_hash = ? WHERE name = ?", (hash_password("right-password", n), name))
    add_site(index, "delta", ["delta@hub.test"], "right-password", ["hub.test"])
    index.execute("UPDATE sites SET password_hash = 'damaged' WHERE name = 'delta'")
    index.commit()
    cache = site_cache.SiteCache(tmp_path, connect=index_connect)
    try:
        assert asyncio.run(unknown_name_check(cache)) == "1024$8$1"  # the cost of two of three hashes
    finally:
        cache.close()


def test_a_changed_password_is_checked_anew(index, index_connect, tmp_path):
    cache = make_cache(index, index_connect, tmp_path)

    async def play():
        assert await cache.authenticate("alpha", "right-password") is not None
        before = cache.by_name("alpha").password_hash
        set_password(index, "alpha", "new-password")
        await until(  # the watcher's thread reloads within about 0.5 s
            lambda: cache.by_name("alpha").password_hash != before,
            timeout=30,
            interval=0.05,
            message="alpha's new password hash loaded",
        )
        return (await cache.authenticate("alpha", "right-password"), await cache.authenticate("alpha", "new-password"))

    try:
        old, new = asyncio.run(play())
    finally:
        cache.close()
    assert old is None and new is not None


def test_lookups_read_memory_and_a_thread_reloads_the_sites(index, index_connect, tmp_path):
    cache = make_cache(index, index_connect, tmp_path)
    try:
        assert cache.by_address("ALPHA@hub.test").name == "alpha" and cache.by_name("beta") is None
        add_site(index, "beta", ["beta@hub.test"], "other-password", ["hub.test"])
        wait_for(lambda: cache.by_name("beta") is not None, timeout=30, interval=0.05, message="the added site loaded")
        assert cache.by_address("beta@hub.test").name == "beta"
        assert [t.name for t in threading.enumerate() if t.name == "watch-sites"] == ["watch-sites"]
    finally:
        cache.close()
    assert not [t for t in threading.enumerate() if t.name == "watch-sites"]
