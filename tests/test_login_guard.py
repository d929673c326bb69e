# The password-guessing guard (relay/login_guard.py) as pure logic with an injected clock: growing,
# capped, decaying penalty per address; turns across parallel attempts; per-pair blocks that hold
# against the right password; no account-wide lock; bounded memory; log lines rate-limited per
# address and in total.
import pytest

from relay.login_guard import GuardSettings, LoginGuard, client_key

A, B = "192.0.2.1", "198.51.100.7"


def fail(guard, address, account, now, times=1):
    return [guard.failed(address, account, now) for _ in range(times)][-1]


def test_delay_grows_with_failures_is_capped_and_decays():
    guard = LoginGuard(GuardSettings(failure_delay=0.5, max_delay=15, half_life=600))
    delays = [guard.failed(A, f"user{i}", 0.0).delay for i in range(8)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0]
    # the next attempt from A waits for its turn, whatever the account or the connection
    assert guard.admit(A, "someone", 0.0).wait == pytest.approx(15.0)
    # decay: the score of 8 halves every 10 minutes
    assert guard.admit(A, "x", 600.0 + 100).go
    assert guard.listing(1200.0)[0]["score"] == pytest.approx(2.0)
    assert guard.listing(1200.0)[0]["delay"] == pytest.approx(1.0)
    assert guard.listing(4 * 3600.0) == []
    assert guard.admit(A, "x", 4 * 3600.0).wait == 0.0


def test_parallel_attempts_take_turns_and_an_overlong_queue_is_refused():
    guard = LoginGuard(GuardSettings(failure_delay=1.0, max_wait=10))
    fail(guard, A, "alpha", 0.0, times=3)  # delay now 4 s; next turn at t=4
    waits = [guard.admit(A, "alpha", 0.0) for _ in range(4)]
    assert [w.wait for w in waits[:2]] == [4.0, 8.0]
    assert waits[2].too_busy and not waits[2].go  # would wait 12 s > max_wait
    assert waits[3].too_busy
    # another address is not slowed at all
    assert guard.admit(B, "alpha", 0.0).wait == 0.0 and guard.admit(B, "alpha", 0.0).go


def test_too_many_failures_block_the_pair_even_for_the_right_password():
    guard = LoginGuard(GuardSettings(max_failures=5, block_time=900, max_wait=1e9))
    results = [guard.failed(A, "alpha", float(t)) for t in range(5)]
    assert [r.blocked_now for r in results] == [False] * 4 + [True]
    assert results[-1].pair_failures == 5 and results[-1].blocked_until == 904.0
    blocked = guard.admit(A, "ALPHA", 10.0)  # account names compare without case
    assert not blocked.go and blocked.blocked_until == 904.0
    # the same site from another address is not locked out; another account from A is not blocked
    assert guard.admit(B, "alpha", 10.0).go
    assert guard.admit(A, "beta", 10.0).go
    # the block ends by itself; then one more failure blocks again at once (the count is kept)
    assert guard.admit(A, "alpha", 905.0).go
    assert guard.failed(A, "alpha", 906.0).blocked_now
    # ...but a right password after the block forgets the pair's failures
    guard.succeeded(A, "alpha")
    assert guard.admit(A, "alpha", 907.0).go
    assert not any(guard.failed(A, "alpha", 908.0 + t).blocked_now for t in range(4))


def test_pair_failures_are_forgotten_after_the_window():
    guard = LoginGuard(GuardSettings(max_failures=3, failure_window=3600))
    fail(guard, A, "alpha", 0.0, times=2)
    assert guard.failed(A, "alpha", 3601.0 + 2).pair_failures == 1


def test_listing_and_unblock():
    guard = LoginGuard(GuardSettings(max_failures=2, block_time=100))
    fail(guard, A, "alpha", 0.0, times=2)
    fail(guard, A, "beta", 0.0, times=2)
    fail(guard, B, "gamma", 0.0)
    rows = guard.listing(10.0)
    assert [r["address"] for r in rows] == [A, B]
    assert rows[0]["failures"] == 4 and rows[0]["delay"] > 0
    assert rows[0]["blocks"] == [
        {"account": "alpha", "seconds_left": 90.0, "failures": 2},
        {"account": "beta", "seconds_left": 90.0, "failures": 2},
    ]
    assert guard.unblock(A, "Alpha") == 1
    assert guard.admit(A, "alpha", 10.0).go and not guard.admit(A, "beta", 10.0).go
    assert guard.unblock(A) == 2  # the address's penalty and its remaining pair
    assert guard.admit(A, "beta", 10.0).wait == 0.0 and guard.admit(A, "beta", 10.0).go
    assert guard.unblock(A) == 0
    assert [r["address"] for r in guard.listing(10.0)] == [B]


def test_memory_is_bounded_whatever_the_number_of_addresses_and_accounts():
    guard = LoginGuard(GuardSettings(max_entries=1000, max_failures=3, block_time=1e6))
    fail(guard, A, "victim", 0.0, times=3)  # blocked and the oldest: unblocked entries go first
    for i in range(20000):
        guard.failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", f"user{i}", 1.0 + i * 1e-4)
    assert len(guard._addresses) <= 1000 and len(guard._pairs) <= 1000
    assert not guard.admit(A, "victim", 10.0).go


def test_log_lines_are_rate_limited_per_address():
    guard = LoginGuard(GuardSettings(log_lines_per_minute=3))
    decisions = [guard.log_line(A, t * 0.1) for t in range(10)]
    assert [d[0] for d in decisions] == [True] * 3 + [False] * 7
    assert guard.log_line(B, 0.5) == (True, 0, 0)  # other addresses have their own budget
    assert guard.log_line(A, 61.0) == (True, 7, 0)  # the next minute says how many went unlogged
    assert guard.log_line(A, 61.1) == (True, 0, 0)


def test_log_lines_from_many_addresses_are_rate_limited_together():
    guard = LoginGuard(GuardSettings(log_lines_per_minute=3, log_lines_per_minute_total=50))
    decisions = [guard.log_line(f"10.0.{n // 256}.{n % 256}", n * 0.01) for n in range(1000)]
    assert sum(logged for logged, _, _ in decisions) == 50
    # the next minute says once how many of all addresses went unlogged (not again per address)
    assert guard.log_line("10.9.9.9", 70.0) == (True, 0, 950)
    assert guard.log_line("10.0.0.1", 70.1) == (True, 0, 0)


@pytest.mark.parametrize(
    "ip, key",
    [
        ("192.0.2.1", "192.0.2.1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::9", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("local", "local"),
    ],
)
def test_client_key(ip, key):
    assert client_key(ip) == key
