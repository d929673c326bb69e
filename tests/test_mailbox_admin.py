# `mailhub mailbox list|show|export|delete|return|search` and `mailhub audit` (issue 25) against an
# in-process hub with real SMTP, POP3 and IMAP clients: filters and --json, headers and MIME
# structure without the body, an export checked against the SHA-256 (and refused when the stored
# bytes changed), deletions while a POP3 session holds the mailbox (its maildrop stays until QUIT,
# RETR of the removed mail is refused, nothing is marked damaged) and while an IMAP session has it
# selected (EXPUNGE at its next command), a return with an RFC 3464 notice parsed by Python's email,
# the audit records with the operator's name, and the same deletion with the hub stopped.
import csv
import email
import email.policy
import hashlib
import imaplib
import io
import json
import os
import poplib
import pwd

import pytest

from mailhub.control import ControlError
from mailhub.control import request as control_request

from conftest import ALPHA_BETA_B2, PASSWORD, wait_for
from mailshapes import armored, openpgp, pgp_mime
from pop3util import send

# Every test that starts a hub runs on SQLite and again on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_engines

# The operator an audit record names when the command went through the running hub: the name the
# command line sent (SUDO_USER here) and the user the kernel names for the control socket's peer.
VIA_HUB = f"alice (uid {os.getuid()} {pwd.getpwuid(os.getuid()).pw_name})"

STUDY = "1.2.826.0.1.3680043.10.543.25.2"
OTHER = "1.2.826.0.1.3680043.10.543.25.3"


def mail(n: int, study: str = STUDY, total: int = 3, size: int = 2000) -> bytes:
    """A study part as gateways send it: PGP/MIME (RFC 3156) around an OpenPGP message."""
    return (
        f"From: alpha@hub.test\r\nTo: beta@hub.test\r\nSubject: Patient Jane Roe {n}\r\n"
        f"Message-ID: <m{n}.{study}@hub.test>\r\nX-TELEMEDICINE-SETID: {study}\r\n"
        f"X-TELEMEDICINE-SETPART: {n}\r\nX-TELEMEDICINE-SETTOTAL: {total}\r\nMIME-Version: 1.0\r\n"
    ).encode() + pgp_mime(armored(openpgp(size=size)))


@pytest.fixture
def hub(make_hub, monkeypatch):
    """A hub with alpha and beta, made when the test asks for it: made during the fixture's setup,
    its environment would differ from the test's in PYTEST_CURRENT_TEST, and every `hub.cli` would
    start a Python process instead of running in this one (conftest.cli_in_process_is_the_same)."""
    monkeypatch.setenv("SUDO_USER", "alice")  # the operator the audit records name

    def start():
        hub = make_hub(sites=ALPHA_BETA_B2)
        hub.start()
        return hub

    return start


def cli_json(hub, *args):
    return json.loads(hub.cli(*args, "--json").stdout)


def audit_rows(hub, *args):
    return cli_json(hub, "audit", *args)


def test_list_show_search_and_export(hub, tmp_path):
    hub = hub()
    q1 = send(hub, ["beta@hub.test"], mail(1))
    q2 = send(hub, ["beta@hub.test", "alpha@hub.test"], mail(2, size=20000))
    q3 = send(hub, ["beta@hub.test"], mail(1, OTHER, total=1))

    rows = cli_json(hub, "mailbox", "list", "beta")
    assert [r["queue_id"] for r in rows] == [q1, q2, q3]
    first = rows[0]
    assert (first["sender"], first["message_id"], first["set_id"], first["set_part"], first["set_total"]) == (
        "alpha@hub.test",
        f"<m1.{STUDY}@hub.test>",
        STUDY,
        1,
        3,
    )
    assert first["fetched"] is False and first["size"] == len(hub.stored(q1))
    assert [r["queue_id"] for r in cli_json(hub, "mailbox", "list", "beta", "--study", STUDY)] == [q1, q2]
    assert [r["queue_id"] for r in cli_json(hub, "mailbox", "list", "beta", "--larger-than", "10K")] == [q2]
    assert cli_json(hub, "mailbox", "list", "beta", "--sender", "nobody@hub.test") == []
    assert cli_json(hub, "mailbox", "list", "beta", "--older-than", "1h") == []
    table = hub.cli("mailbox", "list", "beta").stdout
    assert q1 in table and f"{STUDY} 1/3" in table and "no" in table
    bad = hub.cli("mailbox", "list", "nosuch", check=False)
    assert bad.returncode == 1 and "no site named 'nosuch'" in bad.stderr
    assert hub.cli("mailbox", "list", "beta", "--larger-than", "lots", check=False).returncode == 2

    shown = cli_json(hub, "mailbox", "show", "beta", q1)
    headers = dict((name.lower(), value) for name, value in shown["headers"])
    assert headers["message-id"] == f"<m1.{STUDY}@hub.test>" and "received" in headers
    types = [p["type"] for p in shown["structure"]]
    assert types == ["multipart/encrypted", "application/pgp-encrypted", "application/octet-stream"]
    assert shown["structure"][2]["filename"] == "encrypted.asc" and shown["structure"][2]["part"] == "2"
    text = hub.cli("mailbox", "show", "beta", q1).stdout
    assert "application/octet-stream" in text and "-----BEGIN PGP" not in text and "\nVersion: 1" not in text

    found = cli_json(hub, "mailbox", "search", "--message-id", f"<m2.{STUDY}@hub.test>")
    assert sorted((r["site"], r["queue_id"]) for r in found) == [("alpha", q2), ("beta", q2)]
    assert {r["queue_id"] for r in cli_json(hub, "mailbox", "search", "--study", STUDY)} == {q1, q2}
    assert hub.cli("mailbox", "search", "--study", "9.9.9", check=False).returncode == 1

    out = tmp_path / "q2.eml"
    hub.cli("mailbox", "export", "beta", q2, "-o", str(out))
    assert out.read_bytes() == hub.stored(q2)
    assert (
        hashlib.sha256(out.read_bytes()).hexdigest()
        == hub.query("SELECT sha256 FROM messages WHERE queue_id = ?", q2)[0][0]
    )
    again = hub.cli("mailbox", "export", "beta", q2, "-o", str(out), check=False)
    assert again.returncode == 1 and "exists already" in again.stderr
    piped = hub.cli("mailbox", "export", "beta", q1)
    assert piped.stdout == hub.stored(q1).decode().replace("\r\n", "\n")

    # the stored bytes changed on disk: refused, nothing written
    ((blob, offset, size),) = hub.query("SELECT blob, blob_offset, size FROM messages WHERE queue_id = ?", q3)
    path = hub.data_dir / "blobs" / blob
    with open(path, "r+b") as f:
        f.seek(offset + size - 10)
        f.write(b"X")
    refused = hub.cli("mailbox", "export", "beta", q3, "-o", str(tmp_path / "q3.eml"), check=False)
    assert refused.returncode == 1 and "do not match" in refused.stderr and "storage verify" in refused.stderr
    assert not list(tmp_path.glob("q3.eml*"))
    assert hub.cli("mailbox", "export", "beta", q3, check=False).returncode == 1

    exported = audit_rows(hub, "--event", "exported")
    assert [(r["queue_id"], r["site"], r["actor"]) for r in exported] == [(q2, "beta", VIA_HUB), (q1, "beta", VIA_HUB)]
    assert exported[0]["detail"] == f"to file {out}" and exported[1]["detail"] == "to stdout"
    assert exported[0]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()


def test_delete_while_pop3_holds_the_mailbox(hub):
    hub = hub()
    q1 = send(hub, ["beta@hub.test"], mail(1))
    q2 = send(hub, ["beta@hub.test"], mail(2))
    pop = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=30)
    pop.user("beta")
    pop.pass_(PASSWORD)
    assert pop.stat()[0] == 2

    done = hub.cli("mailbox", "delete", "beta", q1, "--yes")
    assert "1 mail(s) deleted" in done.stdout
    assert [r["queue_id"] for r in cli_json(hub, "mailbox", "list", "beta")] == [q2]
    # the session's maildrop stays as it was until QUIT; the removed mail is refused, the other served
    assert pop.stat()[0] == 2
    with pytest.raises(poplib.error_proto, match="removed from the mailbox"):
        pop.retr(1)
    assert b"".join(pop.retr(2)[1]).startswith(b"Received:")
    hub.cli("mailbox", "delete", "beta", q2, "--yes")  # fetched, not yet deleted by the session
    pop.dele(1)
    pop.dele(2)
    assert pop.quit().startswith(b"+OK")
    assert hub.query("SELECT count(*) FROM mailbox") == [(0,)]
    assert hub.query("SELECT count(*) FROM damaged") == [(0,)]
    assert hub.cli("storage", "check").returncode == 0  # index, blobs and ledger agree
    wait_for(lambda: hub.query("SELECT count(*) FROM messages") == [(0,)], message="both mails freed")

    trail = audit_rows(hub, "--site", "beta")
    events = [(r["event"], r["queue_id"], r["actor"]) for r in trail]
    assert events == [
        ("accepted", q1, "alpha"),
        ("accepted", q2, "alpha"),
        ("deleted_by_operator", q1, VIA_HUB),
        ("fetched", q2, "beta"),  # at the RETR; written at QUIT, when the mail was gone already
        ("deleted_by_operator", q2, VIA_HUB),
    ]
    accepted, fetched = trail[1], trail[3]
    assert (fetched["message_id"], fetched["study_id"], fetched["size"], fetched["sha256"]) == (
        accepted["message_id"],
        STUDY,
        accepted["size"],
        accepted["sha256"],
    )


def test_delete_by_filter_while_imap_has_the_mailbox_selected(hub):
    hub = hub()
    queue_ids = [send(hub, ["beta@hub.test"], mail(n)) for n in (1, 2)]
    other = send(hub, ["beta@hub.test"], mail(1, OTHER, total=1))
    imap = imaplib.IMAP4("127.0.0.1", hub.ports["imap"])
    imap.login("beta", PASSWORD)
    assert imap.select("INBOX") == ("OK", [b"3"])

    asked = hub.cli("mailbox", "delete", "beta", "--study", STUDY, check=False)
    assert asked.returncode == 2 and "--yes" in asked.stderr  # no terminal to ask on
    assert hub.cli("mailbox", "delete", "beta", check=False).returncode == 2  # nothing named
    done = json.loads(hub.cli("mailbox", "delete", "beta", "--study", STUDY, "--yes", "--json").stdout)
    assert done == {"deleted": 2, "queue_ids": sorted(queue_ids)}

    typ, _ = imap.noop()
    assert typ == "OK"
    assert sorted(imap.untagged_responses.get("EXPUNGE", [])) == [b"1", b"2"]  # told at its next command
    typ, data = imap.fetch("1", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
    assert typ == "OK" and f"m1.{OTHER}".encode() in data[0][1]
    # an idling session is told at once
    imap.send(b"I1 IDLE\r\n")
    assert imap.readline() == b"+ idling\r\n"
    imap.sock.settimeout(10)
    hub.cli("mailbox", "delete", "beta", other, "--yes")
    assert imap.readline() == b"* 1 EXPUNGE\r\n"
    imap.send(b"DONE\r\n")
    assert imap.readline() == b"I1 OK IDLE terminated\r\n"
    imap.logout()
    assert cli_json(hub, "mailbox", "list", "beta") == []
    removed = audit_rows(hub, "--study", STUDY, "--event", "deleted_by_operator")
    assert sorted(r["queue_id"] for r in removed) == sorted(queue_ids)
    assert {r["actor"] for r in removed} == {VIA_HUB}


def test_return_sends_a_dsn_naming_the_mail_without_its_content(hub):
    hub = hub()
    qid = send(hub, ["beta@hub.test"], mail(1))
    answer = json.loads(hub.cli("mailbox", "return", "beta", qid, "--reason", "wrong site", "--yes", "--json").stdout)
    assert answer["sender"] == "alpha@hub.test" and answer["via"] == "site alpha"
    assert cli_json(hub, "mailbox", "list", "beta") == []
    ((notice_qid,),) = hub.query(
        "SELECT queue_id FROM mailbox WHERE site_id = (SELECT id FROM sites WHERE name='alpha')"
    )
    assert notice_qid == answer["notice"]

    raw = hub.stored(notice_qid)
    dsn = email.message_from_bytes(raw, policy=email.policy.default)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    assert dsn["To"].addresses[0].addr_spec == "alpha@hub.test"
    human, status, headers = dsn.get_payload()
    assert "wrong site" in human.get_content() and f"m1.{STUDY}" in human.get_content()
    assert status.get_content_type() == "message/delivery-status"
    per_message, per_rcpt = status.get_payload()
    assert per_rcpt["Final-Recipient"] == "rfc822; beta@hub.test"
    assert per_rcpt["Action"] == "failed" and per_rcpt["Status"] == "5.0.0"
    assert headers.get_content_type() == "text/rfc822-headers"
    assert f"X-TELEMEDICINE-SETID: {STUDY}" in headers.get_payload()
    assert b"Jane Roe" not in raw and b"BEGIN PGP" not in raw  # no patient data, no content

    (returned,) = audit_rows(hub, "--event", "returned")
    assert (returned["queue_id"], returned["site"], returned["actor"]) == (qid, "beta", VIA_HUB)
    assert notice_qid in returned["detail"]
    missing = hub.cli("mailbox", "return", "beta", qid, "--yes", check=False)
    assert missing.returncode == 1 and "no mail" in missing.stderr

    # the control commands check what they are sent (one-line refusals; nothing removed)
    fields = {"site": "beta", "uids": [1], "event": "deleted_by_operator", "actor": "alice"}
    for bad, said in (
        ({"uids": "1"}, '"uids" is a list'),
        ({"uids": list(range(2001))}, '"uids" is a list'),
        ({"event": "expired"}, '"event" must be deleted_by_operator'),
        ({"actor": ""}, '"actor" is a string'),
        ({"site": "nosuch"}, "no site named 'nosuch'"),
    ):
        with pytest.raises(ControlError, match=said):
            control_request(hub.data_dir, "mailbox.remove", **(fields | bad))
    with pytest.raises(ControlError, match='"rows" is a list'):
        control_request(hub.data_dir, "mailbox.audit", rows=[["beta", "Q", None, None, "big", None, "a", None]])


def test_audit_exports_csv_and_delete_works_with_the_hub_stopped(hub, tmp_path):
    hub = hub()
    q1 = send(hub, ["beta@hub.test"], mail(1))
    q2 = send(hub, ["beta@hub.test"], mail(2))
    q3 = send(hub, ["beta@hub.test"], mail(3))
    hub.stop()
    hub.cli("mailbox", "delete", "beta", q1, "--yes")  # its own storage, under the folder's lock
    returned = json.loads(hub.cli("mailbox", "return", "beta", q3, "--yes", "--json").stdout)
    assert [r["queue_id"] for r in cli_json(hub, "mailbox", "list", "beta")] == [q2]
    hub.start()
    assert [r["queue_id"] for r in cli_json(hub, "mailbox", "list", "beta")] == [q2]
    assert [r["queue_id"] for r in cli_json(hub, "mailbox", "list", "alpha")] == [returned["notice"]]
    assert hub.cli("storage", "check").returncode == 0

    out = tmp_path / "audit.csv"
    hub.cli("audit", "--site", "beta", "--since", "1h", "--csv", "-o", str(out))
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [(r["event"], r["queue_id"]) for r in rows] == [
        ("accepted", q1),
        ("accepted", q2),
        ("accepted", q3),
        ("deleted_by_operator", q1),
        ("returned", q3),
    ]
    assert rows[3]["actor"] == "alice" and rows[3]["study_id"] == STUDY and rows[3]["time"].endswith("Z")
    assert audit_rows(hub, "--site", "beta", "--until", "2020-01-01") == []
    assert "deleted_by_operator" in hub.cli("audit", "--study", STUDY).stdout
