# `mailhub sessions` and `--kick SITE` against a running in-process hub: real SMTP (raw socket),
# POP3 and IMAP (raw socket) sessions are listed with protocol, site, client address, since, bytes
# and last command; kicking a site ends its sessions with each protocol's goodbye (SMTP 421 once
# the transaction in flight is answered, POP3 -ERR without applying DELE, IMAP * BYE) and leaves
# other sites' sessions alone.
import json
import re
import socket
import time

import pytest

from mailhub import control

from conftest import PASSWORD, RawSMTP, make_message, queue_id_from, wait_for

# Every test that starts a hub runs on SQLite and again on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_engines


class RawLines:
    """A line-based client on a plain socket (POP3, IMAP)."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buf = b""
        self.greeting = self.line()

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"closed; unread {self.buf!r}")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\r\n")

    def until(self, prefix: bytes) -> list[bytes]:
        lines = []
        while not (lines and lines[-1].startswith(prefix)):
            lines.append(self.line())
        return lines

    def rest(self) -> bytes:
        """What the server sends until it closes."""
        self.sock.settimeout(10)
        data, self.buf = self.buf, b""
        while chunk := self.sock.recv(65536):
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


def sessions(hub) -> list[dict]:
    return control.request(hub.data_dir, "sessions")["sessions"]


def smtp_logged_in(hub, login: str) -> RawSMTP:
    client = RawSMTP(hub.smtp_port)
    client.ehlo()
    assert client.auth_plain(login).startswith(b"235")
    return client


def test_sessions_are_listed_and_a_kick_ends_only_that_sites_sessions(hub):
    started = time.time()
    smtp = smtp_logged_in(hub, "alpha")
    assert smtp.command("NOOP").startswith(b"250")
    anonymous = RawSMTP(hub.smtp_port)
    pop3 = RawLines(hub.ports["pop3"])
    pop3.send("USER beta")
    pop3.line()
    pop3.send(f"PASS {PASSWORD}")
    assert pop3.line().startswith(b"+OK")
    pop3.send("STAT")
    assert pop3.line().startswith(b"+OK")
    imap = RawLines(hub.ports["imap"])
    imap.send(f"a1 LOGIN alpha {PASSWORD}")
    assert imap.until(b"a1 ")[-1].startswith(b"a1 OK")
    imap.send("a2 SELECT INBOX")
    assert imap.until(b"a2 ")[-1].startswith(b"a2 OK")

    rows = wait_for(lambda: r if len(r := sessions(hub)) == 4 else None, message="four sessions listed")
    listed = json.loads(hub.cli("sessions", "--json").stdout)
    assert [(r["protocol"], r["site"], r["since"]) for r in listed] == [
        (r["protocol"], r["site"], r["since"]) for r in rows
    ]
    by_kind = {(r["protocol"], r["site"]): r for r in rows}
    assert set(by_kind) == {("smtp", "alpha"), ("smtp", None), ("pop3", "beta"), ("imap", "alpha")}
    assert [
        by_kind[k]["command"] for k in (("smtp", "alpha"), ("smtp", None), ("pop3", "beta"), ("imap", "alpha"))
    ] == [
        "NOOP",
        "",
        "STAT",
        "SELECT",
    ]
    for row in rows:
        assert row["client"] == "127.0.0.1" and started - 1 <= row["since"] <= time.time()
    assert by_kind[("smtp", "alpha")]["bytes_in"] > 40 and by_kind[("smtp", "alpha")]["bytes_out"] > 100
    assert by_kind[("imap", "alpha")]["bytes_in"] == len(f"a1 LOGIN alpha {PASSWORD}\r\na2 SELECT INBOX\r\n")
    text = hub.cli("sessions").stdout
    assert text.splitlines()[0].split()[:4] == ["PROTO", "SITE", "CLIENT", "SINCE"]
    assert any(line.split()[:2] == ["pop3", "beta"] and line.endswith("STAT") for line in text.splitlines())
    assert PASSWORD not in text  # the verb only, never the arguments

    kicked = hub.cli("sessions", "--kick", "alpha")
    # one node on PostgreSQL is asked through it like a cluster's (the answer names the node)
    assert re.fullmatch(r"ending 2 session\(s\) of site alpha( on node\(s\) [\w.-]+)?:", kicked.stdout.splitlines()[0])
    assert smtp.rest().startswith(b"421 4.3.2 Closed by the hub's operator")
    assert imap.rest().startswith(b"* BYE Closed by the hub's operator")
    wait_for(lambda: {(r["protocol"], r["site"]) for r in sessions(hub)} == {("smtp", None), ("pop3", "beta")})
    pop3.send("NOOP")  # beta's session goes on
    assert pop3.line().startswith(b"+OK")
    assert anonymous.command("NOOP").startswith(b"250")

    missing = hub.cli("sessions", "--kick", "nobody", check=False)
    assert missing.returncode == 1 and "site nobody has no open session" in missing.stdout
    assert "closed by the hub's operator" in hub.log_text()
    for client in (smtp, anonymous, pop3, imap):
        client.close()


def test_a_kick_lets_the_smtp_transaction_in_flight_finish_and_pop3_keeps_its_mail(hub):
    sender = smtp_logged_in(hub, "alpha")
    for line, code in (("MAIL FROM:<alpha@hub.test>", b"250"), ("RCPT TO:<beta@hub.test>", b"250")):
        assert sender.command(line).startswith(code)
    assert sender.command("DATA").startswith(b"354")
    message = make_message(20000)
    sender.send(message[:5000])
    answer = control.request(hub.data_dir, "sessions.kick", site="alpha")
    assert [(s["protocol"], s["command"]) for s in answer["ended"]] == [("smtp", "DATA")]
    sender.send(message[5000:] + b".\r\n")
    queue_id = queue_id_from(sender.reply())  # answered first: the mail is stored and the client knows
    assert sender.rest().startswith(b"421 4.3.2")
    assert hub.query("SELECT count(*) FROM mailbox WHERE queue_id = ?", queue_id) == [(1,)]

    pop3 = RawLines(hub.ports["pop3"])
    pop3.send("USER beta")
    pop3.line()
    pop3.send(f"PASS {PASSWORD}")
    assert pop3.line().startswith(b"+OK")
    pop3.send("DELE 1")
    assert pop3.line().startswith(b"+OK")
    assert control.request(hub.data_dir, "sessions.kick", site="BETA")["ended"][0]["command"] == "DELE"
    assert pop3.rest().startswith(b"-ERR [SYS/TEMP] closed by the hub's operator")
    wait_for(lambda: not control.request(hub.data_dir, "sessions")["sessions"])
    assert hub.query("SELECT count(*) FROM mailbox WHERE queue_id = ?", queue_id) == [(1,)]  # no QUIT, no deletion
    pop3.close()
    sender.close()
