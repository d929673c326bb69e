# mailhub-loadtest: pure parts in memory (profiles, arrivals, pacing, SMTP/POP3 client parsing,
# PGP/MIME round trip), then the smoke profile end to end against a spawned hub, and a run that
# must fail because a mail is deleted on the server behind the tool's back.
import json
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO
from loadtest import arrivals, pgpmime, pop3_protocol as pp, smtp_protocol as sp
from loadtest.pacing import Pacer
from loadtest.profile import PROFILE_DIR, ProfileError, load_profile, parse_profile
from loadtest.results import percentile

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

MINIMAL = """
name = "t"
[[sites]]
name = "a"
[[sites]]
name = "b"
[[studies]]
modality = "CT"
"""


def loadtest(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "loadtest.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


# ---- pure parts -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["smoke", "pilot", "westgerman", "mismatch"])
def test_shipped_profiles_load(name):
    profile = load_profile(name)
    assert profile.senders and profile.receivers
    assert (PROFILE_DIR / f"{name}.toml").exists()


def test_profile_site_counts():
    assert len(load_profile("smoke").sites) == 3
    assert len(load_profile("pilot").sites) == 35
    assert len(load_profile("westgerman").sites) == 650
    mismatch = load_profile("mismatch")
    assert len(mismatch.senders) == 1 and len(mismatch.receivers) == 1


@pytest.mark.parametrize("bad, where", [
    (MINIMAL + "colour = 1\n", "unknown key"),
    (MINIMAL.replace('name = "b"', 'name = "b"\nprotocol = "smoke-signals"'), "protocol"),
    (MINIMAL + 'images = [5, 2]\n', "images"),
    (MINIMAL.replace('name = "b"', 'name = "a"'), "duplicate"),
    (MINIMAL + "[arrival]\nrate_per_s = \"fast\"\n", "rate_per_s"),
])
def test_profile_errors_name_the_key(bad, where):
    with pytest.raises(ProfileError, match=where):
        parse_profile(bad)


def test_imap_idle_is_accepted_in_the_schema():
    profile = parse_profile(MINIMAL.replace('name = "b"', 'name = "b"\nprotocol = "imap-idle"'))
    assert profile.site("b").protocol == "imap-idle"


def test_arrivals_are_deterministic_and_never_self_addressed():
    profile = load_profile("pilot")
    first, second = arrivals.plan(profile), arrivals.plan(profile)
    assert first == second and first
    assert all(s.sender != s.receiver for s in first)
    assert all(0 <= a.at_s <= b.at_s for a, b in zip(first, first[1:]))
    burst = profile.bursts[0]
    assert sum(burst.at_s <= s.at_s < burst.at_s + burst.within_s for s in first) >= burst.studies


def test_pacer_books_the_line():
    pacer = Pacer(1000, burst_bytes=0)          # 1000 bytes/s
    assert pacer.reserve(500, now=10.0) == pytest.approx(0.5)
    assert pacer.reserve(500, now=10.0) == pytest.approx(1.0)   # queued behind the first
    assert pacer.reserve(100, now=20.0) == pytest.approx(0.1)   # idle line: no debt carried
    assert Pacer(0).reserve(10**9, now=0) == 0


def test_smtp_reply_parser_and_capabilities():
    parser = sp.ReplyParser()
    assert parser.feed(b"250-hub.test\r\n250-PIPELINING\r\n250-SIZE 100") == []
    (ehlo,) = parser.feed(b"\r\n250 CHUNKING\r\n")
    assert sp.capabilities(ehlo) == {"PIPELINING": "", "SIZE": "100", "CHUNKING": ""}
    (r1, r2) = parser.feed(b"451 4.3.0 try later\r\n550 5.1.1 no\r\n")
    assert (r1.kind, r2.kind) == ("transient", "permanent")
    with pytest.raises(sp.SmtpReplyError):
        parser.feed(b"hello\r\n")


def test_dot_stuffing_and_backoff():
    assert sp.dot_stuff(b".a\r\nb\r\n.\r\n") == b"..a\r\nb\r\n..\r\n.\r\n"
    assert sp.dot_stuff(b"x") == b"x\r\n.\r\n"
    assert [sp.backoff_delay(n, 1, 5) for n in (2, 3, 4, 5)] == [1, 2, 4, 5]


def test_pop3_multiline_across_every_split():
    body = b"a\r\n..b\r\n.c\r\n"
    wire = b"a\r\n...b\r\n..c\r\n.\r\nEXTRA"
    for cut in range(len(wire)):
        m = pp.MultiLine()
        unread = b""
        for piece in (wire[:cut], wire[cut:]):
            if m.done:
                unread += piece
            else:
                m.feed(piece)
        assert m.done and m.take() == body and m.extra + unread == b"EXTRA"
    assert pp.parse_listing(b"1 abc\r\n2 def\r\n") == [(1, "abc"), (2, "def")]
    with pytest.raises(pp.Pop3Error):
        pp.status(b"-ERR [AUTH] no\r\n")


def test_percentile_nearest_rank():
    values = list(range(1, 101))
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 99)) == (50, 95, 99)
    assert percentile([], 50) is None


def test_pgp_mime_round_trip_and_tamper_detection():
    import hashlib
    key = pgpmime.new_site_key("b", "b@hub.test")
    files = [("IM1.dcm", b"DICM" * 1000), ("IM2.dcm", b"\x00\x01" * 3000)]
    raw = pgpmime.pgp_mime_mail(sender="a@hub.test", recipient="b@hub.test", public_key=key.pubkey,
                                files=files, set_id="1.2.3", set_part=1, set_total=1,
                                message_id="m@a.hub.test", subject="CT")
    head = raw.split(b"\r\n\r\n")[0]
    for header in (b"X-TELEMEDICINE-SETID: 1.2.3", b"X-TELEMEDICINE-SETPART: 1", b"X-TELEMEDICINE-SETTOTAL: 1",
                   b"Disposition-Notification-To: <a@hub.test>", b'protocol="application/pgp-encrypted"'):
        assert header in head
    expected = [hashlib.sha256(d).hexdigest() for _, d in files]
    # a server adding a trace header changes nothing that is checked
    assert pgpmime.dicom_digests(key, b"Received: by hub\r\n" + raw) == expected
    other = pgpmime.new_site_key("c", "c@hub.test")
    with pytest.raises(Exception):
        pgpmime.dicom_digests(other, raw)


# ---- end to end --------------------------------------------------------------------------------

def test_smoke_profile_against_a_spawned_hub(tmp_path):
    out = tmp_path / "smoke.json"
    started = time.monotonic()
    result = loadtest("run", "smoke", "--spawn-local", "--generate", "--corpus", tmp_path / "corpus",
                      "--out", out, "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    assert time.monotonic() - started < 60
    data = json.loads(out.read_text())
    counts = data["counts"]
    assert data["passed"] and counts["planned"] == counts["accepted"] == counts["received"] > 0
    assert counts["deep_checked"] == counts["planned"]
    assert counts["lost"] == counts["duplicated"] == counts["corrupted"] == 0
    assert data["latency_s"]["p50"] is not None and data["latencies_s"]
    html = out.with_suffix(".html").read_text()
    assert html.count("data:image/png;base64,") == 4
    compared = loadtest("compare", out, out)
    assert compared.returncode == 0 and "latency p95" in compared.stdout


def test_a_mail_deleted_on_the_server_fails_the_run(make_hub, tmp_path):
    # The receivers poll first after 3 s; the first mailbox entry is deleted as soon as it appears.
    profile = tmp_path / "late-poll.toml"
    text = (PROFILE_DIR / "smoke.toml").read_text()
    profile.write_text(text.replace("poll_interval_s = 0.5", "poll_interval_s = 0.5\nfirst_poll_s = 3.0"))
    corpus = tmp_path / "corpus"
    assert loadtest("generate", profile, "--corpus", corpus).returncode == 0
    manifest = json.loads((corpus / "manifest.json").read_text())
    hub = make_hub()
    for name, site in manifest["sites"].items():
        hub.add_site(name, site["address"], password=site["password"])
    hub.start()
    deleted = []

    def delete_first():
        deadline = time.monotonic() + 20
        while not deleted and time.monotonic() < deadline:
            conn = hub.db()
            try:
                row = conn.execute("SELECT uid, queue_id FROM mailbox ORDER BY uid LIMIT 1").fetchone()
                if row:
                    conn.execute("DELETE FROM mailbox WHERE uid = ?", (row[0],))
                    conn.commit()
                    deleted.append(row[1])
            finally:
                conn.close()
            time.sleep(0.01)

    thief = threading.Thread(target=delete_first)
    thief.start()
    out = tmp_path / "lost.json"
    result = loadtest("run", profile, "--smtp", f"127.0.0.1:{hub.ports['smtp']}",
                      "--pop3", f"127.0.0.1:{hub.ports['pop3']}", "--corpus", corpus, "--out", out,
                      "--drain-timeout", "4", "--no-progress")
    thief.join()
    assert deleted, "no mailbox entry appeared"
    assert result.returncode == 1, result.stdout + result.stderr
    data = json.loads(out.read_text())
    assert not data["passed"]
    assert data["counts"]["lost"] == 1
    assert data["counts"]["received"] == data["counts"]["planned"] - 1
    assert "LOST" in result.stderr and "FAILED" in result.stdout


def test_imap_response_parser_handles_literals_in_any_split():
    from loadtest import imap_protocol as ip
    wire = (b"* 1 FETCH (UID 7 BODY[] {11}\r\nhello\r\nworl)\r\n"
            b"L3 OK done\r\n* SEARCH 4 2 9\r\n* 3 EXISTS\r\n")
    for cut in range(len(wire)):
        parser = ip.ResponseParser()
        responses = parser.feed(wire[:cut]) + parser.feed(wire[cut:])
        assert [r.text for r in responses] == ["* 1 FETCH (UID 7 BODY[] {11})", "L3 OK done",
                                               "* SEARCH 4 2 9", "* 3 EXISTS"]
        assert ip.fetched_body(responses) == b"hello\r\nworl"
        assert ip.search_uids(responses) == [2, 4, 9] and ip.is_exists(responses[3])
    with pytest.raises(ip.ImapError):
        ip.check_tagged(ip.Response("L4 NO [AUTHENTICATIONFAILED] no", []))


def test_imap_idle_profile_is_reported_unsupported_by_the_hub(tmp_path):
    profile = tmp_path / "imap.toml"
    profile.write_text((PROFILE_DIR / "smoke.toml").read_text().replace('protocol = "pop3"', 'protocol = "imap-idle"'))
    result = loadtest("run", profile, "--spawn-local", "--generate", "--corpus", tmp_path / "c",
                      "--out", tmp_path / "r.json", "--no-progress")
    assert result.returncode == 2
    assert "IMAP IDLE" in result.stderr and "not yet supported by the hub" in result.stderr


def _have_postfix_dovecot() -> bool:
    import os
    import shutil
    return (os.geteuid() == 0 and shutil.which("postfix") is not None and shutil.which("dovecot") is not None
            and os.path.exists("/usr/lib/dovecot/lmtp"))


@pytest.mark.slow
@pytest.mark.skipif(not _have_postfix_dovecot(), reason="needs root, postfix and dovecot-lmtpd")
def test_smoke_over_imap_idle_against_postfix_and_dovecot(tmp_path):
    from bench.thirdparty import dovecot_server, postfix_to_lmtp
    profile = tmp_path / "imap.toml"
    profile.write_text((PROFILE_DIR / "smoke.toml").read_text().replace('protocol = "pop3"', 'protocol = "imap-idle"'))
    corpus = tmp_path / "corpus"
    assert loadtest("generate", profile, "--corpus", corpus).returncode == 0
    manifest = json.loads((corpus / "manifest.json").read_text())
    users = {name: site["password"] for name, site in manifest["sites"].items()}
    with dovecot_server(tmp_path / "work", users, lmtp=True, auth_socket=True) as dovecot:
        with postfix_to_lmtp(tmp_path / "work", dovecot["lmtp"], ["hub.test"], sasl_path=dovecot["auth_socket"]) as smtp:
            result = loadtest("run", profile, "--smtp", f"127.0.0.1:{smtp}", "--imap", f"127.0.0.1:{dovecot['imap']}",
                              "--pop3", f"127.0.0.1:{dovecot['pop3']}", "--corpus", corpus,
                              "--out", tmp_path / "r.json", "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["passed"] and data["counts"]["received"] == data["counts"]["planned"]
