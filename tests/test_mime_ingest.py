# MIME structures recorded by a running hub: mails sent over SMTP (smtplib; PGP/MIME encrypted by
# real GnuPG) get their structure stored with the index row; it must describe the stored blob
# (Received: header included) exactly as Dovecot's imap describes the same file, serve IMAP FETCH
# BODYSTRUCTURE/ENVELOPE/BODY[n] through the hub, and be recorded in bounded memory for a 200 MB mail.
import asyncio
import base64
import imaplib
import json
import os
import smtplib
import sqlite3
from email.mime.application import MIMEApplication
from email.mime.message import MIMEMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import pytest
from test_memory import _base64_chunk, _status_kb
from test_mime_structure import Dovecot, parse_sexp

from relay.mime.structure import StructureRecorder, bodystructure, envelope, section_range
from relay.smtp import ingest as ingest_module
from relay.smtp.ingest import IncomingMessage
from storage import Storage, db

from conftest import ALPHA_BETA, ALPHA_BETA_B2, PASSWORD, RawSMTP, queue_id_from, stored_message
from gpgutil import Gpg

# Every test that starts a hub runs on SQLite and again on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_engines

MB = 1024 * 1024
DICOM = b"\0" * 128 + b"DICM" + os.urandom(3000)


@pytest.fixture(scope="module")
def armored():
    """A DICOM file encrypted by real GnuPG (ASCII armor, CRLF lines), as a gateway sends it."""
    gpg = Gpg()
    try:
        gpg.new_key("beta <beta@keys.test>")
        return gpg.encrypt(DICOM, "beta@keys.test").replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    finally:
        gpg.close()


def pgp_mime(armored: bytes) -> bytes:
    """A PGP/MIME mail as the DICOM gateways send one (RFC 3156)."""
    return (
        b"From: alpha@hub.test\r\nTo: beta@hub.test\r\nSubject: CT study 1/1\r\n"
        b"Message-ID: <study-1@gw.alpha>\r\nX-TELEMEDICINE-SETID: 1.2.840.1\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted";\r\n'
        b' boundary="------------enc0123456789"\r\n\r\nThis is an OpenPGP/MIME encrypted message.\r\n'
        b"--------------enc0123456789\r\nContent-Type: application/pgp-encrypted\r\n"
        b"Content-Description: PGP/MIME version identification\r\n\r\nVersion: 1\r\n\r\n"
        b'--------------enc0123456789\r\nContent-Type: application/octet-stream; name="encrypted.asc"\r\n'
        b'Content-Description: OpenPGP encrypted message\r\nContent-Disposition: inline; filename="encrypted.asc"\r\n'
        b"\r\n" + armored + b"\r\n--------------enc0123456789--\r\n"
    )


def nested() -> bytes:
    alternative = MIMEMultipart("alternative")
    alternative.attach(MIMEText("report\n", "plain"))
    alternative.attach(MIMEText("<p>report</p>\n", "html"))
    inner = MIMEMultipart("mixed")
    inner["From"] = "Dr. Who <who@gw.beta>"
    inner["Subject"] = "forwarded study"
    inner.attach(MIMEText("see attachment\n"))
    inner.attach(MIMEApplication(b"%PDF" * 100, "pdf", Name="report.pdf"))  # DICOM in clear is refused
    outer = MIMEMultipart("mixed")
    outer["From"] = '"Alpha, Radiology" <alpha@hub.test>'
    outer["To"] = "beta@hub.test, team: b2@hub.test;"
    outer["Subject"] = "nested"
    outer.attach(MIMEText("cover note\n"))
    outer.attach(alternative)
    outer.attach(MIMEMessage(inner))
    return outer.as_bytes().replace(b"\n", b"\r\n")


def send(hub, message: bytes) -> str:
    with smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30) as client:
        client.login("alpha", PASSWORD)
        assert client.mail("alpha@hub.test")[0] == 250
        assert client.rcpt("beta@hub.test")[0] == 250
        code, reply = client.data(message)
    return queue_id_from(b"%d %s" % (code, reply))


def stored(hub, qid: str) -> tuple[dict, bytes]:
    ((structure,),) = hub.query("SELECT structure FROM messages WHERE queue_id = ?", qid)
    return json.loads(structure), hub.stored(qid)


def test_pgp_mime_and_nested_structures_recorded_over_smtp(make_hub, armored):
    # the nested mail carries a PDF in the clear, which the encryption policy refuses (its own
    # tests are test_policy_*): here the structure record is under test, for any mail
    hub = make_hub(sites=ALPHA_BETA_B2, MAILHUB_ENCRYPTION_REQUIRED="false").start()
    qids = [send(hub, pgp_mime(armored)), send(hub, nested())]
    pgp, pgp_blob = stored(hub, qids[0])
    assert pgp_blob.startswith(b"Received: ") and pgp["hs"] == 0 and pgp["be"] == len(pgp_blob)
    assert (pgp["type"], pgp["subtype"]) == ("multipart", "encrypted")
    assert [(p["type"], p["subtype"]) for p in pgp["parts"]] == [
        ("application", "pgp-encrypted"),
        ("application", "octet-stream"),
    ]
    start, end = section_range(pgp, "2")
    assert pgp_blob[start:end] == armored
    start, end = section_range(pgp, "1")
    assert pgp_blob[start:end] == b"Version: 1\r\n"
    assert pgp["envelope"]["message-id"] == "<study-1@gw.alpha>"

    tree, tree_blob = stored(hub, qids[1])
    shape = [(p["type"], p["subtype"], len(p.get("parts", []))) for p in tree["parts"]]
    assert shape == [("text", "plain", 0), ("multipart", "alternative", 2), ("message", "rfc822", 0)]
    forwarded = tree["parts"][2]["message"]
    assert forwarded["envelope"]["subject"] == "forwarded study"
    start, end = section_range(tree, "3.2")
    assert base64.b64decode(tree_blob[start:end]) == b"%PDF" * 100

    dovecot = Dovecot([pgp_blob, tree_blob])  # the same files as Dovecot sees them
    try:
        for n, structure in enumerate((pgp, tree), 1):
            assert dovecot.fetch(n, "BODYSTRUCTURE") == parse_sexp(bodystructure(structure))[0]
            assert dovecot.fetch(n, "ENVELOPE") == parse_sexp(envelope(structure))[0]
    finally:
        dovecot.close()

    # and as the hub's IMAP server serves them
    client = imaplib.IMAP4("127.0.0.1", hub.ports["imap"], timeout=30)
    try:
        client.login("beta", PASSWORD)
        client.select("INBOX")
        for n, (structure, blob) in enumerate(((pgp, pgp_blob), (tree, tree_blob)), 1):
            typ, data = client.fetch(str(n), "(BODYSTRUCTURE)")
            assert typ == "OK"
            raw = b"".join(p[0] + b"\r\n" + p[1] if isinstance(p, tuple) else p for p in data)
            assert parse_sexp(raw)[1][1] == parse_sexp(bodystructure(structure))[0]
            typ, data = client.fetch(str(n), "(BODY.PEEK[2])")
            start, end = section_range(structure, "2")
            assert typ == "OK" and data[0][1] == blob[start:end]
    finally:
        client.logout()

    assert hub.stop() == 0
    assert asyncio.run(read_structures(hub, [qids[0], "NO-SUCH-QID"])) == [pgp, None]


async def read_structures(hub, qids: list[str]) -> list:
    storage = Storage(hub.data_dir, index_url=hub.index_url)
    await storage.open()
    try:
        return [await storage.message_structure(qid) for qid in qids]
    finally:
        await storage.close()


@pytest.mark.one_engine("about the serve process's memory, not the index")
def test_structure_of_a_200_mb_mail_recorded_in_bounded_memory(make_hub):
    hub = make_hub(sites=ALPHA_BETA, process=True)
    hub.start()
    pid = hub.proc.pid
    header = (
        b"From: alpha@hub.test\r\nTo: beta@hub.test\r\nSubject: one big part\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    )
    chunk = _base64_chunk()
    mail_mb = 200
    client = RawSMTP(hub.smtp_port, timeout=120)
    client.ehlo()
    assert client.auth_plain("alpha").startswith(b"235")
    assert client.command("MAIL FROM:<alpha@hub.test>").startswith(b"250")
    assert client.command("RCPT TO:<beta@hub.test>").startswith(b"250")
    assert client.command("DATA").startswith(b"354")
    client.send(header)
    for _ in range(mail_mb):
        client.send(chunk)
    client.send(b".\r\n")
    qid = queue_id_from(client.reply())
    client.close()
    peak = _status_kb(pid, "VmHWM") * 1024
    assert peak < 100 * MB, f"hub peak RSS {peak / MB:.1f} MiB"

    ((structure, size),) = hub.query("SELECT structure, size FROM messages WHERE queue_id = ?", qid)
    structure = json.loads(structure)
    trace = size - len(header) - mail_mb * MB
    assert (structure["type"], structure["subtype"]) == ("text", "plain")
    assert (structure["hs"], structure["bs"], structure["be"]) == (0, trace + len(header), size)
    assert structure["lines"] == mail_mb * chunk.count(b"\n")
    assert len(json.dumps(structure)) < 1000
    blob = hub.blob_files()[0]
    assert hub.stop() == 0
    blob.unlink()  # pytest keeps the last runs' temp folders


def test_older_index_gets_the_structure_column(tmp_path):
    conn = sqlite3.connect(tmp_path / db.INDEX_NAME)
    conn.execute(
        "CREATE TABLE messages (queue_id TEXT PRIMARY KEY, blob TEXT NOT NULL, size INTEGER NOT NULL,"
        " sha256 TEXT NOT NULL, dot_lines INTEGER NOT NULL, received_at REAL NOT NULL,"
        " mail_from TEXT NOT NULL, sender_site INTEGER, message_id TEXT, set_id TEXT,"
        " set_part INTEGER, set_total INTEGER, refs INTEGER NOT NULL) WITHOUT ROWID"
    )
    conn.close()
    conn = db.connect(tmp_path)
    assert "structure" in {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
    conn.close()


class ExplodingListener:
    """A listener with a bug."""

    def part_start(self, part) -> None:
        if part.path == "2":
            raise ValueError("listener bug")

    def part_body(self, part, data) -> None:
        pass

    def part_end(self, part) -> None:
        pass


class ExplodingRecorder(StructureRecorder):
    """The structure recorder with a bug: what it built up to the failure must not be stored."""

    def part_start(self, part) -> None:
        ExplodingListener.part_start(self, part)
        super().part_start(part)


def test_a_failing_parse_costs_the_structure_not_the_mail_unless_a_check_needed_it(
    tmp_path, caplog, armored, monkeypatch
):
    async def ingest(message: bytes, listeners) -> tuple:
        storage = Storage(tmp_path)
        await storage.open()
        try:
            incoming = IncomingMessage(
                storage,
                10 * MB,
                lambda qid: b"Received: by hub.test id %s\r\n" % qid.encode(),
                "552 too big",
                listeners=listeners,
            )
            for i in range(0, len(message), 1000):
                incoming.write(message[i : i + 1000])
            incoming.end_of_data()
            if incoming.failed:
                return incoming.queue_id, incoming.error.reply
            await storage.commit(incoming.spool, incoming.meta("alpha@hub.test", None, False, None), [])
            return incoming.queue_id, await storage.message_structure(incoming.queue_id)
        finally:
            await storage.close()

    mail = pgp_mime(armored)
    qid, structure = asyncio.run(ingest(mail, []))
    assert structure["parts"][1]["be"] - structure["parts"][1]["bs"] == len(armored)
    # a listener that must see the whole mail (the encryption policy) did not: refused, not stored
    qid, reply = asyncio.run(ingest(mail, [ExplodingListener()]))
    assert reply.startswith("451 4.3.0") and f"qid={qid}: MIME parsing stopped" in caplog.text
    assert not list((tmp_path / "spool").iterdir())
    # only the structure recorder failed: the mail is stored, without its structure
    monkeypatch.setattr(ingest_module, "StructureRecorder", ExplodingRecorder)
    qid, structure = asyncio.run(ingest(mail, []))
    assert structure is None
    assert stored_message(tmp_path, qid).endswith(mail)
