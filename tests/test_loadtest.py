# mailhub-loadtest: pure parts in memory (profiles, arrivals, pacing, SMTP/POP3 client parsing,
# PGP/MIME round trip), then the smoke profile end to end against a spawned hub, and a run that
# must fail because a mail is deleted on the server behind the tool's back.
import json
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import tomllib

import pytest
from pgpy.errors import PGPError

from loadtest import arrivals, pgpmime
from loadtest import pop3_protocol as pp
from loadtest import smtp_protocol as sp
from loadtest.cli import EXTRAS
from loadtest.pacing import Pacer
from loadtest.profile import PROFILE_DIR, ProfileError, load_profile, parse_profile
from loadtest.results import percentile

from conftest import REPO, wait_for

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
    return subprocess.run(
        [sys.executable, "-m", "loadtest.cli", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


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


@pytest.mark.parametrize(
    "bad, where",
    [
        (MINIMAL + "colour = 1\n", "unknown key"),
        (MINIMAL.replace('name = "b"', 'name = "b"\nprotocol = "smoke-signals"'), "protocol"),
        (MINIMAL + "images = [5, 2]\n", "images"),
        (MINIMAL.replace('name = "b"', 'name = "a"'), "duplicate"),
        (MINIMAL + '[arrival]\nrate_per_s = "fast"\n', "rate_per_s"),
    ],
)
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
    pacer = Pacer(1000, burst_bytes=0)  # 1000 bytes/s
    assert pacer.reserve(500, now=10.0) == pytest.approx(0.5)
    assert pacer.reserve(500, now=10.0) == pytest.approx(1.0)  # queued behind the first
    assert pacer.reserve(100, now=20.0) == pytest.approx(0.1)  # idle line: no debt carried
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
    raw = pgpmime.pgp_mime_mail(
        sender="a@hub.test",
        recipient="b@hub.test",
        public_key=key.pubkey,
        files=files,
        set_id="1.2.3",
        set_part=1,
        set_total=1,
        message_id="m@a.hub.test",
        subject="CT",
    )
    head = raw.split(b"\r\n\r\n")[0]
    for header in (
        b"X-TELEMEDICINE-SETID: 1.2.3",
        b"X-TELEMEDICINE-SETPART: 1",
        b"X-TELEMEDICINE-SETTOTAL: 1",
        b"Disposition-Notification-To: <a@hub.test>",
        b'protocol="application/pgp-encrypted"',
    ):
        assert header in head
    expected = [hashlib.sha256(d).hexdigest() for _, d in files]
    # a server adding a trace header changes nothing that is checked
    assert pgpmime.dicom_digests(key, b"Received: by hub\r\n" + raw) == expected
    other = pgpmime.new_site_key("c", "c@hub.test")
    with pytest.raises(PGPError):  # not decryptable with another site's key
        pgpmime.dicom_digests(other, raw)


# ---- end to end --------------------------------------------------------------------------------


def test_smoke_profile_against_a_spawned_hub(tmp_path):
    out = tmp_path / "smoke.json"
    started = time.monotonic()
    result = loadtest(
        "run", "smoke", "--spawn-local", "--generate", "--corpus", tmp_path / "corpus", "--out", out, "--no-progress"
    )
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

    def delete_one() -> bool:
        conn = hub.db()
        try:
            row = conn.execute("SELECT uid, queue_id FROM mailbox ORDER BY uid LIMIT 1").fetchone()
            if row:
                conn.execute("DELETE FROM mailbox WHERE uid = ?", (row[0],))
                conn.commit()
                deleted.append(row[1])
        finally:
            conn.close()
        return bool(deleted)

    def delete_first():  # on a thread of its own: not raising, `assert deleted` below tells
        wait_for(delete_one, timeout=20, interval=0.01, raise_on_timeout=False)

    thief = threading.Thread(target=delete_first)
    thief.start()
    out = tmp_path / "lost.json"
    result = loadtest(
        "run",
        profile,
        "--smtp",
        f"127.0.0.1:{hub.ports['smtp']}",
        "--pop3",
        f"127.0.0.1:{hub.ports['pop3']}",
        "--corpus",
        corpus,
        "--out",
        out,
        "--drain-timeout",
        "4",
        "--no-progress",
    )
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

    wire = b"* 1 FETCH (UID 7 BODY[] {11}\r\nhello\r\nworl)\r\nL3 OK done\r\n* SEARCH 4 2 9\r\n* 3 EXISTS\r\n"
    for cut in range(len(wire)):
        parser = ip.ResponseParser()
        responses = parser.feed(wire[:cut]) + parser.feed(wire[cut:])
        assert [r.text for r in responses] == [
            "* 1 FETCH (UID 7 BODY[] {11})",
            "L3 OK done",
            "* SEARCH 4 2 9",
            "* 3 EXISTS",
        ]
        assert ip.fetched_body(responses) == b"hello\r\nworl"
        assert ip.search_uids(responses) == [2, 4, 9] and ip.is_exists(responses[3])
    with pytest.raises(ip.ImapError):
        ip.check_tagged(ip.Response("L4 NO [AUTHENTICATIONFAILED] no", []))


def test_smoke_over_imap_idle_against_the_hub(tmp_path):
    profile = tmp_path / "imap.toml"
    profile.write_text((PROFILE_DIR / "smoke.toml").read_text().replace('protocol = "pop3"', 'protocol = "imap-idle"'))
    result = loadtest(
        "run",
        profile,
        "--spawn-local",
        "--generate",
        "--corpus",
        tmp_path / "c",
        "--out",
        tmp_path / "r.json",
        "--no-progress",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["passed"] and data["counts"]["received"] == data["counts"]["planned"]


def _have_postfix_dovecot() -> bool:
    import os
    import shutil

    return (
        os.geteuid() == 0
        and shutil.which("postfix") is not None
        and shutil.which("dovecot") is not None
        and os.path.exists("/usr/lib/dovecot/lmtp")
    )


@pytest.mark.slow
@pytest.mark.skipif(not _have_postfix_dovecot(), reason="needs root, postfix and dovecot-lmtpd")
def test_smoke_over_imap_idle_against_postfix_and_dovecot(tmp_path):
    from loadtest.thirdparty import dovecot_server, postfix_to_lmtp

    profile = tmp_path / "imap.toml"
    profile.write_text((PROFILE_DIR / "smoke.toml").read_text().replace('protocol = "pop3"', 'protocol = "imap-idle"'))
    corpus = tmp_path / "corpus"
    assert loadtest("generate", profile, "--corpus", corpus).returncode == 0
    manifest = json.loads((corpus / "manifest.json").read_text())
    users = {name: site["password"] for name, site in manifest["sites"].items()}
    # Dovecot's sockets go under its work folder, and a socket path must stay under 108 bytes:
    # a short folder under /tmp rather than pytest's (longer still under pytest-xdist).
    with (
        tempfile.TemporaryDirectory(prefix="mh-dovecot-") as work,
        dovecot_server(work, users, lmtp=True, auth_socket=True) as dovecot,
    ):
        with postfix_to_lmtp(work, dovecot["lmtp"], ["hub.test"], sasl_path=dovecot["auth_socket"]) as smtp:
            result = loadtest(
                "run",
                profile,
                "--smtp",
                f"127.0.0.1:{smtp}",
                "--imap",
                f"127.0.0.1:{dovecot['imap']}",
                "--pop3",
                f"127.0.0.1:{dovecot['pop3']}",
                "--corpus",
                corpus,
                "--out",
                tmp_path / "r.json",
                "--no-progress",
            )
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["passed"] and data["counts"]["received"] == data["counts"]["planned"]


class _FlakySmtp:
    """A scripted ESMTP server on loopback: PIPELINING, CHUNKING, AUTH; the first end of data of
    each mail gets `451 4.3.0`, the second 250; connections are counted."""

    def __init__(self):
        self.connections = 0
        self.mails = []
        self.seen = set()

    async def handle(self, reader, writer):
        self.connections += 1
        writer.write(b"220 flaky ESMTP\r\n")
        while line := await reader.readline():
            verb = line.split(b" ", 1)[0].upper().strip()
            if verb == b"EHLO":
                writer.write(b"250-flaky\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-SIZE 1000000\r\n250 AUTH PLAIN\r\n")
            elif verb == b"AUTH":
                writer.write(b"235 2.7.0 ok\r\n")
            elif verb in (b"MAIL", b"RCPT", b"RSET"):
                writer.write(b"250 2.0.0 ok\r\n")
            elif verb == b"BDAT":
                data = await reader.readexactly(int(line.split()[1]))
                if data in self.seen:
                    self.mails.append(data)
                    writer.write(b"250 2.0.0 Ok: queued as X\r\n")
                else:
                    self.seen.add(data)
                    writer.write(b"451 4.3.0 try again later\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                break
            else:
                writer.write(b"500 5.5.1 what\r\n")
            await writer.drain()
        writer.close()


def test_sender_retries_a_4xx_with_backoff_and_reconnects(tmp_path):
    import asyncio
    import random

    from loadtest.profile import Smtp
    from loadtest.recorder import Recorder
    from loadtest.smtp_driver import send_study

    (tmp_path / "m1.eml").write_bytes(b"Message-ID: <m1@x>\r\n\r\nbody one\r\n")
    (tmp_path / "m2.eml").write_bytes(b"Message-ID: <m2@x>\r\n\r\nbody two\r\n")
    study = {
        "sender": "a",
        "receiver": "b",
        "mails": [{"file": "m1.eml", "message_id": "m1@x"}, {"file": "m2.eml", "message_id": "m2@x"}],
    }
    flaky = _FlakySmtp()

    async def scenario():
        server = await asyncio.start_server(flaky.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        rec = Recorder()
        started = asyncio.get_running_loop().time()
        await send_study(
            study=study,
            corpus=tmp_path,
            host="127.0.0.1",
            port=port,
            login="a",
            password="p",
            sender_address="a@hub.test",
            receiver_address="b@hub.test",
            smtp_cfg=Smtp(retry_base_s=0.2, retry_max_s=1.0),
            uplink=None,
            downlink=None,
            recorder=rec,
            rng=random.Random(1),
            stop=asyncio.Event(),
        )
        server.close()
        return rec, asyncio.get_running_loop().time() - started

    rec, seconds = asyncio.run(scenario())
    assert [s.outcome for s in rec.sent.values()] == ["accepted", "accepted"]
    assert [s.attempts for s in rec.sent.values()] == [2, 2]
    assert len(rec.deferrals) == 2 and "451" in rec.deferrals[0][2]
    assert flaky.connections == 3  # a gateway reconnects after a deferral
    assert len(flaky.mails) == 2 and seconds >= 2 * 0.2 * 0.8


def test_uplink_pacing_limits_the_socket(tmp_path):
    import asyncio

    from loadtest.net import Stream
    from loadtest.pacing import Pacer

    async def scenario():
        got = bytearray()

        async def sink(reader, writer):
            while data := await reader.read(65536):
                got.extend(data)
            writer.close()

        server = await asyncio.start_server(sink, "127.0.0.1", 0)
        stream = await Stream.connect("127.0.0.1", server.sockets[0].getsockname()[1], up=Pacer.mbit(1.0))
        loop = asyncio.get_running_loop()
        started = loop.time()
        await stream.write(b"x" * 250_000)  # 2 Mbit at 1 Mbit/s
        elapsed = loop.time() - started
        await stream.close()
        server.close()
        return elapsed

    elapsed = asyncio.run(scenario())
    assert 1.7 < elapsed < 4.0


def test_smoke_with_starttls_against_a_tls_hub(make_hub, tmp_path, self_signed_certificate):
    cert, key = self_signed_certificate
    profile = tmp_path / "tls.toml"
    profile.write_text((PROFILE_DIR / "smoke.toml").read_text().replace("[smtp]\n", "[smtp]\nstarttls = true\n"))
    corpus = tmp_path / "corpus"
    assert loadtest("generate", profile, "--corpus", corpus).returncode == 0
    manifest = json.loads((corpus / "manifest.json").read_text())
    hub = make_hub(MAILHUB_TLS_CERT_FILE=str(cert), MAILHUB_TLS_KEY_FILE=str(key))
    for name, site in manifest["sites"].items():
        hub.add_site(name, site["address"], password=site["password"])
    hub.start()
    out = tmp_path / "tls.json"
    result = loadtest(
        "run",
        profile,
        "--smtp",
        f"127.0.0.1:{hub.ports['smtp']}",
        "--pop3",
        f"127.0.0.1:{hub.ports['pop3']}",
        "--corpus",
        corpus,
        "--out",
        out,
        "--no-progress",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    counts = json.loads(out.read_text())["counts"]
    assert counts["smtp_sessions"] > 0 and counts["smtp_tls_sessions"] == counts["smtp_sessions"]


def test_checks_count_duplicates_corruption_and_unexpected_mail(tmp_path):
    import hashlib

    from loadtest.checks import check
    from loadtest.recorder import Received, Recorder

    key = pgpmime.new_site_key("b", "b@hub.test")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "b.asc").write_text(str(key))
    mails, raws = [], {}
    for n in range(4):
        dicom = f"DICM image {n}".encode() * 50
        mid = f"m{n}@a.hub.test"
        raw = pgpmime.pgp_mime_mail(
            sender="a@hub.test",
            recipient="b@hub.test",
            public_key=key.pubkey,
            files=[("IM.dcm", dicom)],
            set_id="s",
            set_part=n + 1,
            set_total=4,
            message_id=mid,
            subject="CT",
        )
        raws[mid] = raw
        mails.append(
            {
                "message_id": mid,
                "body_sha256": pgpmime.body_digest(raw),
                "dicom_sha256": [hashlib.sha256(dicom).hexdigest()],
            }
        )
    manifest = {"sites": {"b": {"key": "keys/b.asc"}}, "studies": [{"sender": "a", "receiver": "b", "mails": mails}]}
    rec = Recorder()
    for mid, raw in raws.items():
        rec.accepted(rec.submit(mid, "a", "b", len(raw)), "250")

    def got(mid, raw, name):
        path = tmp_path / name
        path.write_bytes(raw)
        rec.download(Received(mid, "b", 1.0, len(raw), pgpmime.body_digest(raw), str(path)))

    got("m0@a.hub.test", raws["m0@a.hub.test"], "0")
    got("m0@a.hub.test", raws["m0@a.hub.test"], "0b")  # twice
    body = raws["m1@a.hub.test"]
    middle = len(body) - 300  # inside the armored data
    flipped = b"B" if body[middle : middle + 1] != b"B" else b"C"
    got("m1@a.hub.test", body[:middle] + flipped + body[middle + 1 :], "1")  # one byte changed
    got("m2@a.hub.test", raws["m2@a.hub.test"], "2")
    got("stray@elsewhere", raws["m2@a.hub.test"], "x")  # not from this run
    verdict = check(manifest, tmp_path, rec, workers=1)
    counts = verdict["counts"]
    assert (counts["lost"], counts["duplicated"], counts["corrupted"], counts["unexpected"]) == (1, 1, 1, 1)
    assert counts["deep_checked"] == 3 and not verdict["passed"]
    assert any("m3@a.hub.test: LOST" in p for p in verdict["problems"])


def test_run_without_a_corpus_names_the_command_that_makes_it(tmp_path):
    corpus = tmp_path / "my corpus"
    result = loadtest("run", "smoke", "--corpus", corpus, "--out", tmp_path / "r.json", "--spawn-local")
    command = f"mailhub-loadtest generate smoke --corpus '{corpus}'"
    assert (result.returncode, result.stdout, result.stderr) == (
        2,
        "",
        f"mailhub-loadtest: no corpus in {corpus}: run `{command}` first, or add --generate to this command\n",
    )
    assert loadtest(*shlex.split(command)[1:]).returncode == 0  # the command it names makes the corpus
    stale = loadtest("run", "pilot", "--corpus", corpus, "--out", tmp_path / "r.json", "--spawn-local")
    assert (stale.returncode, stale.stderr) == (
        2,
        f"mailhub-loadtest: the corpus in {corpus} was built from another profile (or version): run"
        f" `mailhub-loadtest generate pilot --corpus '{corpus}'` first, or add --generate to this command\n",
    )


def test_the_extras_list_is_the_loadtest_extra():
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["loadtest"]
    assert set(EXTRAS) == {re.match(r"[A-Za-z0-9_.-]+", requirement).group() for requirement in extra}


@pytest.mark.parametrize(
    "module, args",
    [
        ("pydicom", ["generate", "smoke", "--corpus", "{tmp}/corpus"]),
        ("matplotlib", ["report", "{tmp}/r.json", "--html", "{tmp}/r.html"]),
    ],
)
def test_missing_extras_name_the_pip_install(tmp_path, module, args):
    argv = [arg.format(tmp=tmp_path) for arg in args]
    code = f"import sys; sys.modules[{module!r}] = None; from loadtest.cli import main; sys.exit(main({argv!r}))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (
        2,
        "",
        f"mailhub-loadtest: {module} is missing: install the tool's extras with pip install '.[loadtest]' in the"
        " hub's source folder (or pip install 'dicom-mail-hub[loadtest]')\n",
    )


def test_accounts_file_and_loopback_only(tmp_path):
    from loadtest.cli import _accounts
    from loadtest.net import check_loopback, parse_hostport

    accounts = tmp_path / "logins.toml"
    accounts.write_text('[accounts.clinic-a]\nlogin = "gw-a"\npassword = "pw"\n')
    profile = parse_profile(MINIMAL + '[accounts.b]\nlogin = "bee"\npassword = "x"\n')
    assert _accounts(accounts, profile) == {
        "b": {"login": "bee", "password": "x"},
        "clinic-a": {"login": "gw-a", "password": "pw"},
    }
    assert parse_hostport("127.0.0.1:2525") == ("127.0.0.1", 2525)
    assert parse_hostport("[::1]:110") == ("::1", 110)
    check_loopback("127.0.0.1")
    check_loopback("localhost")
    with pytest.raises(ValueError, match="not a loopback"):
        check_loopback("192.0.2.10")


def test_gateways_ride_out_421_connection_limits_of_the_hub(make_hub, tmp_path):
    # One SMTP connection per client address: concurrent studies get 421 4.7.0, retry, all arrive.
    profile = tmp_path / "crowded.toml"
    profile.write_text(
        (PROFILE_DIR / "smoke.toml")
        .read_text()
        .replace("max_attempts = 6", "max_attempts = 30")
        .replace("rate_per_s = 1.5", "rate_per_s = 4.0")
    )
    corpus = tmp_path / "corpus"
    assert loadtest("generate", profile, "--corpus", corpus).returncode == 0
    manifest = json.loads((corpus / "manifest.json").read_text())
    hub = make_hub(MAILHUB_SMTP_MAX_CONNECTIONS_PER_IP="1")
    for name, site in manifest["sites"].items():
        hub.add_site(name, site["address"], password=site["password"])
    hub.start()
    out = tmp_path / "crowded.json"
    result = loadtest(
        "run",
        profile,
        "--smtp",
        f"127.0.0.1:{hub.ports['smtp']}",
        "--pop3",
        f"127.0.0.1:{hub.ports['pop3']}",
        "--corpus",
        corpus,
        "--out",
        out,
        "--no-progress",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(out.read_text())
    assert data["counts"]["deferrals"] > 0
    assert any(d["reply"].startswith("421") or "421" in d["reply"] for d in data["deferrals"])
    assert data["counts"]["received"] == data["counts"]["planned"]
