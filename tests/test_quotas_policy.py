# Unit tests of the quota policy (quotas/) on a simulated clock: no sockets, no sleeps.
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quotas import (
    AdmissionConfig,
    DrainConfig,
    DrainEstimator,
    OpenSets,
    PacingConfig,
    ReceiverState,
    SetPart,
    SiteLimits,
    SiteUsage,
    TokenBucket,
    admit_at_end_of_data,
    admit_at_rcpt,
    check_quotas,
    next_day,
    next_month,
    pacing_rate,
    record_admitted,
)
from quotas.limits import QuotaError

MB = 1_000_000
T0 = 1_780_000_000.0  # a fixed epoch start for the simulated clock


class Receiver:
    """A receiving site that downloads its mailbox FIFO at `speed` bytes/s while online."""

    def __init__(
        self,
        name: str,
        speed: float,
        prior: float,
        now: float,
        limit: float = 1800.0,
        drain_config: DrainConfig = DrainConfig(),
    ):
        self.name, self.speed, self.online = name, speed, True
        self.limits = SiteLimits(max_drain_time=limit, downlink_prior=prior)
        self.queue: deque[list] = deque()  # [sender, bytes left]
        self.backlog: dict[str, int] = {}
        self.downloaded = 0
        self.last_poll: float | None = now
        self.estimator = DrainEstimator(prior, now, drain_config)
        self.estimator.observe(now, 0, 0, now)

    @property
    def total(self) -> int:
        return sum(self.backlog.values())

    def state(self, now: float) -> ReceiverState:
        return ReceiverState(self.name, self.limits, self.estimator.rate(now), dict(self.backlog))

    def deliver(self, sender: str, size: int) -> None:
        self.queue.append([sender, size])
        self.backlog[sender] = self.backlog.get(sender, 0) + size

    def step(self, now: float, dt: float) -> None:
        """Advance by dt seconds: download (if online), then give the estimator a reading."""
        if self.online:
            self.last_poll = now
            budget = int(self.speed * dt)
            while budget and self.queue:
                entry = self.queue[0]
                n = min(budget, entry[1])
                entry[1] -= n
                budget -= n
                self.downloaded += n
                self.backlog[entry[0]] -= n
                if entry[1] == 0:
                    self.queue.popleft()
        self.estimator.observe(now, self.downloaded, self.total, self.last_poll)


def offer(
    now,
    rcv: Receiver,
    sender: str,
    size: int,
    sets: OpenSets,
    part: SetPart | None = None,
    config: AdmissionConfig = AdmissionConfig(),
):
    """One SMTP transaction with SIZE=: RCPT, then end of data; deliver when both accept."""
    state = rcv.state(now)
    first = admit_at_rcpt(now, sender, state, size, sets, config)
    if not first.ok:
        return first
    final = admit_at_end_of_data(now, sender, state, size, part, sets, config, at_rcpt=first)
    if final.ok:
        rcv.deliver(sender, size)
        record_admitted(now, sender, rcv.name, part, sets)
    return first if final.reason == "admitted_at_rcpt" else final  # the deciding verdict


# ---- fast sender, slow receiver ------------------------------------------------------------------


def test_fast_sender_slow_receiver_stays_within_drain_limit():
    now, speed, size = T0, 100_000.0, 5 * MB
    rcv, sets = Receiver("slow", speed, prior=speed, now=now), OpenSets()
    accepted = deferred = 0
    worst = 0.0
    for _ in range(4 * 3600):  # the sender offers a 5 MB mail every second for 4 hours
        now += 1.0
        rcv.step(now, 1.0)
        verdict = offer(now, rcv, "fast", size, sets)
        if verdict.ok:
            accepted += 1
        else:
            deferred += 1
            assert verdict.reply.startswith("451 4.7.0 ")
            assert "try again in" in verdict.reply and "limit 1800 s" in verdict.reply
            assert verdict.figures["drain_seconds"] > 1800
        worst = max(worst, rcv.total / speed)
    assert worst <= 1800 + size / speed  # never more than one mail over the limit
    assert worst >= 1700  # ...and the receiver's capacity is actually used
    # what got in is what the receiver could take: its download volume plus the final backlog
    assert accepted * size == pytest.approx(speed * 4 * 3600 + rcv.total, rel=0.01)
    assert deferred > 10 * accepted


def test_wrong_prior_converges_and_backlog_recovers():
    now, speed, size = T0, 100_000.0, 5 * MB
    rcv, sets = Receiver("slow", speed, prior=1_000_000.0, now=now), OpenSets()
    late_worst = 0.0
    for i in range(4 * 3600):
        now += 1.0
        rcv.step(now, 1.0)
        offer(now, rcv, "fast", size, sets)
        if i >= 3 * 3600:
            late_worst = max(late_worst, rcv.total / speed)
    assert rcv.estimator.samples > 100
    assert rcv.estimator.rate(now) == pytest.approx(speed, rel=0.05)
    assert late_worst <= 1800 * 1.05 + size / speed


def test_idle_time_with_empty_mailbox_does_not_count():
    now = T0
    est = DrainEstimator(prior=50_000.0, now=now)
    est.observe(now, 0, 0, now)
    for _ in range(60):  # an hour of polling an empty mailbox
        now += 60
        est.observe(now, 0, 0, now)
    assert est.samples == 0 and est.rate(now) == 50_000.0  # still the prior
    total = 0
    for _ in range(60):  # then an hour of downloading at 200 KB/s
        now += 60
        total += 200_000 * 60
        est.observe(now, total, 10 * MB, now)
    assert est.samples == 60
    assert est.rate(now) == pytest.approx(200_000, rel=0.01)
    for _ in range(30):  # mail waiting, site polls but downloads nothing
        now += 60
        est.observe(now, total, 10 * MB, now)
    assert est.rate(now) < 0.01 * 200_000


def test_polling_gaps_count_but_an_offline_stretch_does_not():
    """Totals arrive once per session (as site_downloads has them): a site polling every 5 min
    and fetching 30 MB each time drains 100 KB/s; a 2-hour outage does not drag that down."""
    now = T0
    est = DrainEstimator(prior=1_000_000.0, now=now, config=DrainConfig(grace=900.0))
    total, poll = 0, now
    est.observe(now, total, 50 * MB, poll)
    for i in range(240):  # 4 hours, a reading every 10 s
        now += 10
        if i % 30 == 29:  # a session every 300 s
            poll, total = now, total + 30 * MB
        est.observe(now, total, 50 * MB, poll)
    assert est.rate(now) == pytest.approx(100_000, rel=0.05)
    before = est.rate(now)
    for _ in range(720):  # offline for 2 hours with mail waiting
        now += 10
        est.observe(now, total, 50 * MB, poll)
    assert est.rate(now) == 0.0 and est.reading(now).offline
    now += 10
    est.observe(now, total, 50 * MB, now)  # it logs in again
    assert est.rate(now) == pytest.approx(before)


# ---- two senders, one receiver -------------------------------------------------------------------


def test_two_senders_share_a_saturated_receiver():
    now, speed = T0, 100_000.0
    rcv, sets = Receiver("rx", speed, prior=speed, now=now), OpenSets()
    got = {"bulk": 0, "small": 0}
    offered_small = 0
    reasons = {"bulk": set(), "small": set()}
    for i in range(6 * 3600):
        now += 1.0
        rcv.step(now, 1.0)
        v = offer(now, rcv, "bulk", 5 * MB, sets)  # bursts every second
        got["bulk"] += v.ok * 5 * MB
        reasons["bulk"].add(v.reason)
        if i >= 1800 and i % 30 == 0:  # arrives once bulk has saturated it
            offered_small += 1
            v = offer(now, rcv, "small", 1 * MB, sets)
            got["small"] += v.ok * 1 * MB
            reasons["small"].add(v.reason)
    assert "over_fair_share" in reasons["bulk"]
    assert "fair_share" in reasons["small"]
    assert got["small"] == offered_small * 1 * MB  # the small sender is never locked out
    assert got["bulk"] > 2 * got["small"]  # and the bulk sender still gets the rest
    capacity = 1800 * speed
    assert rcv.total <= capacity * 1.5  # bounded by C + the other's fair share


def test_largest_share_is_deferred_first():
    limits = SiteLimits(max_drain_time=100.0)
    state = ReceiverState("rx", limits, 1 * MB, {"a": 90 * MB, "b": 8 * MB, "c": 0})
    sets = OpenSets()
    a = admit_at_rcpt(T0, "a", state, 5 * MB, sets)
    b = admit_at_rcpt(T0, "b", state, 5 * MB, sets)
    c = admit_at_rcpt(T0, "c", state, 5 * MB, sets)
    assert not a.ok and a.reason == "over_fair_share"
    assert "92% of it from your site" in a.reply
    assert b.ok and b.reason == "fair_share" and b.figures["fair_share"] == pytest.approx(50 * MB)
    assert c.ok and c.figures["senders"] == 3
    d = admit_at_rcpt(T0, "b", state, 43 * MB, sets)  # over its fair share of 50 MB
    assert not d.ok and d.reason == "over_fair_share"


# ---- offline and back ----------------------------------------------------------------------------


def test_receiver_offline_then_back():
    now, speed = T0, 200_000.0
    cfg = DrainConfig(grace=900.0)
    rcv, sets = Receiver("rx", speed, prior=speed, now=now, drain_config=cfg), OpenSets()
    for _ in range(600):
        now += 1.0
        rcv.step(now, 1.0)
        offer(now, rcv, "s", 1 * MB, sets)
    measured = rcv.estimator.rate(now)
    assert measured == pytest.approx(speed, rel=0.05)
    rcv.online = False
    went_offline = now
    outcomes = []
    for _ in range(3600):
        now += 1.0
        rcv.step(now, 1.0)
        outcomes.append((now - went_offline, offer(now, rcv, "s", 1 * MB, sets)))
    # within the grace period the old estimate holds; after it the site drains nothing
    assert all(v.figures["rate"] == pytest.approx(measured) for t, v in outcomes if t <= 899)
    late = [v for t, v in outcomes if t > 901]
    assert all(v.figures["rate"] == 0.0 and not v.ok for v in late)
    assert "not downloading" in late[-1].reply and "try again in 600 s" in late[-1].reply
    backlog_offline = rcv.total
    assert backlog_offline <= 1800 * speed + 1 * MB
    # it comes back: the estimate is the one measured before (offline time did not count)
    rcv.online = True
    now += 1.0
    rcv.step(now, 1.0)
    assert rcv.estimator.rate(now) == pytest.approx(measured)
    accepted_back = 0
    for _ in range(1800):
        now += 1.0
        rcv.step(now, 1.0)
        accepted_back += offer(now, rcv, "s", 1 * MB, sets).ok
        assert rcv.total <= 1800 * speed + 1 * MB
    # admission resumes at the pace the site downloads again (200 KB/s -> 360 mails of 1 MB)
    assert accepted_back * MB == pytest.approx(1800 * speed, rel=0.02)
    assert rcv.estimator.rate(now) == pytest.approx(speed, rel=0.05)


def test_floor_lets_a_quiet_or_new_site_receive():
    limits = SiteLimits(max_drain_time=60.0, downlink_prior=1000.0)
    sets = OpenSets()
    empty_offline = ReceiverState("new", limits, 0.0, {})
    big = admit_at_rcpt(T0, "s", empty_offline, 500 * MB, sets)  # bigger than any capacity
    assert big.ok and big.reason == "floor"
    small = ReceiverState("new", limits, 0.0, {"s": 1 * MB})
    assert admit_at_rcpt(T0, "s", small, 1 * MB, sets).reason == "floor"
    assert admit_at_rcpt(T0, "s", small, 15 * MB, sets).ok  # 16 MB <= 16 MiB floor
    assert not admit_at_rcpt(T0, "s", small, 16 * MB, sets).ok  # 17 MB > 16 MiB


def test_no_size_at_rcpt_is_decided_at_end_of_data():
    limits = SiteLimits(max_drain_time=100.0)
    state = ReceiverState("rx", limits, 1 * MB, {"s": 100 * MB})
    sets = OpenSets()
    first = admit_at_rcpt(T0, "s", state, None, sets)
    assert first.ok and first.reason == "deferred_to_end_of_data"
    final = admit_at_end_of_data(T0, "s", state, 1 * MB, None, sets, at_rcpt=first)
    assert not final.ok and final.figures["stage"] == "end_of_data"
    # admitted at RCPT with SIZE=, and not bigger: stands; bigger than declared: judged again
    roomy = ReceiverState("rx", limits, 1 * MB, {"s": 10 * MB})
    ok = admit_at_rcpt(T0, "s", roomy, 1 * MB, sets)
    assert admit_at_end_of_data(T0, "s", state, 1 * MB, None, sets, at_rcpt=ok).reason == "admitted_at_rcpt"
    assert not admit_at_end_of_data(T0, "s", state, 2 * MB, None, sets, at_rcpt=ok).ok


# ---- study sets ----------------------------------------------------------------------------------


def test_study_set_straddling_the_limit_finishes_before_new_sets():
    limits = SiteLimits(max_drain_time=100.0)  # capacity 100 MB at 1 MB/s
    rate = 1 * MB
    sets = OpenSets()
    cfg = AdmissionConfig(set_overshoot=0.25, floor_bytes=0)
    backlog = {"s": 70 * MB}
    results = []
    for part in range(1, 6):  # 5 parts of 10 MB: 120 MB in all
        p = SetPart("study-1", part, 5)
        state = ReceiverState("rx", limits, rate, dict(backlog))
        v_rcpt = admit_at_rcpt(T0 + part, "s", state, 10 * MB, sets, cfg)
        v = admit_at_end_of_data(T0 + part, "s", state, 10 * MB, p, sets, cfg, at_rcpt=v_rcpt)
        results.append((v_rcpt.reason, v.reason))
        if v.ok:
            backlog["s"] += 10 * MB
            record_admitted(T0 + part, "s", "rx", p, sets)
    assert results[0] == ("within_limit", "admitted_at_rcpt")
    assert results[2] == ("within_limit", "admitted_at_rcpt")  # exactly 100 MB
    assert results[3] == ("set_overshoot", "set_overshoot")  # 110 MB: finishing
    assert results[4] == ("set_overshoot", "set_overshoot")  # 120 MB <= 125 MB
    assert sets.open_for(T0 + 10, "s", "rx") == []  # complete: closed
    # at 120 MB a new set from the same sender gets no overshoot, neither does an unrelated mail
    state = ReceiverState("rx", limits, rate, dict(backlog))
    new = SetPart("study-2", 1, 3)
    assert not admit_at_end_of_data(T0 + 10, "s", state, 1 * MB, new, sets, cfg).ok
    assert not admit_at_end_of_data(T0 + 10, "s", state, 1 * MB, None, sets, cfg).ok


def test_set_overshoot_is_bounded_and_new_sets_wait():
    limits = SiteLimits(max_drain_time=100.0)
    sets = OpenSets()
    cfg = AdmissionConfig(set_overshoot=0.25, floor_bytes=0)
    record_admitted(T0, "s", "rx", SetPart("a", 1, 10), sets)
    state = ReceiverState("rx", limits, 1 * MB, {"s": 120 * MB})
    cont = SetPart("a", 2, 10)
    # at RCPT the headers are unknown: an open set lets the mail through provisionally
    r = admit_at_rcpt(T0, "s", state, 5 * MB, sets, cfg)
    assert r.ok and r.reason == "set_overshoot"
    assert admit_at_end_of_data(T0, "s", state, 5 * MB, cont, sets, cfg, at_rcpt=r).ok
    v = admit_at_end_of_data(T0, "s", state, 5 * MB, SetPart("b", 1, 2), sets, cfg, at_rcpt=r)
    assert not v.ok  # a new set is judged again and deferred
    assert not admit_at_rcpt(T0, "s", state, 6 * MB, sets, cfg).ok  # 126 MB > 125 MB
    assert not admit_at_end_of_data(T0, "s", state, 6 * MB, cont, sets, cfg).ok
    # an abandoned set stops counting after the expiry
    assert not sets.is_open(T0 + 25 * 3600, "s", "rx", "a")


_SET_STEPS = st.lists(
    st.tuples(
        st.sampled_from(["admit", "expire"]),
        st.sampled_from(["s1", "s2"]),
        st.sampled_from(["r1", "r2"]),
        st.sampled_from(["a", "b", "c"]),
        st.integers(1, 3),
        st.integers(0, 40),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(_SET_STEPS)
def test_open_sets_match_a_plain_model(steps):
    """OpenSets keeps each (sender, receiver) pair's sets apart, and answers as one flat table of
    all sets does: a set is open from its first part until all its parts are in, or until `expiry`
    seconds without a part (expire() forgets it then)."""
    expiry = 30.0
    sets, model, now = OpenSets(expiry=expiry), {}, T0  # model: (sender, receiver, set) -> (parts, last)
    for action, sender, receiver, set_id, part, advance in steps:
        now += advance
        if action == "admit":
            sets.admitted(now, sender, receiver, SetPart(set_id, part, 3))
            parts = model.get((sender, receiver, set_id), (frozenset(), now))[0] | {part}
            if len(parts) == 3:
                model.pop((sender, receiver, set_id), None)
            else:
                model[(sender, receiver, set_id)] = (parts, now)
        else:
            sets.expire(now)
            model = {key: entry for key, entry in model.items() if now - entry[1] <= expiry}
        for s in ("s1", "s2"):
            for r in ("r1", "r2"):
                expected = [i for i in "abc" if (s, r, i) in model and now - model[(s, r, i)][1] <= expiry]
                assert sorted(sets.open_for(now, s, r)) == expected
                assert [i for i in "abc" if sets.is_open(now, s, r, i)] == expected


def test_set_headers_parsing():
    assert SetPart.from_headers(" abc ", "2", "3") == SetPart("abc", 2, 3)
    assert SetPart.from_headers("abc", "4", "3") is None
    assert SetPart.from_headers("abc", "x", "3") is None
    assert SetPart.from_headers(None, 1, 1) is None


# ---- quota edges ---------------------------------------------------------------------------------


def test_mailbox_quota_edges():
    limits = SiteLimits(mailbox_bytes=1000, mailbox_messages=3, max_message_size=600)
    usage = SiteUsage(mailbox_bytes=400, mailbox_messages=2)
    at = check_quotas(None, (limits, usage), 600, T0)
    assert at.ok
    over = check_quotas(None, (limits, usage), 601, T0)
    assert not over.ok and over.reply.startswith("552 5.3.4 ")  # size limit first
    nearly = SiteUsage(mailbox_bytes=401, mailbox_messages=2)
    full = check_quotas(None, (limits, nearly), 600, T0)
    assert not full.ok and full.reply.startswith("452 4.2.2 ") and full.reason == "mailbox_bytes"
    assert full.figures["mailbox_bytes"] == 401 and full.figures["bytes_limit"] == 1000
    three = check_quotas(None, (limits, SiteUsage(mailbox_bytes=0, mailbox_messages=3)), 1, T0)
    assert three.reason == "mailbox_messages" and three.reply.startswith("452 4.2.2 ")
    # no SIZE= at RCPT: counts as one byte, so a mailbox exactly full is refused at once
    exactly_full = SiteUsage(mailbox_bytes=1000, mailbox_messages=0)
    assert not check_quotas(None, (limits, exactly_full), None, T0).ok
    assert check_quotas(None, (limits, SiteUsage(mailbox_bytes=999)), None, T0).ok
    assert isinstance(full.error, QuotaError)


def test_volume_quota_edges_and_retry_time():
    now = T0 + 3600.0 * 5.5
    rl = SiteLimits(received_per_day=10_000, received_per_month=50_000)
    sl = SiteLimits(submitted_per_day=20_000, submitted_per_month=30_000)
    ru, su = SiteUsage(received_today=9_000, received_month=9_000), SiteUsage()
    assert check_quotas((sl, su), (rl, ru), 1_000, now).ok
    day = check_quotas((sl, su), (rl, ru), 1_001, now)
    assert day.reply.startswith("452 4.2.1 ") and day.reason == "received_per_day"
    assert day.figures["retry_at"] == next_day(now) and "for today" in day.reply
    assert next_day(now) - now <= 86400 and next_day(now) % 86400 == 0
    sent = SiteUsage(submitted_today=0, submitted_month=29_500)
    month = check_quotas((sl, sent), (rl, SiteUsage()), 501, now)
    assert month.reply.startswith("451 4.7.1 ") and month.reason == "submitted_per_month"
    assert month.figures["retry_at"] == next_month(now) and "this month" in month.reply
    assert check_quotas((sl, sent), (rl, SiteUsage()), 500, now).ok
    assert next_month(1_798_761_599.0) == 1_798_761_600.0  # 2026-12-31 23:59:59 -> 2027-01-01


def test_verdict_log_text():
    state = ReceiverState("rx", SiteLimits(max_drain_time=10.0), 1000.0, {"s": 20 * MB})
    v = admit_at_rcpt(T0, "s", state, 1 * MB, OpenSets())
    text = v.log_text()
    assert text.startswith("refuse reason=drain_time ") and "receiver=rx" in text
    assert "rate=1000.000" in text and "limit=10.000" in text


# ---- pacing --------------------------------------------------------------------------------------


def test_pacing_is_off_while_receivers_keep_up():
    cfg = PacingConfig()
    assert pacing_rate([(100.0, 1800.0, 50_000.0), (899.0, 1800.0, 10_000.0)], cfg) is None
    bucket = TokenBucket(None, T0, cfg)
    assert all(bucket.take(10 * MB, T0) == 0.0 for _ in range(100))
    assert bucket.tokens == 0.0  # no account kept
    assert pacing_rate([(2000.0, 1800.0, 1e6)], PacingConfig(enabled=False)) is None
    assert pacing_rate([(1799.0, 1800.0, 1e6)], cfg) is None  # by default: only over the limit
    assert pacing_rate([(1801.0, 1800.0, 1e6)], cfg) == 1e6


def test_pacing_follows_slowest_lagging_receiver_with_a_floor():
    cfg = PacingConfig(min_rate=64_000.0, engage_at=0.5)
    assert (
        pacing_rate([(1000.0, 1800.0, 300_000.0), (1500.0, 1800.0, 200_000.0), (10.0, 1800.0, 1000.0)], cfg)
        == 200_000.0
    )
    assert pacing_rate([(1000.0, 1800.0, 0.0)], cfg) == 64_000.0


def test_token_bucket_limits_long_run_rate_and_caps_waits():
    cfg = PacingConfig(min_rate=10_000.0, burst_seconds=2.0, max_wait=30.0)
    now = T0
    bucket = TokenBucket(100_000.0, now, cfg)
    assert bucket.take(200_000, now) == 0.0  # the burst is free
    wait = bucket.take(50_000, now)
    assert wait == pytest.approx(0.5)
    read = 250_000
    for _ in range(600):  # a reader obeying the waits
        now += wait
        wait = bucket.take(65_536, now)
        read += 65_536
    elapsed = now - T0
    assert read / elapsed == pytest.approx(100_000.0, rel=0.02)
    # the rate drops to a very slow drain: floored, and a single wait never exceeds max_wait
    bucket.set_rate(1.0, now)
    assert bucket.rate == 10_000.0
    assert bucket.take(1 * MB, now) == 30.0
    # unpaced again: no wait at all; paced again: starts with a full bucket
    bucket.set_rate(None, now)
    assert bucket.take(1 * MB, now) == 0.0
    bucket.set_rate(50_000.0, now)
    assert bucket.take(100_000, now) == 0.0 and bucket.take(1, now) > 0.0
