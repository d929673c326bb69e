# Clocks: rates, pacing, timeouts and drain estimates run on the monotonic clock; the UTC day and
# month of the volume quotas follow the wall clock, and their counts survive wall-clock steps both
# ways (NTP corrections, a VM resumed) without a count lost or counted twice. Pure parts with an
# injected clock, then one hub run under libfaketime (Debian package faketime) whose wall clock
# steps a day forward, back and forward again while the monotonic clock runs on.
import smtplib
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quotas import DrainConfig, SiteLimits, SiteRef, Throttle, ThrottleSettings
from quotas.ledger import VOLUME_WINDOW_DAYS, Ledger
from storage import usage as storage_usage

from conftest import ALPHA_BETA, PASSWORD, make_message, wait_for

T0 = 1_800_000_000.0  # 2027-01-15 08:00 UTC
DAY = 86400.0
MB = 1_000_000
SENDER, RECEIVER = SiteRef(1, "sender"), SiteRef(2, "receiver")


def _day(wall: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(wall))


def _month(wall: float) -> str:
    return time.strftime("%Y-%m", time.gmtime(wall))


def test_window_is_the_same_in_storage_and_quotas():
    assert storage_usage.VOLUME_WINDOW_DAYS == VOLUME_WINDOW_DAYS


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.tuples(st.integers(-3 * 24, 3 * 24), st.integers(1, 5000)), min_size=1, max_size=60))
def test_volume_counts_survive_wall_clock_steps_both_ways(steps):
    """Mails arrive while the wall clock jumps by whole hours forward and back (within the kept
    window): the ledger's volume of every day and month equals the sum of the mails that arrived
    (by the wall clock) in it, as the index's triggers count them."""
    ledger = Ledger()
    ledger.load([], {}, {}, now=0.0, wall=T0)
    wall = T0
    by_day, by_month = Counter(), Counter()
    for hours, size in steps:
        wall += hours * 3600.0
        ledger.committed(1, [2], size, wall)
        by_day[_day(wall)] += size
        by_month[_month(wall)] += size
        usage = ledger.usage(2, wall)
        assert usage.received_today == by_day[_day(wall)]
        assert usage.received_month == by_month[_month(wall)]
        assert ledger.usage(1, wall).submitted_today == by_day[_day(wall)]
    for day_wall in {T0 + h * 3600.0 for h in range(-24 * 30, 24 * 30, 24)}:
        assert ledger.usage(2, day_wall).received_today == by_day[_day(day_wall)]


def test_volumes_of_the_window_are_loaded_and_older_ones_forgotten():
    ledger = Ledger()
    yesterday, old = _day(T0 - DAY), _day(T0 - (VOLUME_WINDOW_DAYS + 5) * DAY)
    ledger.load([], {(2, yesterday): (0, 700), (2, _month(T0)): (0, 900), (2, old): (0, 5)}, {}, now=0.0, wall=T0)
    assert ledger.usage(2, T0 - DAY).received_today == 700  # a step back to yesterday finds it
    ledger.committed(1, [2], 100, T0 + 2 * DAY)  # a new day prunes beyond the window
    assert ledger.usage(2, T0 - DAY).received_today == 700
    assert ledger.usage(2, T0 - (VOLUME_WINDOW_DAYS + 5) * DAY).received_today == 0


def test_poll_times_from_the_index_go_onto_the_monotonic_clock():
    ledger = Ledger()
    ledger.load([], {}, {2: (5000, T0 - 120.0)}, now=50.0, wall=T0)  # polled 2 min before start
    assert ledger.last_poll(2) == pytest.approx(-70.0)
    ledger.load([], {}, {2: (5000, T0 + 3600.0)}, now=50.0, wall=T0)  # a poll "in the future": now
    assert ledger.last_poll(2) == 50.0


def _throttle() -> Throttle:
    return Throttle(
        ThrottleSettings(
            defaults=SiteLimits(max_drain_time=10.0, downlink_prior=1 * MB, received_per_day=30 * MB),
            drain=DrainConfig(window=1.0, tau=2.0, grace=60.0),
            drain_admission=False,
        )
    )


@pytest.mark.parametrize("step", [-DAY, -3600.0, 3600.0, DAY])
def test_drain_rate_pacing_and_deferral_figures_ignore_a_wall_clock_step(step):
    """The site downloads 4 MB/s; halfway the wall clock steps (the monotonic one runs on): the
    measured rate, the offline verdict and the pacing bucket see only the monotonic time, while
    the volume quota counts by the day the wall clock shows."""
    t = _throttle()
    t.ledger.load([], {}, {}, now=100.0, wall=T0)
    t.ledger.committed(1, [2], 50 * MB, T0)
    (bucket,) = t.buckets([RECEIVER], 100.0)
    now, wall = 100.0, T0
    for i in range(80):
        now += 0.25
        wall += 0.25 + (step if i == 40 else 0.0)
        t.ledger.note_poll(2, now)
        t.ledger.note_download(2, 1 * MB, now)
        t.observe([RECEIVER], now)
        state = t.state(RECEIVER, now, wall)
        assert not state["offline"] and 0 <= state["since_poll"] < 1
    assert state["drain_samples"] > 0 and 3 * MB < state["drain_rate"] < 4.2 * MB
    assert bucket.take(1, now) == 0.0
    # the received volume of the day the wall clock shows now: 50 MB arrived on T0's day
    verdict = t.at_rcpt("tx", SENDER, RECEIVER, 1 * MB, now, wall)
    assert verdict.ok == (_day(wall) != _day(T0)), verdict.reply


# ---- the hub under libfaketime ------------------------------------------------------------------

_LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


def _metric(port: int, name: str, site: str) -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(f'{name}{{site="{site}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_hub_under_faketime_steps(make_hub, tmp_path):
    """A received-per-day quota of 3 mails for beta; the wall clock steps +1 day, back, and +1 day
    again (the hub restarted once in between): each day takes exactly 3 mails, whichever way the
    clock went; an SMTP session opened before the steps is not timed out by them; beta's drain
    rate is not taken for offline after a forward step; every 250 is stored once."""
    assert _LIBFAKETIME.exists(), "the Debian package faketime is needed (bench/debian-packages.txt)"
    offset_file = tmp_path / "faketime"
    offset_file.write_text("+0\n")
    mail = make_message(10_000, subject="clock")
    limit = 3 * (len(mail) + 400)  # 3 mails with their Received: header, not 4
    hub = make_hub(
        process=True,
        sites=ALPHA_BETA,
        MAILHUB_QUOTAS_RECEIVED_PER_DAY=str(limit),
        MAILHUB_SMTP_IDLE_TIMEOUT="300",
        MAILHUB_THROTTLE_INTERVAL="0.2",
        LD_PRELOAD=str(_LIBFAKETIME),
        FAKETIME_TIMESTAMP_FILE=str(offset_file),
        FAKETIME_NO_CACHE="1",
        FAKETIME_DONT_FAKE_MONOTONIC="1",
    )
    hub.start()
    acknowledged, refused = [], []

    def step(offset: str) -> None:
        offset_file.write_text(offset + "\n")

    def send(n: int) -> list[int]:
        codes = []
        with smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30) as client:
            client.login("alpha", PASSWORD)
            for _ in range(n):
                client.mail("alpha@hub.test")
                client.rcpt("beta@hub.test")
                code, reply = client.data(mail)
                codes.append(code)
                (acknowledged if code == 250 else refused).append(reply)
                if code != 250:
                    assert code == 452 and reply.startswith(b"4.2.1"), reply
        return codes

    standing = smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30)
    standing.login("alpha", PASSWORD)
    assert send(4) == [250, 250, 250, 452]  # day 0 is full
    step("+1d")
    assert send(4) == [250, 250, 250, 452]  # day 1 starts empty, fills up
    drain = wait_for(
        lambda: _metric(hub.ports["metrics"], "mailhub_site_drain_rate_bytes_per_second", "beta"),
        timeout=20.0,
        interval=0.05,
        message="a drain reading after the step",
    )
    assert drain > 0, "a forward step made beta look offline"
    step("+0")
    assert send(1) == [452]  # back on day 0: its 3 mails still count
    assert standing.noop()[0] == 250  # not timed out by the day-long steps
    standing.quit()
    hub.stop()
    hub.start()  # on day 0; day 1's counts are loaded too
    step("+1d")
    assert send(1) == [452]
    step("+2d")
    assert send(1) == [250]
    hub.stop()
    stored = hub.query("SELECT count(*), count(DISTINCT queue_id) FROM messages")[0]
    days = hub.query(
        "SELECT v.period, v.received_bytes FROM site_volume v JOIN sites s ON s.id = v.site_id"
        " WHERE s.name = 'beta' AND length(v.period) = 10 ORDER BY v.period"
    )
    arrived = hub.query(
        "SELECT strftime('%Y-%m-%d', received_at, 'unixepoch'), count(*), sum(size) FROM messages GROUP BY 1 ORDER BY 1"
    )
    print(
        f"clock steps: acknowledged={len(acknowledged)} refused={len(refused)} stored={stored[0]}"
        f" duplicated={stored[0] - stored[1]} lost={len(acknowledged) - stored[1]} days={arrived}"
    )
    assert stored == (len(acknowledged), len(acknowledged)) == (7, 7)
    assert [count for _, count, _ in arrived] == [3, 3, 1]
    assert days == [(day, total) for day, _, total in arrived]  # the volume counters agree with the mails
    assert "Traceback" not in hub.log_text()


def test_freed_ranges_wait_their_delay_in_real_time(tmp_path, monkeypatch):
    """A range of a pack freed now is released after release_freed_after seconds of monotonic
    time, not earlier when the wall clock steps forward (a reader may still be sending it)."""
    from storage import index_writer

    writer = index_writer.IndexWriter(tmp_path, 3600.0)
    try:
        wall, mono = time.time(), time.monotonic()
        clock = {"wall": wall, "mono": mono}
        monkeypatch.setattr(index_writer.time, "time", lambda: clock["wall"])
        monkeypatch.setattr(index_writer.time, "monotonic", lambda: clock["mono"])
        writer.in_transaction(
            lambda conn: conn.execute(
                "INSERT INTO blob_holes (blob, start, size, freed_at) VALUES ('p', 0, 10, ?)", (wall,)
            )
        )
        clock["wall"] += 2 * 3600.0  # the wall clock jumps two hours ahead
        assert writer.freed() == ([], [])
        clock["mono"] += 3601.0  # over an hour has really passed (mono + 3600.0 - mono
        # is 3599.999... for about 4% of mono values)
        assert writer.freed() == ([], [("p", 0, 10)])
    finally:
        writer.close()
