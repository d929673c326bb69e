# Quotas over real SMTP: limits set with `mailhub site set` on a running hub take effect at RCPT
# (with SIZE=) and while the data streams (without), with their exact replies; exactly at a limit is
# accepted and one byte over refused; usage shows in `mailhub site show` and in /metrics.
import json
import re
import smtplib
import time
import urllib.request

import pytest

from conftest import ALPHA_BETA, PASSWORD, RawSMTP, wait_for

# Every test that starts a hub runs on SQLite and again on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_engines


def show(hub, name: str) -> dict:
    return json.loads(hub.cli("site", "show", name, "--json").stdout)


def used(hub, name: str, limit: str):
    return show(hub, name)["limits"][limit]["used"]


def body(size: int) -> bytes:
    """A message of exactly `size` octets as sent (ending in CRLF, so smtplib adds nothing)."""
    head = b"Subject: quota\r\n\r\n"
    line = b"x" * 76 + b"\r\n"  # SMTP lines are at most 998 characters
    full, rest = divmod(size - len(head), len(line))
    if rest < 2 and full:
        full, rest = full - 1, rest + len(line)  # the last line needs room for its CRLF
    return head + line * full + b"x" * (rest - 2) + b"\r\n"


def set_limits(hub, name: str, *options: str) -> None:
    hub.cli("site", "set", name, *options)
    hub.sites_reloaded()


def submit(hub, rcpt: str, data: bytes, declare_size: bool = True, login: str = "alpha"):
    """(code, text) of the transaction: RCPT refusal or the reply to the end of data."""
    with smtplib.SMTP("127.0.0.1", hub.smtp_port) as smtp:
        smtp.login(login, PASSWORD)
        smtp.ehlo()
        if not declare_size:
            smtp.esmtp_features.pop("size", None)
        try:
            smtp.sendmail(f"{login}@hub.test", [rcpt], data)
        except smtplib.SMTPRecipientsRefused as exc:
            return exc.recipients[rcpt][0], exc.recipients[rcpt][1].decode()
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error.decode()
        return 250, ""


def test_mailbox_bytes_exactly_at_the_limit_and_one_byte_over(hub):
    assert submit(hub, "beta@hub.test", body(1000))[0] == 250
    held = used(hub, "beta", "mailbox_bytes")
    received = held - 1000  # the stored size includes the hub's Received: header (same length each time)
    assert received > 0
    set_limits(hub, "beta", "--mailbox-bytes", str(held + 2000 + received))
    # one byte over (with its Received: header, as the mailbox stores it): refused at the end of
    # data with SIZE=, and while streaming without SIZE=
    assert submit(hub, "beta@hub.test", body(2001)) == (
        452,
        "4.2.2 Mailbox of the recipient site is full, try again later",
    )
    assert submit(hub, "beta@hub.test", body(2001), declare_size=False)[0:1] == (452,)
    assert used(hub, "beta", "mailbox_bytes") == held
    # exactly at the limit: accepted
    assert submit(hub, "beta@hub.test", body(2000))[0] == 250
    assert used(hub, "beta", "mailbox_bytes") == held + 2000 + received
    assert submit(hub, "beta@hub.test", body(10))[0] == 452
    # back to the default: accepted again
    set_limits(hub, "beta", "--mailbox-bytes", "default")
    assert submit(hub, "beta@hub.test", body(10))[0] == 250


def test_mailbox_message_count(hub):
    set_limits(hub, "beta", "--mailbox-messages", "2")
    assert submit(hub, "beta@hub.test", body(100))[0] == 250
    assert submit(hub, "beta@hub.test", body(100))[0] == 250
    code, text = submit(hub, "beta@hub.test", body(100))
    assert (code, text[:5]) == (452, "4.2.2")
    assert submit(hub, "alpha@hub.test", body(100), login="beta")[0] == 250  # other mailboxes unaffected


def test_site_message_size_limit_is_552_and_the_connection_stays_usable(hub):
    set_limits(hub, "beta", "--max-message-size", "5000")
    assert submit(hub, "beta@hub.test", body(5000))[0] == 250
    assert submit(hub, "beta@hub.test", body(5001)) == (552, "5.3.4 Message size exceeds fixed maximum message size")
    s = RawSMTP(hub.smtp_port)
    try:
        s.ehlo()
        assert s.auth_plain("alpha").startswith(b"235")
        for rcpt, data, expected in ((b"beta", b"y" * 6000, b"552 5.3.4"), (b"alpha", b"ok", b"250")):
            assert s.command(b"MAIL FROM:<alpha@hub.test>").startswith(b"250")
            assert s.command(b"RCPT TO:<" + rcpt + b"@hub.test>").startswith(b"250")
            assert s.command(b"DATA").startswith(b"354")
            s.send(b"Subject: size\r\n\r\n" + data + b"\r\n.\r\n")
            assert s.reply().startswith(expected)
    finally:
        s.sock.close()


def test_received_and_submitted_volume_per_day(hub):
    set_limits(hub, "beta", "--received-per-day", "3000")
    assert submit(hub, "beta@hub.test", body(1000))[0] == 250  # stored with its header: > 1000
    code, text = submit(hub, "beta@hub.test", body(2500))
    assert code == 452 and text.startswith("4.2.1") and "for today, try again after" in text
    set_limits(hub, "alpha", "--submitted-per-month", "1500")
    code, text = submit(hub, "alpha@hub.test", body(1000), login="beta")  # beta sends: no limit
    assert code == 250
    code, text = submit(hub, "beta@hub.test", body(1000))  # alpha sent > 1000 already
    assert code == 451 and text.startswith("4.7.1") and "for this month" in text
    summary = show(hub, "alpha")
    assert summary["limits"]["submitted_per_month"]["limit"] == 1500
    assert summary["limits"]["submitted_per_month"]["used"] > 1000


def test_drain_time_deferral_says_why_and_when(make_hub):
    hub = make_hub(sites=ALPHA_BETA, MAILHUB_THROTTLE_FLOOR_BYTES="1000", MAILHUB_THROTTLE_INTERVAL="0.2")
    hub.start()
    set_limits(hub, "beta", "--max-drain-time", "10", "--downlink", "100")  # capacity 1000 bytes
    assert submit(hub, "beta@hub.test", body(900))[0] == 250  # within the floor
    code, text = submit(hub, "beta@hub.test", body(900))
    assert code == 451
    assert text.startswith("4.7.0 Deferred: beta would need") and "limit 10 s" in text and "try again in" in text
    code, text = submit(hub, "beta@hub.test", body(900), declare_size=False)  # decided at end of data
    assert code == 451 and text.startswith("4.7.0")
    deferred_at = time.time()
    # the live state is written every 5 s: wait for the first write after the deferrals
    wait_for(
        lambda: hub.query(
            "SELECT 1 FROM site_throttle JOIN sites ON sites.id = site_id WHERE name = 'beta' AND updated_at > ?",
            deferred_at,
        ),
        interval=0.1,
        message="beta's live throttle state written after the deferrals",
    )
    summary = show(hub, "beta")
    assert summary["throttle"]["saturated"] is True and summary["throttle"]["deferrals"] == 2
    text = hub.cli("site", "show", "beta").stdout
    assert "SATURATED" in text and "2 deferral(s)" in text and "max_drain_time       10 s  (site)" in text
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{hub.ports['metrics']}/metrics").read().decode()
    assert 'mailhub_smtp_deferrals_total{reason="drain_time"} 2.0' in metrics
    assert 'mailhub_site_max_drain_time_seconds{site="beta"} 10.0' in metrics
    assert 'mailhub_site_quota_usage_ratio{quota="mailbox_messages",site="beta"}' in metrics


@pytest.mark.parametrize("pacing", [True, False])
def test_pacing_reads_a_big_mail_no_faster_than_the_receiver_drains(make_hub, pacing):
    """An empty mailbox takes a 3 MB mail (floor), but its receiver drains 500 kB/s with a 4 s
    limit: paced, the hub reads the data at about that rate (after a 1 s burst); unpaced at once."""
    hub = make_hub(
        sites=ALPHA_BETA,
        MAILHUB_THROTTLE_FLOOR_BYTES="10M",
        MAILHUB_THROTTLE_PACING=str(pacing).lower(),
        MAILHUB_QUOTAS_MAX_DRAIN_TIME="4",
        MAILHUB_QUOTAS_DOWNLINK="500000",
    )
    hub.start()
    started = time.monotonic()
    assert submit(hub, "beta@hub.test", body(3_000_000))[0] == 250
    elapsed = time.monotonic() - started
    paced = float(re.findall(r"paced_s=([\d.]+)", hub.log_text())[-1])
    if pacing:
        assert elapsed >= 3.0 and paced >= 3.0, (elapsed, paced)  # (3 MB - 1 MB burst) / 500 kB/s
    else:
        assert paced == 0.0


@pytest.mark.parametrize("value", ["abc", "-5", "nan", "unlimited"])
def test_site_set_rejects_bad_values(hub, value):
    result = hub.cli("site", "set", "beta", "--max-drain-time", value, check=False)
    assert result.returncode == 1 and "--max-drain-time: expected" in result.stderr
    assert "Traceback" not in result.stderr
