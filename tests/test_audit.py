# The audit trail (issue 25, storage/audit.py): against an in-process hub, a mail accepted for two
# sites, fetched and deleted over POP3 by one and over IMAP by the other, leaves accepted, fetched and
# deleted_by_site records with its queue ID, Message-ID, study, size and SHA-256 and no content; the
# records outlive the mail and the removal of the site (deleted_by_operator with the operator's
# name); the table refuses UPDATE and DELETE except pruning past the retention; queries filter by
# site, study and time range.
import hashlib
import imaplib
import poplib
import sqlite3
import time

import pytest

from storage import audit, db

from conftest import ALPHA_BETA_B2, PASSWORD, wait_for
from pop3util import send

SET_ID = "1.2.826.0.1.3680043.10.543.25.1"


def study_message(part: int = 1, total: int = 2) -> bytes:
    body = (b"QUJD" * 19 + b"\r\n") * 30
    return (
        f"From: alpha@hub.test\r\nTo: beta@hub.test\r\nSubject: secret patient name\r\n"
        f"Message-ID: <audit{part}@hub.test>\r\nX-TELEMEDICINE-SETID: {SET_ID}\r\n"
        f"X-TELEMEDICINE-SETPART: {part}\r\nX-TELEMEDICINE-SETTOTAL: {total}\r\n\r\n"
    ).encode() + body


def records(hub, **filters) -> list[audit.AuditRecord]:
    conn = db.connect_readonly(hub.data_dir)
    try:
        return audit.query(conn, **filters)
    finally:
        conn.close()


def test_accepted_fetched_deleted_by_site_outlive_the_mail_and_the_site(make_hub, monkeypatch):
    hub = make_hub(sites=ALPHA_BETA_B2 + (("gamma", "gamma@hub.test"),)).start()
    started = time.time()
    message = study_message()
    qid = send(hub, ["beta@hub.test", "gamma@hub.test"], message)
    ((size, sha256),) = hub.query("SELECT size, sha256 FROM messages WHERE queue_id = ?", qid)
    assert sha256 == hashlib.sha256(hub.stored(qid)).hexdigest()

    accepted = records(hub, event=audit.ACCEPTED)
    assert sorted(r.site for r in accepted) == ["beta", "gamma"]
    for r in accepted:
        assert (r.queue_id, r.message_id, r.study_id, r.size, r.sha256, r.actor) == (
            qid,
            "<audit1@hub.test>",
            SET_ID,
            size,
            sha256,
            "alpha",
        )
        assert started - 1 <= r.at <= time.time()

    # beta: POP3 RETR + DELE + QUIT
    pop = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=30)
    pop.user("beta")
    pop.pass_(PASSWORD)
    pop.retr(1)
    pop.dele(1)
    pop.quit()
    # gamma: IMAP fetch, then \Deleted and EXPUNGE
    imap = imaplib.IMAP4("127.0.0.1", hub.ports["imap"])
    imap.login("gamma", PASSWORD)
    imap.select("INBOX")
    assert imap.fetch("1", "(BODY[])")[0] == "OK"
    imap.store("1", "+FLAGS", "(\\Deleted)")
    imap.expunge()
    imap.logout()
    wait_for(lambda: not hub.query("SELECT 1 FROM messages WHERE queue_id = ?", qid), message="mail freed")

    by_site = {site: [r.event for r in records(hub, site=site)] for site in ("beta", "gamma")}
    assert by_site == {
        "beta": [audit.ACCEPTED, audit.FETCHED, audit.DELETED_BY_SITE],
        "gamma": [audit.ACCEPTED, audit.FETCHED, audit.DELETED_BY_SITE],
    }
    for r in records(hub, queue_id=qid):
        assert (r.message_id, r.study_id, r.size, r.sha256) == ("<audit1@hub.test>", SET_ID, size, sha256)
    fetched = {r.site: r for r in records(hub, event=audit.FETCHED)}
    assert fetched["beta"].actor == "beta" and fetched["beta"].detail.startswith("pop3 ")
    assert fetched["gamma"].actor == "gamma" and fetched["gamma"].detail.startswith("imap ")
    # nothing of the content: no row holds the subject or the body
    conn = hub.db()
    dump = "\n".join(conn.iterdump())
    conn.close()
    assert "secret patient name" not in dump and "QUJD" not in dump

    # a site removed by the operator: its waiting mail gets deleted_by_operator; all outlive the site
    qid2 = send(hub, ["gamma@hub.test"], study_message(2))
    monkeypatch.setenv("SUDO_USER", "alice")
    monkeypatch.setitem(hub.env, "SUDO_USER", "alice")
    hub.cli("site", "remove", "gamma")
    gamma = records(hub, site="gamma")
    assert [r.event for r in gamma] == [
        audit.ACCEPTED,
        audit.FETCHED,
        audit.DELETED_BY_SITE,
        audit.ACCEPTED,
        audit.DELETED_BY_OPERATOR,
    ]
    assert (gamma[-1].queue_id, gamma[-1].actor, gamma[-1].detail) == (qid2, "alice", "site removed")
    assert [r.queue_id for r in records(hub, study=SET_ID, event=audit.ACCEPTED)] == [qid, qid, qid2]
    assert records(hub, since=time.time() + 10) == []
    assert len(records(hub, since=started - 1, until=time.time() + 1)) == 8


def test_the_trail_is_append_only_and_pruned_only_past_retention(index):
    conn = index  # SQLite and PostgreSQL (conftest.py)
    now = time.time()
    with db.transaction(conn):
        audit.record(
            conn, audit.EXPORTED, "beta", "Q1", "<m1@x>", "1.2.3", 10, "ab" * 32, "alice", "to file", now - 100
        )
        audit.record(conn, audit.EXPIRED, "beta", "Q2", "<m2@x>", "1.2.3", 20, "cd" * 32, audit.HUB_ACTOR, None, now)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("UPDATE audit SET actor = 'mallory'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM audit")
    with pytest.raises(ValueError, match="unknown audit event"):
        audit.record(conn, "shredded", "beta", "Q3", None, None, None, None, "alice")
    assert audit.prune(conn, now - 50) == 1
    assert [r.queue_id for r in audit.query(conn)] == ["Q2"]
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM audit")  # the prune mark does not stay open


def test_the_hub_prunes_records_past_the_retention_at_start(make_hub):
    hub = make_hub(sites=ALPHA_BETA_B2, MAILHUB_EVENTS_AUDIT_RETENTION_DAYS="30")
    conn = db.connect(hub.data_dir)
    now = time.time()
    with db.transaction(conn):
        audit.record(conn, audit.FETCHED, "beta", "OLD", None, None, 1, None, "beta", None, now - 31 * 86400)
        audit.record(conn, audit.FETCHED, "beta", "NEW", None, None, 1, None, "beta", None, now - 29 * 86400)
    conn.close()
    hub.start()
    wait_for(lambda: [r.queue_id for r in records(hub)] == ["NEW"], message="the old record pruned at start")
    # the log line follows the commit that the records show
    wait_for(lambda: "pruned 1 audit record(s) older than 30 days" in hub.log_text(), message="the pruning logged")
