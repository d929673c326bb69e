# JSON logs (log.format = "json"): every line a hub writes during a real session (smtplib sending,
# imaplib fetching, poplib fetching and deleting, a failed login, a refused recipient) is one JSON object with the
# stable fields of mailhub/logsetup.py (time, level, logger, event, msg, and per event queue_id,
# site, client, size, sha256, outcome, ...), and the values are the session's own; text logs
# keep their lines.
import hashlib
import imaplib
import json
import poplib
import re
import smtplib

import pytest

from mailhub.logsetup import FIELDS

from conftest import ALPHA_BETA_B2, PASSWORD, make_message, queue_id_from, wait_for

ALWAYS = ("time", "level", "logger", "event", "msg")


@pytest.fixture
def json_hub(make_hub):
    return make_hub(sites=ALPHA_BETA_B2, MAILHUB_LOG_FORMAT="json").start()


def log_objects(hub) -> list[dict]:
    lines = hub.log_text().splitlines()
    objects = [json.loads(line) for line in lines]  # every line is one object
    for entry in objects:
        assert set(entry) <= {*ALWAYS, *FIELDS, "exc"}, entry
        assert all(name in entry for name in ALWAYS), entry
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
    return objects


def events(hub, name: str) -> list[dict]:
    return [entry for entry in log_objects(hub) if entry["event"] == name]


def test_a_real_session_logs_one_json_object_per_line_with_its_fields(json_hub):
    hub = json_hub
    message = make_message(3000)
    with smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30) as client:
        client.ehlo("gateway.test")
        client.login("alpha", PASSWORD)
        client.mail("alpha@hub.test")
        assert client.rcpt("beta@hub.test")[0] == 250
        assert client.rcpt("nobody@hub.test")[0] == 550
        code, reply = client.data(message)
        assert code == 250
    queue_id = queue_id_from(reply)
    stored = hub.stored(queue_id)  # (POP3 deletes it below)
    imap = imaplib.IMAP4("127.0.0.1", hub.ports["imap"], timeout=30)
    imap.login("beta", PASSWORD)
    imap.select("INBOX", readonly=True)
    assert imap.fetch("1", "(BODY.PEEK[])")[0] == "OK"
    imap.logout()
    pop3 = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=30)
    pop3.user("beta")
    with pytest.raises(poplib.error_proto):
        pop3.pass_("wrong-password-here")
    pop3 = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=30)
    pop3.user("beta")
    pop3.pass_(PASSWORD)
    pop3.retr(1)
    pop3.dele(1)
    pop3.quit()

    (tx,) = wait_for(lambda: events(hub, "smtp.transaction"), message="the transaction's line")
    assert tx["queue_id"] == queue_id and tx["level"] == "info" and tx["logger"] == "mailhub.smtp"
    assert (tx["protocol"], tx["site"], tx["client"], tx["outcome"]) == ("smtp", "alpha", "127.0.0.1", "250")
    assert tx["sender"] == "alpha@hub.test" and tx["recipients"] == ["beta@hub.test"]
    assert tx["size"] == len(message) and tx["sha256"] == hashlib.sha256(stored).hexdigest()
    assert isinstance(tx["duration_s"], float) and f"qid={queue_id}" in tx["msg"]  # the text line as msg

    (rcpt,) = events(hub, "smtp.rcpt_refused")
    assert rcpt["recipients"] == ["nobody@hub.test"] and rcpt["outcome"] == "550" and rcpt["site"] == "alpha"
    (login,) = events(hub, "login.refused")
    assert (login["protocol"], login["user"], login["client"], login["outcome"]) == (
        "pop3",
        "beta",
        "127.0.0.1",
        "failed",
    )
    assert "wrong-password" not in hub.log_text()

    sessions = wait_for(lambda: [e for e in events(hub, "pop3.session") if e["site"] == "beta"], message="session line")
    (session,) = sessions
    assert (session["messages"], session["deleted"], session["outcome"]) == (1, 1, "quit")
    assert session["size"] >= len(message) and session["client"] == "127.0.0.1"
    (imap_session,) = wait_for(lambda: [e for e in events(hub, "imap.session") if e["site"] == "beta"])
    assert (imap_session["messages"], imap_session["deleted"], imap_session["outcome"]) == (1, 0, "logout")
    assert imap_session["size"] == len(stored) and imap_session["protocol"] == "imap"
    assert any(e["event"] == "log" and "hub ready" in e["msg"] for e in log_objects(hub))  # all other lines


def test_text_logs_keep_their_lines(hub):
    with smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30) as client:
        client.login("alpha", PASSWORD)
        assert client.sendmail("alpha@hub.test", ["beta@hub.test"], make_message(1000)) == {}
    line = wait_for(
        lambda: re.search(r"INFO mailhub\.smtp: qid=\S+ site=alpha from=<alpha@hub\.test> .*", hub.log_text())
    )
    assert "sha256=" in line.group(0) and "outcome='250'" in line.group(0) and not line.group(0).startswith("{")
