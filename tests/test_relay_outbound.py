# Outbound relay (issue 8) end to end: a real hub forwarding to a real Postfix (maildir delivery)
# and to Postfix's smtp-sink answering 4xx or 5xx; retries, expiry, delay warnings and bounces read
# back over POP3; `mailhub queue`; a kill -9 during a delivery loses nothing.
import base64
import contextlib
import email
import email.policy
import hashlib
import json
import os
import poplib
import re
import smtplib
import socket
import socketserver
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from loadtest.ports import free_port
from loadtest.thirdparty import make_traversable, postfix_to_maildir, wait_banner

from conftest import ALPHA_BETA, PASSWORD, RawSMTP, make_message, queue_id_from, wait_for
from pop3util import make_cert

# Every test that starts a hub runs on SQLite and again on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_engines

MB = 1024 * 1024
REMOTE = "remote.test"


def log_tail(hub) -> str:
    """The end of the hub's log without the lines of /metrics scrapes."""
    return "\n".join(line for line in hub.log_text().splitlines() if "/metrics" not in line)[-4000:]


@contextlib.contextmanager
def smtp_sink(folder: Path, port: int, *options: str):
    """Postfix's smtp-sink on 127.0.0.1:port, dumping each accepted mail into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o777)
    make_traversable(folder)  # the sink writes as nobody
    proc = subprocess.Popen(
        ["smtp-sink", "-u", "nobody", *options, "-d", f"{folder}/mail.", f"127.0.0.1:{port}", "50"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_banner(port, proc=proc)
        yield folder
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def closed_port():
    """A loopback port that refuses connections and that no other process can take meanwhile
    (bound, never listening)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def relay_hub(make_hub, routes: str, **overrides):
    hub = make_hub(
        sites=ALPHA_BETA,
        MAILHUB_RELAY_ROUTES=routes,
        MAILHUB_RELAY_CONNECT_TIMEOUT="5",
        MAILHUB_RELAY_COMMAND_TIMEOUT="120",
        **overrides,
    )
    return hub.start()


def submit(hub, rcpts: list[str], message: bytes, sender: str = "alpha@hub.test") -> str:
    with smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=60) as client:
        client.login("alpha", PASSWORD)
        client.mail(sender)
        for rcpt in rcpts:
            code, reply = client.rcpt(rcpt)
            assert code == 250, (rcpt, code, reply)
        code, reply = client.data(message)
        assert code == 250, reply
        return queue_id_from(reply)


def queue_rows(hub) -> list[tuple]:
    return hub.query("SELECT queue_id, rcpt, attempts, last_error, warned FROM outbound ORDER BY id")


def pop3_messages(hub, login: str = "alpha") -> list[email.message.EmailMessage]:
    client = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=30)
    try:
        client.user(login)
        client.pass_(PASSWORD)
        count = len(client.list()[1])
        return [
            email.message_from_bytes(b"\r\n".join(client.retr(i)[1]), policy=email.policy.default)
            for i in range(1, count + 1)
        ]
    finally:
        client.quit()


def delivery_reports(messages) -> list[tuple[str, list]]:
    """(Action, [recipient blocks]) of every DSN among the messages."""
    reports = []
    for message in messages:
        if message.get_content_type() != "multipart/report":
            continue
        assert message.get_param("report-type") == "delivery-status"
        assert message["From"].addresses[0].username == "MAILER-DAEMON"
        parts = list(message.iter_parts())
        assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
        blocks = parts[1].get_payload()  # per-message block, then one block per recipient
        reports.append((blocks[1]["Action"], blocks[1:]))
    return reports


def metrics_text(hub) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{hub.ports['metrics']}/metrics", timeout=10) as response:
        return response.read().decode()


# ---- acceptance at RCPT -----------------------------------------------------------------------


def test_rcpt_policy_and_one_blob_for_local_and_remote_recipients(make_hub, closed_port):
    # Deliveries fail (nothing listens) and are deferred for an hour.
    hub = relay_hub(
        make_hub,
        f"{REMOTE}=127.0.0.1:{closed_port}",
        MAILHUB_RELAY_MIN_BACKOFF="3600",
        MAILHUB_RELAY_MAX_BACKOFF="3600",
    )
    client = RawSMTP(hub.smtp_port)
    client.ehlo()
    assert client.command("MAIL FROM:<alpha@hub.test>").startswith(b"250")
    assert client.command(f"RCPT TO:<x@{REMOTE}>").startswith(b"554 5.7.1")  # not authenticated
    client.command("RSET")
    assert client.auth_plain("alpha").startswith(b"235")
    assert client.command("MAIL FROM:<alpha@hub.test>").startswith(b"250")
    assert client.command(f"RCPT TO:<x@{REMOTE}>").startswith(b"250")
    assert client.command(f"RCPT TO:<y@sub.{REMOTE}>").startswith(b"250")  # subdomains follow the route
    assert client.command("RCPT TO:<z@elsewhere.example>").startswith(b"550 5.1.2")
    assert client.command("RCPT TO:<beta@hub.test>").startswith(b"250")
    client.command("QUIT")
    client.close()

    qid = submit(hub, [f"x@{REMOTE}", f"y@sub.{REMOTE}", "beta@hub.test"], make_message(3000))
    assert hub.query("SELECT refs FROM messages WHERE queue_id = ?", qid) == [(3,)]
    assert len(hub.blob_files()) == 1
    assert hub.query("SELECT rcpt FROM mailbox WHERE queue_id = ?", qid) == [("beta@hub.test",)]
    wait_for(
        lambda: all(attempts == 1 for _, _, attempts, _, _ in queue_rows(hub)) and queue_rows(hub),
        message="a failed first attempt",
        timeout=30,
        interval=0.1,
    )
    rows = queue_rows(hub)
    assert sorted(r[1] for r in rows) == [f"x@{REMOTE}", f"y@sub.{REMOTE}"]
    assert all("cannot connect" in r[3] for r in rows), rows
    text = metrics_text(hub)
    assert "mailhub_outbound_queue_messages 1.0" in text
    age = float(re.search(r"^mailhub_outbound_queue_oldest_age_seconds (\S+)$", text, re.M).group(1))
    assert 0 < age < 60, age

    # The next hop is backed off as a whole: a new mail for it waits without a connection attempt.
    later = submit(hub, [f"z@{REMOTE}"], make_message(1000))
    wait_for(
        lambda: hub.query("SELECT last_error FROM outbound WHERE queue_id = ?", later) == [("destination backed off",)],
        message="the new mail to wait for the next hop",
        timeout=30,
        interval=0.1,
    )
    ((attempts, wait),) = hub.query(
        "SELECT attempts, next_attempt_at - queued_at FROM outbound WHERE queue_id = ?", later
    )
    assert attempts == 0 and 3000 < wait < 3700, (attempts, wait)
    hub.cli("queue", "delete", later)

    listing = hub.cli("queue", "list").stdout
    assert qid in listing and f"x@{REMOTE}" in listing and "cannot connect" in listing
    assert hub.cli("queue", "delete", qid, "--rcpt", f"x@{REMOTE}").stdout.startswith("1 ")
    assert hub.query("SELECT refs FROM messages WHERE queue_id = ?", qid) == [(2,)]
    assert hub.cli("queue", "delete", "NOSUCHID", check=False).returncode == 1
    hub.cli("queue", "delete", qid)
    assert queue_rows(hub) == []
    assert hub.query("SELECT queue_id, refs FROM messages") == [(qid, 1)]  # beta's mailbox still holds it
    assert 'mailhub_outbound_deliveries_total{outcome="deferred"} 2.0' in metrics_text(hub)


def test_relaying_disabled_refuses_remote_recipients(make_hub):
    hub = relay_hub(make_hub, f"{REMOTE}=127.0.0.1:25", MAILHUB_RELAY_ENABLED="false")
    client = RawSMTP(hub.smtp_port)
    client.ehlo()
    client.auth_plain("alpha")
    client.command("MAIL FROM:<alpha@hub.test>")
    assert client.command(f"RCPT TO:<x@{REMOTE}>").startswith(b"550 5.1.2")
    client.close()


# ---- a real Postfix as next hop ---------------------------------------------------------------


def _write_big_mail(path: Path, size: int) -> tuple[int, int, str]:
    """A CRLF mail of about `size` bytes from 1 MiB of base64 lines repeated; returns (size, size
    and SHA-256 of its LF form, as Postfix stores it)."""
    text = base64.b64encode(os.urandom(57 * 13000))
    block = b"".join(text[i : i + 76] + b"\r\n" for i in range(0, len(text), 76))
    header = (
        b"From: alpha@hub.test\r\nTo: big@remote.test\r\nSubject: 200 MB\r\n"
        b"Message-ID: <big@hub.test>\r\nDate: Sat, 28 Nov 2026 03:00:00 +0000\r\n\r\n"
    )
    lf_header, lf_block = header.replace(b"\r\n", b"\n"), block.replace(b"\r\n", b"\n")
    digest = hashlib.sha256(lf_header)
    blocks = size // len(block)
    with open(path, "wb") as f:
        f.write(header)
        for _ in range(blocks):
            f.write(block)
            digest.update(lf_block)
    return path.stat().st_size, len(lf_header) + blocks * len(lf_block), digest.hexdigest()


def _delivered(maildir: Path) -> list[Path]:
    new = maildir / "new"
    return sorted(new.iterdir()) if new.is_dir() else []


def _tail_sha256(path: Path, length: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(path.stat().st_size - length)
        while chunk := f.read(4 * MB):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.one_engine(
    "a serve process streaming 200 MB to Postfix (14 s); the queue on PostgreSQL is covered by the other relay tests"
)
def test_postfix_next_hop_receives_1kb_and_200mb_intact(make_hub, tmp_path):
    with postfix_to_maildir(tmp_path / "pf", [REMOTE]) as (port, maildir):
        maildir = Path(maildir)
        hub = relay_hub(
            make_hub,
            f"{REMOTE}=127.0.0.1:{port}",
            process=True,
            MAILHUB_RELAY_MIN_BACKOFF="5",
            MAILHUB_RELAY_MAX_BACKOFF="5",
        )  # a busy machine may time a delivery out: retry soon
        small = make_message(1024, subject="1 KB", extra_headers="Date: Sat, 28 Nov 2026 03:00:00 +0000\r\n")
        small = small.replace(b"To: beta@hub.test", b"To: small@remote.test")  # (Postfix adds a missing Date)
        small += b".a line starting with a dot\r\n"
        qid = submit(hub, [f"small@{REMOTE}", "beta@hub.test"], small)
        wait_for(
            lambda: _delivered(maildir), timeout=120, message="the 1 KB mail at Postfix", interval=0.1
        )  # (Postfix on a busy machine)
        wait_for(lambda: not queue_rows(hub), message="the queue row to go", timeout=30, interval=0.1)
        (delivered,) = _delivered(maildir)
        lf = small.replace(b"\r\n", b"\n")
        assert hashlib.sha256(delivered.read_bytes()[-len(lf) :]).hexdigest() == hashlib.sha256(lf).hexdigest()
        assert f"with ESMTPA id {qid}".encode() in delivered.read_bytes()  # the hub's trace header went along
        assert hub.query("SELECT refs FROM messages WHERE queue_id = ?", qid) == [(1,)]  # beta's copy left

        with smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=60) as client:  # a burst: one connection reused
            client.login("alpha", PASSWORD)
            for i in range(30):
                client.sendmail("alpha@hub.test", [f"burst{i}@{REMOTE}"], make_message(2000, subject=f"burst {i}"))
        wait_for(lambda: len(_delivered(maildir)) == 31, message="the burst at Postfix", timeout=30, interval=0.1)
        log = maildir.parent.parent / "postfix.log"
        sessions = wait_for(
            lambda: (
                (found := [int(m) for m in re.findall(r"disconnect from .* mail=(\d+)", log.read_text())])
                and sum(found) == 31
                and found
            ),
            message="the hub's connections to end",
            timeout=30,
            interval=0.1,
        )
        assert len(sessions) <= 15 and max(sessions) >= 5, sessions  # connections reused (at most 10 at once)

        big = tmp_path / "big.eml"
        size, lf_size, lf_sha = _write_big_mail(big, 200 * MB)
        client = RawSMTP(hub.smtp_port, timeout=120)
        client.ehlo()
        assert client.auth_plain("alpha").startswith(b"235")
        assert client.command("MAIL FROM:<alpha@hub.test>").startswith(b"250")
        assert client.command(f"RCPT TO:<big@{REMOTE}>").startswith(b"250")
        client.send(f"BDAT {size} LAST\r\n".encode())
        with open(big, "rb") as f:
            client.sock.sendfile(f)
        big_qid = queue_id_from(client.reply())
        client.command("QUIT")
        client.close()
        delivered = wait_for(
            lambda: [p for p in _delivered(maildir) if p.stat().st_size > 100 * MB],
            timeout=180,
            message=lambda: f"the 200 MB mail at Postfix\n{log_tail(hub)}\nPostfix:\n{log.read_text()[-3000:]}",
            interval=0.1,
        )[0]
        assert _tail_sha256(delivered, lf_size) == lf_sha
        wait_for(lambda: not queue_rows(hub), message="the queue row to go", timeout=30, interval=0.1)
        assert hub.query("SELECT count(*) FROM messages WHERE queue_id = ?", big_qid) == [(0,)]  # blob freed
        with open(f"/proc/{hub.proc.pid}/status") as f:
            peak_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        assert peak_kb < 150 * 1024, f"hub peak RSS {peak_kb} kB"
        assert 'mailhub_outbound_deliveries_total{outcome="delivered"} 32.0' in metrics_text(hub)
        hub.stop()


# ---- retries, expiry and bounces ----------------------------------------------------------------


def test_unreachable_then_4xx_then_2xx_with_queue_retry(make_hub):
    hop = CountingHop(mode="421")  # refuses connections: the next hop is backed off
    hub = relay_hub(
        make_hub, f"{REMOTE}=127.0.0.1:{hop.port}", MAILHUB_RELAY_MIN_BACKOFF="3600", MAILHUB_RELAY_MAX_BACKOFF="3600"
    )
    try:
        message = make_message(5000, subject="retried") + b".leading dot: sent with DATA, so dot-stuffed\r\n"
        qid = submit(hub, [f"later@{REMOTE}"], message)
        wait_for(
            lambda: [r[2] for r in queue_rows(hub)] == [1], message="a refused connection", timeout=30, interval=0.1
        )
        assert "refused greeting: 421 4.3.2" in queue_rows(hub)[0][3]
        hop.mode = "450"
        assert hub.cli("queue", "retry", qid).stdout.startswith("1 ")  # also ends the next hop's back-off
        wait_for(lambda: [r[2] for r in queue_rows(hub)] == [2], message="a deferral", timeout=30, interval=0.1)
        ((_, rcpt, attempts, error, _),) = queue_rows(hub)
        assert (rcpt, attempts) == (f"later@{REMOTE}", 2) and error.startswith("450 4.2.0"), error
        listed = json.loads(hub.cli("queue", "list", "--json").stdout)
        assert [(e["queue_id"], e["rcpt"], e["attempts"]) for e in listed] == [(qid, f"later@{REMOTE}", 2)]
        hop.mode = "ok"
        # the next attempt is an hour away (the back-off), so nothing is tried until the retry below
        ((next_attempt,),) = hub.query("SELECT next_attempt_at FROM outbound")
        assert next_attempt - time.time() > 3500 and queue_rows(hub) and not hop.messages
        assert hub.cli("queue", "retry", qid).stdout.startswith("1 ")
        wait_for(lambda: not queue_rows(hub), message="delivery after queue retry", timeout=30, interval=0.1)
    finally:
        hop.shutdown()
        hop.server_close()
    (delivered,) = hop.messages
    assert delivered.endswith(message) and f"id {qid}".encode() in delivered  # intact, trace header first
    assert pop3_messages(hub) == []  # no notices for a mail that was delivered
    assert hub.cli("queue", "retry", "--all").stdout.startswith("0 ")
    # `mailhub trace` follows the mail through its three attempts, by queue ID and by the address
    (mail,) = json.loads(hub.cli("trace", qid, "--json").stdout)["mails"]
    relay_events = [e for e in mail["events"] if e.get("rcpt") == f"later@{REMOTE}"]
    assert relay_events[0]["kind"] == "relay_deferred" and "421 4.3.2" in relay_events[0]["detail"]
    assert [(e["kind"], e["detail"][:9]) for e in relay_events[1:]] == [
        ("relay_deferred", "450 4.2.0"),
        ("relayed", "250 2.0.0"),
    ]
    (remote,) = mail["remote_recipients"]
    assert (remote["rcpt"], remote["state"], remote["attempts"]) == (f"later@{REMOTE}", "relayed", 3)
    assert remote["hop"] == f"127.0.0.1:{hop.port}"
    text = hub.cli("trace", f"later@{REMOTE}").stdout
    assert f"mail {qid}" in text and f"relayed     to <later@{REMOTE}> via 127.0.0.1:{hop.port}: 250 " in text


def test_5xx_bounces_and_expiry_with_delay_warning(make_hub, tmp_path):
    hard, soft = free_port(), free_port()
    hub = relay_hub(
        make_hub,
        f"hard.test=127.0.0.1:{hard}, soft.test=127.0.0.1:{soft}",
        MAILHUB_RELAY_MIN_BACKOFF="0.5",
        MAILHUB_RELAY_MAX_BACKOFF="1",
        MAILHUB_RELAY_DELAY_WARNING="1.5",
        MAILHUB_RELAY_MAX_LIFETIME="4",
    )
    with smtp_sink(tmp_path / "hard", hard, "-f", "rcpt"), smtp_sink(tmp_path / "soft", soft, "-r", "rcpt"):
        bounced = submit(hub, ["nobody@hard.test"], make_message(2000, subject="to be bounced"))
        submit(hub, ["nobody@hard.test"], make_message(2000, subject="a bounce"), sender="")  # never bounced
        expired = submit(hub, ["slow@soft.test"], make_message(2000, subject="to expire"))
        wait_for(lambda: not queue_rows(hub), timeout=30, message="the queue to empty", interval=0.1)
    messages = pop3_messages(hub)
    reports = delivery_reports(messages)
    assert len(messages) == len(reports) == 3, [m["Subject"] for m in messages]
    by_action = {}
    for action, blocks in reports:
        by_action.setdefault(action, []).append(blocks)
    assert sorted(by_action) == ["delayed", "failed"] and len(by_action["failed"]) == 2
    (delayed,) = by_action["delayed"]
    assert delayed[0]["Final-Recipient"] == "rfc822; slow@soft.test" and delayed[0]["Status"].startswith("4.")
    assert "Will-Retry-Until" in delayed[0]
    failed = {blocks[0]["Final-Recipient"]: blocks[0] for blocks in by_action["failed"]}
    assert failed["rfc822; nobody@hard.test"]["Status"] == "5.3.0"
    assert "500 5.3.0" in failed["rfc822; nobody@hard.test"]["Diagnostic-Code"]
    assert failed["rfc822; slow@soft.test"]["Status"] == "4.4.7"
    for message in messages:
        assert message["To"].addresses[0].addr_spec == "alpha@hub.test"
        assert message["Auto-Submitted"] == "auto-replied"
        quoted = list(message.iter_parts())[2].get_content()
        # the mail is named by the hub's Received: line and its Message-ID, never by its Subject or body
        assert "Subject" not in quoted and "to be bounced" not in quoted and "to expire" not in quoted, quoted
        assert "Message-ID: <" in quoted
        assert f"id {bounced}" in quoted or f"id {expired}" in quoted
    text = metrics_text(hub)
    assert 'mailhub_outbound_deliveries_total{outcome="bounced"} 2.0' in text
    assert 'mailhub_outbound_deliveries_total{outcome="expired"} 1.0' in text
    (mail,) = json.loads(hub.cli("trace", bounced, "--json").stdout)["mails"]
    assert [r["state"] for r in mail["remote_recipients"]] == ["bounced"]
    assert [e["detail"][:9] for e in mail["events"] if e["kind"] == "bounced"] == ["500 5.3.0"]
    (mail,) = json.loads(hub.cli("trace", expired, "--json").stdout)["mails"]
    kinds = [e["kind"] for e in mail["events"] if e["kind"] != "accepted"]
    assert kinds[-1] == "bounced" and set(kinds[:-1]) == {"relay_deferred"} and len(kinds) >= 2
    assert mail["remote_recipients"][0]["last_reply"].startswith("4.4.7 delivery time expired")


# ---- crash safety ------------------------------------------------------------------------------


class StallingHop:
    """An SMTP next hop that takes the message data but never answers the end of data, counting
    the bytes it got: the hub is caught in the middle of a delivery."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.received = 0
        self.sockets = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        with contextlib.suppress(OSError):
            conn, _ = self.server.accept()
            self.sockets.append(conn)
            conn.sendall(b"220 stall ESMTP\r\n")
            buffer = b""
            while b"DATA\r\n" not in buffer and b"BDAT" not in buffer:
                data = conn.recv(65536)
                if not data:
                    return
                buffer += data
                while b"\r\n" in buffer and not buffer.startswith((b"DATA", b"BDAT")):
                    line, buffer = buffer.split(b"\r\n", 1)
                    conn.sendall(b"250-stall\r\n250 PIPELINING\r\n" if line.startswith(b"EHLO") else b"250 ok\r\n")
            conn.sendall(b"354 go on\r\n")
            while data := conn.recv(65536):
                self.received += len(data)

    def close(self):
        for sock in [self.server, *self.sockets]:
            sock.close()


@pytest.mark.one_engine(
    "about the process killed mid-delivery; the queue on PostgreSQL is covered by the other relay tests"
)
def test_kill_9_during_delivery_loses_nothing(make_hub, tmp_path):
    stall = StallingHop()
    port = free_port()
    hub = relay_hub(make_hub, f"{REMOTE}=127.0.0.1:{stall.port}", process=True)
    with smtp_sink(tmp_path / "sink", port) as dump:  # the next hop after the restart
        try:
            message = make_message(8 * MB, subject="interrupted")
            qid = submit(hub, [f"far@{REMOTE}"], message)
            wait_for(lambda: stall.received > MB, message="the delivery to be under way", timeout=30, interval=0.1)
            hub.kill()
        finally:
            stall.close()
        assert [r[:3] for r in queue_rows(hub)] == [(qid, f"far@{REMOTE}", 0)]
        hub.env["MAILHUB_RELAY_ROUTES"] = f"{REMOTE}=127.0.0.1:{port}"
        hub.in_process_from_now_on().start()
        wait_for(lambda: not queue_rows(hub), message="delivery after the restart", timeout=30, interval=0.1)
        (dumped,) = wait_for(lambda: list(dump.iterdir()), message="the sink's dump file", timeout=30, interval=0.1)
        assert message.replace(b"\r\n", b"\n") in dumped.read_bytes()
    assert hub.query("SELECT count(*) FROM messages") == [(0,)] and hub.blob_files() == []


# ---- TLS policies and AUTH: another hub as the next hop ------------------------------------------


def test_tls_required_with_verification_and_auth_to_another_hub(make_hub, tmp_path):
    cert, key = make_cert(tmp_path)
    # The other network's hub knows this hub's relaying login, which owns the sender address.
    # Mail for opp.test comes unauthenticated from this hub's network (a peer).
    other = make_hub(
        MAILHUB_DOMAIN="other.test,hub.test,opp.test",
        MAILHUB_TLS_CERT_FILE=str(cert),
        MAILHUB_TLS_KEY_FILE=str(key),
        MAILHUB_SMTP_PEER_NETWORKS="127.0.0.0/8",
    )
    other.add_site("partner", "partner@other.test")
    other.add_site("hub-a", "alpha@hub.test")
    other.add_site("opp", "opp@opp.test")
    other.start()
    no_tls = free_port()
    (tmp_path / "relay-password").write_text(PASSWORD + "\n")
    config = tmp_path / "hub.toml"
    config.write_text(f"""
[relay]
[[relay.routes]]
domain = "other.test"
host = "127.0.0.1"
port = {other.smtp_port}
tls = "required"
ca_file = "{cert}"
auth_user = "hub-a"
auth_password_file = "{tmp_path / "relay-password"}"

[[relay.routes]]
domain = "opp.test"
host = "127.0.0.1"
port = {other.smtp_port}

[[relay.routes]]
domain = "unverified.test"
host = "127.0.0.1"
port = {other.smtp_port}
tls = "required"

[[relay.routes]]
domain = "no-tls.test"
host = "127.0.0.1"
port = {no_tls}
tls = "required"
""")
    hub = make_hub(MAILHUB_RELAY_MIN_BACKOFF="3600", MAILHUB_RELAY_MAX_BACKOFF="3600")
    hub.config = config
    hub.add_site("alpha", "alpha@hub.test")
    hub.start()
    with smtp_sink(tmp_path / "sink", no_tls):
        message = make_message(4000, subject="across networks")
        submit(hub, ["partner@other.test", "opp@opp.test", "x@unverified.test", "y@no-tls.test"], message)
        wait_for(
            lambda: [r[2] for r in queue_rows(hub)] == [1, 1],
            message="one delivery and two deferrals",
            timeout=30,
            interval=0.1,
        )
    errors = {rcpt: error for _, rcpt, _, error, _ in queue_rows(hub)}
    assert set(errors) == {"x@unverified.test", "y@no-tls.test"}
    assert "CERTIFICATE_VERIFY_FAILED" in errors["x@unverified.test"], errors
    assert "offers no STARTTLS" in errors["y@no-tls.test"], errors
    (received,) = pop3_messages(other, "partner")
    assert received["Subject"] == "across networks"
    trace = received.get_all("Received")[0]
    assert "with ESMTPSA" in trace and "for <partner@other.test>" in trace  # over TLS, authenticated
    (received,) = pop3_messages(other, "opp")
    trace = received.get_all("Received")[0]
    assert "with ESMTPS " in trace and "for <opp@opp.test>" in trace  # opportunistic: TLS, any certificate


# ---- per-recipient replies, the next hop's SIZE, connection limit and reuse ----------------------


class CountingHop(socketserver.ThreadingTCPServer):
    """A small SMTP next hop (PIPELINING, SIZE 100000, no CHUNKING; with esmtp=False an old server
    that refuses EHLO): refuses RCPT for local parts starting with "reject", accepts the rest, and
    counts connections at once and mails per connection. `mode` may be switched at any time:
    "421" refuses connections, "450" defers every RCPT, "ok" works. Keeps the mails it accepted."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, esmtp: bool = True, mode: str = "ok"):
        self.esmtp = esmtp
        self.mode = mode
        self.messages: list[bytes] = []
        super().__init__(("127.0.0.1", 0), _CountingSession)
        self.port = self.server_address[1]
        self.lock = threading.Lock()
        self.active = self.max_active = 0
        self.mails_per_connection: list[int] = []
        self.accepted: list[str] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _CountingSession(socketserver.StreamRequestHandler):
    def handle(self):
        hop = self.server
        with hop.lock:
            hop.active += 1
            hop.max_active = max(hop.max_active, hop.active)
        mails = 0
        try:
            if hop.mode == "421":
                self.wfile.write(b"421 4.3.2 not now\r\n")
                return
            self.wfile.write(b"220 counting ESMTP\r\n")
            rcpts = []
            while line := self.rfile.readline():
                command = line.strip().upper()
                if command.startswith(b"EHLO"):
                    self.wfile.write(
                        b"250-counting\r\n250-PIPELINING\r\n250-SIZE 100000\r\n250 8BITMIME\r\n"
                        if hop.esmtp
                        else b"502 5.5.1 EHLO not implemented\r\n"
                    )
                elif command.startswith(b"RCPT") and hop.mode == "450":
                    self.wfile.write(b"450 4.2.0 busy, try later\r\n")
                elif command.startswith(b"RCPT"):
                    refused = command.startswith(b"RCPT TO:<REJECT")
                    self.wfile.write(b"550 5.1.1 no such user\r\n" if refused else b"250 2.1.5 ok\r\n")
                    rcpts += [] if refused else [line.decode().strip()[9:-1]]
                elif command == b"DATA":
                    self.wfile.write(b"354 go ahead\r\n")
                    lines = []
                    while (data := self.rfile.readline()) not in (b".\r\n", b""):
                        lines.append(data[1:] if data.startswith(b"..") else data)
                    time.sleep(0.05)  # a little work per mail, so that connections overlap
                    with hop.lock:
                        hop.accepted += rcpts
                        hop.messages.append(b"".join(lines))
                    mails += 1
                    self.wfile.write(b"250 2.0.0 queued\r\n")
                elif command == b"QUIT":
                    self.wfile.write(b"221 bye\r\n")
                    return
                else:  # MAIL, RSET
                    rcpts = [] if command.startswith((b"MAIL", b"RSET")) else rcpts
                    self.wfile.write(b"250 2.0.0 ok\r\n")
        finally:
            with hop.lock:
                hop.active -= 1
                hop.mails_per_connection.append(mails)


def test_per_recipient_replies_size_limit_and_connection_limit(make_hub, tmp_path):
    hop, old = CountingHop(), CountingHop(esmtp=False)
    config = tmp_path / "hub.toml"
    config.write_text(
        f'[[relay.routes]]\ndomain = "count.test"\nhost = "127.0.0.1"\nport = {hop.port}\n'
        f"max_connections = 2\n"
        f'[[relay.routes]]\ndomain = "old.test"\nhost = "127.0.0.1"\nport = {old.port}\n'
    )
    hub = make_hub()
    hub.config = config
    hub.add_site("alpha", "alpha@hub.test")
    hub.start()
    try:
        with smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=60) as client:
            client.login("alpha", PASSWORD)
            for i in range(12):
                client.sendmail("alpha@hub.test", [f"ok{i}@count.test"], make_message(2000, subject=f"mail {i}"))
            client.sendmail(
                "alpha@hub.test", ["good@count.test", "reject@count.test"], make_message(2000, subject="half refused")
            )
            client.sendmail("alpha@hub.test", ["big@count.test"], make_message(150_000, subject="too big"))
            client.sendmail("alpha@hub.test", ["someone@old.test"], make_message(150_000, subject="by HELO"))
        wait_for(lambda: not queue_rows(hub), message="the queue to empty", timeout=30, interval=0.1)
        wait_for(
            lambda: sum(hop.mails_per_connection) == 13,
            message="the hub's connections to end",
            timeout=30,
            interval=0.1,
        )
    finally:
        for server in (hop, old):
            server.shutdown()
            server.server_close()
    assert old.accepted == ["someone@old.test"]  # HELO, no SIZE limit known
    assert sorted(hop.accepted) == sorted([f"ok{i}@count.test" for i in range(12)] + ["good@count.test"])
    assert hop.max_active <= 2 and max(hop.mails_per_connection) >= 3, (hop.max_active, hop.mails_per_connection)
    reports = {blocks[0]["Final-Recipient"]: blocks[0] for _, blocks in delivery_reports(pop3_messages(hub))}
    assert set(reports) == {"rfc822; reject@count.test", "rfc822; big@count.test"}
    assert reports["rfc822; reject@count.test"]["Status"] == "5.1.1"
    assert reports["rfc822; big@count.test"]["Status"] == "5.3.4"
    assert "exceeds the next hop's SIZE 100000" in reports["rfc822; big@count.test"]["Diagnostic-Code"]


def test_mail_whose_route_was_removed_is_returned_when_its_lifetime_ends(make_hub, closed_port):
    hub = relay_hub(
        make_hub,
        f"{REMOTE}=127.0.0.1:{closed_port}",
        MAILHUB_RELAY_MIN_BACKOFF="3600",
        MAILHUB_RELAY_MAX_BACKOFF="3600",
    )
    submitted = time.monotonic()
    submit(hub, [f"gone@{REMOTE}"], make_message(2000, subject="orphaned"))
    wait_for(lambda: [r[2] for r in queue_rows(hub)] == [1], message="a failed first attempt", timeout=30, interval=0.1)
    hub.stop()
    hub.env.update(MAILHUB_RELAY_ROUTES="", MAILHUB_RELAY_MAX_LIFETIME="1")
    hub.cli("queue", "retry", "--all")
    time.sleep(max(0.0, submitted + 1.5 - time.monotonic()))  # the lifetime is over when the hub looks
    hub.start()
    wait_for(lambda: not queue_rows(hub), message="the mail to be returned", timeout=30, interval=0.1)
    ((action, blocks),) = delivery_reports(pop3_messages(hub))
    assert (action, blocks[0]["Status"]) == ("failed", "4.4.7")
    assert "no route" in blocks[0]["Diagnostic-Code"]
