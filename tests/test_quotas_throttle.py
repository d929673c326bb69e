# The throttle as the server uses it, in memory on a simulated clock: the ledger kept by storage's
# change reports, reservations of transactions in flight, downloads of sessions still open, site
# overrides of the config's limits, per-receiver intake buckets.
from hypothesis import given, settings
from hypothesis import strategies as st

from quotas import AdmissionConfig, DrainConfig, SiteLimits, SiteRef, Throttle, ThrottleSettings, merge_limits
from quotas.ledger import Ledger

T0 = 1_800_000_000.0
MB = 1_000_000
SENDER = SiteRef(1, "sender")
RECEIVER = SiteRef(2, "receiver")


def throttle(**limits) -> Throttle:
    return Throttle(
        ThrottleSettings(
            defaults=SiteLimits(max_drain_time=10.0, downlink_prior=1 * MB, **limits),
            admission=AdmissionConfig(floor_bytes=1 * MB),
            drain=DrainConfig(window=1.0, tau=2.0, grace=60.0),
        )
    )


def test_ledger_follows_commits_downloads_and_removals():
    t = throttle()
    t.ledger.load([], {}, {})
    t.ledger.committed(1, [2], 3 * MB, T0)
    t.ledger.committed(None, [2], 1 * MB, T0)  # from a peer network: no site
    assert t.ledger.waiting(2) == {1: 3 * MB, 0: 1 * MB}
    t.ledger.fetched(2, uid=7, sender=1, size=3 * MB)  # sent in a session still open
    assert t.ledger.waiting(2) == {0: 1 * MB}
    t.ledger.fetched_committed(2, 7, 1, 3 * MB)  # the session's end reached the index
    assert t.ledger.waiting(2) == {0: 1 * MB}
    t.ledger.removed(2, 7, 1, 3 * MB, was_waiting=False)
    t.ledger.removed(2, 8, None, 1 * MB, was_waiting=True)
    assert t.ledger.waiting(2) == {}
    usage = t.ledger.usage(2, T0)
    assert (usage.mailbox_bytes, usage.mailbox_messages, usage.received_today) == (0, 0, 4 * MB)
    assert t.ledger.usage(1, T0).submitted_today == 3 * MB


def test_reservations_count_for_others_until_released():
    t = throttle(mailbox_bytes=10 * MB)
    assert t.at_rcpt("tx1", SENDER, RECEIVER, 6 * MB, T0, T0).ok
    assert t.ledger.usage(2, T0).mailbox_bytes == 6 * MB
    refused = t.at_rcpt("tx2", SENDER, RECEIVER, 5 * MB, T0, T0)
    assert refused.reply.startswith("452 4.2.2")
    # the transaction's own reservation does not limit its own data stream
    assert t.stream_limit("tx1", SENDER, [RECEIVER])[0] == 10 * MB
    assert t.stream_limit("tx2", SENDER, [RECEIVER])[0] == 4 * MB
    t.release("tx1")
    assert t.at_rcpt("tx2", SENDER, RECEIVER, 5 * MB, T0, T0).ok


def test_site_overrides_and_unlimited():
    defaults = SiteLimits(mailbox_bytes=10, max_drain_time=1800.0)
    limits = merge_limits(defaults, {"mailbox_bytes": -1, "max_drain_time": 60, "downlink": 5000})
    assert (limits.mailbox_bytes, limits.max_drain_time, limits.downlink_prior) == (None, 60.0, 5000.0)
    t = throttle(mailbox_messages=1)
    site = SiteRef(3, "roomy", {"mailbox_messages": -1})
    t.ledger.committed(1, [3], 10, T0)
    assert t.at_rcpt("tx", SENDER, site, 10, T0, T0).ok
    site.limits = {}
    assert t.at_rcpt("tx2", SENDER, site, 10, T0, T0).reply.startswith("452 4.2.2")


def test_drain_deferral_counts_and_end_of_data_releases():
    t = throttle()
    t.ledger.committed(1, [2], 9 * MB, T0)  # 9 s of a 10 s limit at 1 MB/s
    verdict = t.at_rcpt("tx", SENDER, RECEIVER, 2 * MB, T0, T0)
    assert verdict.reply.startswith("451 4.7.0 Deferred: receiver would need 11 s")
    assert t.state(RECEIVER, T0, T0)["deferrals"] == 1 and t.state(RECEIVER, T0, T0)["saturated"] is False
    assert t.at_rcpt("tx", SENDER, RECEIVER, 1 * MB, T0, T0).ok
    assert t.at_end_of_data("tx", SENDER, [(RECEIVER, None)], 1 * MB, None, T0, T0).ok
    assert t.ledger.waiting(2) == {1: 10 * MB}  # the mail's size stays reserved until it is counted
    t.ledger.committed(1, [2], 1 * MB, T0)
    t.release("tx")  # as Storage.commit's on_committed does
    assert t.ledger.waiting(2) == {1: 10 * MB} and t.ledger.reserved() == 0


def test_drain_rate_is_measured_from_downloads_while_mail_waits():
    t = throttle()
    t.ledger.committed(1, [2], 50 * MB, T0)
    now = T0
    for _ in range(40):  # the site downloads 4 MB/s for 10 s
        now += 0.25
        t.ledger.note_download(2, 1 * MB, now)
        t.observe([RECEIVER], now)
    state = t.state(RECEIVER, now, T0)
    assert state["drain_samples"] > 0 and 3 * MB < state["drain_rate"] < 4.2 * MB


def test_intake_bucket_engages_for_a_lagging_receiver_only():
    t = throttle()
    (bucket,) = t.buckets([RECEIVER], T0)
    assert bucket.rate is None and bucket.take(100 * MB, T0) == 0.0
    t.ledger.committed(1, [2], 8 * MB, T0)  # 8 s of 10: keeping up
    t.observe([RECEIVER], T0 + 0.05)
    assert bucket.rate is None
    t.ledger.committed(1, [2], 4 * MB, T0)  # 12 s of 10: over capacity
    t.observe([RECEIVER], T0 + 0.1)
    assert bucket.rate == 1 * MB
    assert bucket.take(3 * MB, T0 + 0.1) > 0  # beyond the 2 s burst: wait


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.booleans(), st.integers(0, 4), st.integers(1, 3), st.integers(0, 2), st.integers(0, 5000)),
        max_size=40,
    )
)
def test_reservations_count_in_usage_and_backlog_as_they_come_and_go(steps):
    """The ledger's running sums of reservations (mailbox, volumes, backlog) match a plain count
    over the transactions open."""
    ledger = Ledger()
    ledger.load([(1, 0, 100, 1, 100, 1), (2, 1, 50, 1, 0, 0)], {}, {})
    tokens = [object() for _ in range(5)]
    open_ = {}  # token index -> [(receiver, sender, size)]
    for reserve, t, receiver, sender, size in steps:
        if reserve:
            ledger.reserve(tokens[t], receiver, sender, size)
            open_.setdefault(t, []).append((receiver, sender, size))
        else:
            ledger.release(tokens[t])
            open_.pop(t, None)
        for site in (1, 2, 3):
            for excluding in (None, tokens[0]):
                mine = [
                    s
                    for i, items in open_.items()
                    if excluding is None or tokens[i] is not excluding
                    for r, _sender, s in items
                    if r == site
                ]
                usage = ledger.usage(site, 0.0, excluding)
                held = {1: (100, 1), 2: (50, 1)}.get(site, (0, 0))
                assert (usage.mailbox_bytes, usage.mailbox_messages) == (held[0] + sum(mine), held[1] + len(mine))
                assert usage.received_today == usage.received_month == sum(mine)
                # a mail in flight counts once against its sender's volumes, however many receivers
                sent = sum(
                    max([b for _r, snd, b in items if snd == site], default=0)
                    for i, items in open_.items()
                    if excluding is None or tokens[i] is not excluding
                )
                assert usage.submitted_today == usage.submitted_month == sent
            backlog = {1: {0: 100}}.get(site, {}).copy()
            for items in open_.values():
                for r, s, b in items:
                    if r == site:
                        backlog[s] = backlog.get(s, 0) + b
            assert ledger.waiting(site) == {s: b for s, b in backlog.items() if b > 0}
