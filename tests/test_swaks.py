# Debian's swaks as a real SMTP client against the hub over loopback (issue 2): AUTH PLAIN and
# LOGIN, pipelining, attachments, every rejection with its exact reply, --quit-after/--drop-after.
# swaks 20201014.0 (Debian 12) has no BDAT/CHUNKING support, so BDAT is covered by the raw-socket
# tests in test_smtp_ingest.py and test_crash.py, not here.
import email
import email.policy
import hashlib
import os
import re
import shutil
import subprocess

import pytest

from conftest import ALPHA_BETA, PASSWORD, wait_for
from mailshapes import openpgp

# Every test that starts a hub runs on SQLite and again on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_engines

QUEUED_RE = re.compile(r"^<-  250 2\.0\.0 Ok: queued as (\S+)$", re.M)


@pytest.fixture(scope="session", autouse=True)
def swaks_installed():
    assert shutil.which("swaks"), (
        "swaks is missing: DEBIAN_FRONTEND=noninteractive apt-get install -y swaks"
        " (or sh bench/install-debian-packages.sh)"
    )


def swaks(
    hub,
    *args: str,
    auth: str | None = "PLAIN",
    user: str = "alpha",
    password: str = PASSWORD,
    sender: str = "alpha@hub.test",
    to: str = "beta@hub.test",
) -> tuple[int, str]:
    """Run swaks against the hub; return (exit status, transcript)."""
    cmd = [
        "swaks",
        "--server",
        "127.0.0.1",
        "--port",
        str(hub.smtp_port),
        "--ehlo",
        "gw.test",
        "--timeout",
        "20",
        "--from",
        sender,
        "--to",
        to,
    ]
    if auth:
        cmd += ["--auth", auth, "--auth-user", user, "--auth-password", password]
    result = subprocess.run(cmd + list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    return result.returncode, result.stdout


def queued(transcript: str) -> str:
    match = QUEUED_RE.search(transcript)
    assert match, transcript
    return match.group(1)


def blob_of(hub, qid: str) -> bytes:
    (size, sha) = hub.query("SELECT size, sha256 FROM messages WHERE queue_id = ?", qid)[0]
    data = hub.stored(qid)
    assert len(data) == size and hashlib.sha256(data).hexdigest() == sha
    return data


def nothing_stored(hub) -> None:
    wait_for(  # a dropped connection's spool file goes when the hub notices the drop
        lambda: list((hub.data_dir / "spool").iterdir()) == [],
        timeout=5,
        interval=0.05,
        message="the spool emptied",
    )
    assert hub.query("SELECT count(*) FROM messages") == [(0,)]
    assert hub.blob_files() == []


def test_auth_plain_delivery_stores_the_exact_data(hub, tmp_path):
    data = (
        b"From: alpha@hub.test\r\nTo: beta@hub.test\r\nSubject: swaks plain\r\n"
        b"Message-ID: <swaks-plain@gw.test>\r\nX-TELEMEDICINE-SETID: 1.2.840.5\r\n"
        b"X-TELEMEDICINE-SETPART: 2\r\nX-TELEMEDICINE-SETTOTAL: 9\r\n\r\n"
        b"first line\r\n.starts with a dot\r\n..two dots\r\n.\r\nlast line"
    )
    (tmp_path / "mail").write_bytes(data)
    code, out = swaks(hub, "--data", f"@{tmp_path / 'mail'}")
    assert code == 0, out
    assert re.search(r"^ -> AUTH PLAIN \S+$", out, re.M) and "<-  235 2.7.0 Authentication successful" in out
    assert re.search(r"^ -> \.\.starts with a dot$", out, re.M)  # swaks dot-stuffs on the wire
    qid = queued(out)
    blob = blob_of(hub, qid)
    assert blob.endswith(data + b"\r\n")  # swaks ends the last line; the hub unstuffs the dots
    received = blob[: len(blob) - len(data) - 2]
    assert received.startswith(b"Received: from gw.test ([127.0.0.1])\r\n") and b"\r\n\r\n" not in received
    assert f"with ESMTPA id {qid}".encode() in received
    assert hub.query("SELECT message_id, set_id, set_part, set_total, dot_lines, mail_from FROM messages") == [
        ("<swaks-plain@gw.test>", "1.2.840.5", 2, 9, 1, "alpha@hub.test")
    ]
    assert hub.query("SELECT s.name, b.rcpt FROM mailbox b JOIN sites s ON s.id = b.site_id") == [
        ("beta", "beta@hub.test")
    ]


def test_auth_login_delivery_of_the_default_swaks_mail(hub):
    code, out = swaks(hub, auth="LOGIN")
    assert code == 0, out
    assert re.search(r"^ -> AUTH LOGIN\n<-  334 \S+\n -> YWxwaGE=\n<-  334 \S+\n -> \S+\n<-  235 ", out, re.M)
    assert "<-  235 2.7.0 Authentication successful" in out
    blob = blob_of(hub, queued(out))
    message = email.message_from_bytes(blob, policy=email.policy.compat32)
    assert message["Subject"].startswith("test ")
    assert message.get_all("Received")[0].startswith("from gw.test ([127.0.0.1])")
    assert b"This is a test mailing" in blob
    (message_id,) = hub.query("SELECT message_id FROM messages")[0]
    assert message_id == message["Message-Id"].strip()


def test_pipelined_transaction_to_two_sites_is_stored_once(hub):
    code, out = swaks(hub, "--pipeline", to="beta@hub.test,alpha@hub.test")
    assert code == 0, out
    # all of MAIL, RCPT, RCPT, DATA went out before the first reply came back
    sent = out.index(" -> MAIL FROM:<alpha@hub.test>")
    first_reply = out.index("<-  250 2.1.0 Sender OK")
    assert sent < out.index(" -> RCPT TO:<alpha@hub.test>") < out.index(" -> DATA") < first_reply
    assert out.count("<-  250 2.1.5 Recipient OK") == 2
    qid = queued(out)
    assert len(hub.blob_files()) == 1
    assert hub.query("SELECT queue_id, refs FROM messages") == [(qid, 2)]
    assert sorted(hub.query("SELECT s.name FROM mailbox b JOIN sites s ON s.id = b.site_id")) == [("alpha",), ("beta",)]


def test_binary_attachment_survives(hub, tmp_path):
    payload = openpgp(size=300_000)  # an encrypted file (the policy refuses anything else in the clear)
    (tmp_path / "study.dcm.pgp").write_bytes(payload)
    code, out = swaks(
        hub,
        "--attach-type",
        "application/pgp-encrypted",
        "--attach",
        f"@{tmp_path / 'study.dcm.pgp'}",
        "--body",
        "one study",
        "--suppress-data",
    )
    assert code == 0, out
    message = email.message_from_bytes(blob_of(hub, queued(out)), policy=email.policy.default)
    parts = [p for p in message.walk() if p.get_filename() == "study.dcm.pgp"]
    assert len(parts) == 1
    assert parts[0].get_content_type() == "application/pgp-encrypted"
    assert parts[0].get_payload(decode=True) == payload


@pytest.mark.parametrize(
    "auth,sender,to,reply,status",
    [
        (None, "x@else.org", "y@else.org", "554 5.7.1 Relay access denied", 24),
        (None, "x@else.org", "beta@hub.test", "530 5.7.0 Authentication required", 24),
        ("PLAIN", "alpha@hub.test", "y@else.org", "550 5.1.2 No route to that domain", 24),
        ("PLAIN", "alpha@hub.test", "nobody@hub.test", "550 5.1.1 No such user here", 24),
        ("LOGIN", "beta@hub.test", "beta@hub.test", "553 5.7.1 Sender address not owned by the authenticated site", 23),
    ],
    ids=["relay", "unauthenticated", "authenticated-relay", "unknown-recipient", "foreign-sender"],
)
def test_rejections_with_exact_codes(hub, auth, sender, to, reply, status):
    code, out = swaks(hub, auth=auth, sender=sender, to=to)
    assert code == status, out
    assert f"<** {reply}\n" in out
    nothing_stored(hub)


def test_wrong_password(hub):
    code, out = swaks(hub, password="not-the-password")
    assert code == 28, out
    assert "<** 535 5.7.8 Authentication credentials invalid" in out
    nothing_stored(hub)


def test_message_over_the_size_limit_is_refused_after_the_data(make_hub, tmp_path):
    hub = make_hub(sites=ALPHA_BETA, MAILHUB_SMTP_MAX_MESSAGE_SIZE="20000")
    hub.start()
    (tmp_path / "big").write_bytes(os.urandom(60_000))
    code, out = swaks(hub, "--attach", f"@{tmp_path / 'big'}", "--suppress-data")
    assert code == 26, out
    assert "<** 552 5.3.4 Message size exceeds fixed maximum message size" in out
    nothing_stored(hub)


@pytest.mark.parametrize("stop", ["CONNECT", "EHLO", "AUTH", "MAIL", "RCPT"])
def test_quit_after(hub, stop):
    code, out = swaks(hub, "--quit-after", stop)
    assert code == 0, out
    assert re.search(r"^ -> QUIT\n<-  221 ", out, re.M), out
    last_command = {
        "CONNECT": None,
        "EHLO": " -> EHLO gw.test",
        "AUTH": " -> AUTH PLAIN",
        "MAIL": " -> MAIL FROM:<alpha@hub.test>",
        "RCPT": " -> RCPT TO:<beta@hub.test>",
    }[stop]
    commands = [line for line in out.splitlines() if line.startswith(" -> ") and line != " -> QUIT"]
    if last_command is None:
        assert commands == []
    else:
        assert commands[-1].startswith(last_command)
    nothing_stored(hub)
    assert swaks(hub)[0] == 0  # the hub still serves


def test_quit_reply_carries_an_enhanced_status_code(hub):
    # RFC 2034: with ENHANCEDSTATUSCODES advertised, every reply but the greeting and the EHLO reply
    # carries an enhanced status code.
    code, out = swaks(hub, "--quit-after", "EHLO")
    assert code == 0 and "<-  250-ENHANCEDSTATUSCODES" in out
    assert re.search(r"^<-  221 2\.0\.0 ", out, re.M), out.splitlines()[-3:]


@pytest.mark.parametrize(
    "option,stop", [("--drop-after", "RCPT"), ("--drop-after", "DATA"), ("--drop-after-send", "DATA")]
)
def test_dropped_connections_store_nothing(hub, option, stop):
    code, out = swaks(hub, option, stop)
    assert code == 0, out
    assert "=== Dropping connection" in out and " -> QUIT" not in out
    nothing_stored(hub)
    code, out = swaks(hub)
    assert code == 0, out
    assert hub.query("SELECT queue_id FROM messages") == [(queued(out),)]
