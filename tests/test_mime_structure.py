# The recorded MIME structure and its IMAP renderings, checked against Dovecot: the same messages
# (built with Python's email package, behind a Received: trace header as the hub stores them) go
# into a maildir that Dovecot's imap serves (pre-authenticated, over a pipe, with imaplib), and
# BODYSTRUCTURE, BODY, ENVELOPE and every body section must come out byte for byte the same.
import imaplib
import json
import os
import shlex
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_mime_stream import messages, serialize

from relay.mime.stream import MimeStreamParser
from relay.mime.structure import StructureRecorder, bodystructure, envelope, parse_address_list, section_range

DOVECOT_IMAP = "/usr/lib/dovecot/imap"  # Debian dovecot-imapd (bench/debian-packages.txt)
TRACE = b"Received: from gw.test by hub.test with ESMTPA id 0123456789ABCDEF; Sat, 28 Nov 2026 04:00:00 +0000\r\n"

ADDRESSES = [
    "a@b.example",
    '"Doe, John" <john@x.example>',
    "John Q. Public <jqp@example.com>",
    "bare@x.org (Bare Name)",
    "undisclosed-recipients:;",
    "grp: a@b, c@d;",
    "a@b, c@d",
    "<@r1.example,@r2.example:user@host.example>",
    "=?utf-8?q?J=C3=B6rg?= <j@x.example>",
    "nodomain",
    '"quoted local"@x.example',
    "Name <a@[127.0.0.1]>",
    "Mixed (comment) <m@x.example>",
]


def structure_of(blob: bytes) -> dict:
    recorder = StructureRecorder()
    parser = MimeStreamParser(recorder)
    parser.feed(blob)
    parser.close()
    return json.loads(json.dumps(recorder.structure))  # as stored in the index


class Dovecot:
    """Dovecot's imap binary serving one maildir, pre-authenticated over a pipe."""

    def __init__(self, blobs: list[bytes]):
        # its own folder under /tmp: pytest's are private to root, and Dovecot runs as nobody
        self.root = root = Path(tempfile.mkdtemp(prefix="mailhub-dovecot-"))
        maildir = root / "Maildir"
        for sub in ("cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True)
        for n, blob in enumerate(blobs, 1):
            (maildir / "cur" / f"{1000 + n}.M{n}P1.hub:2,").write_bytes(blob)
        (root / "dovecot.conf").write_text(
            f"log_path = {root}/dovecot.log\ninfo_log_path = {root}/dovecot.log\n"
            f"mail_location = maildir:{maildir}\nssl = no\n"
        )
        user = "nobody" if os.geteuid() == 0 else os.environ.get("USER", "user")
        if os.geteuid() == 0:  # Dovecot will not serve mail as root
            shutil.chown(root, "nobody")
            for path in root.rglob("*"):
                shutil.chown(path, "nobody")
        command = (
            f"env -i USER={user} HOME={shlex.quote(str(root))} MAIL=maildir:{shlex.quote(str(maildir))}"
            f" {DOVECOT_IMAP} -c {shlex.quote(str(root / 'dovecot.conf'))}"
        )
        if os.geteuid() == 0:
            command = "runuser -u nobody -- " + command
        self.imap = imaplib.IMAP4_stream(command)
        typ, _ = self.imap.select("INBOX")
        assert typ == "OK"

    def fetch(self, n: int, item: str):
        """The value of one fetch item, parsed (see parse_sexp)."""
        typ, data = self.imap.fetch(str(n), f"({item})")
        assert typ == "OK", data
        raw = b"".join(piece[0] + b"\r\n" + piece[1] if isinstance(piece, tuple) else piece for piece in data)
        number, response = parse_sexp(raw)
        assert number == str(n).encode() and len(response) == 2, raw
        return response[1]

    def close(self) -> None:
        try:
            self.imap.logout()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def parse_sexp(data: bytes):
    """IMAP response data as Python values: lists, bytes (atoms and strings alike), None (NIL).
    Quoted strings and literals give the same value, so the two spellings compare equal."""
    pos = 0

    def value():
        nonlocal pos
        while data[pos : pos + 1] == b" ":
            pos += 1
        ch = data[pos : pos + 1]
        if ch == b"(":
            pos += 1
            items = []
            while data[pos : pos + 1] != b")":
                items.append(value())
                while data[pos : pos + 1] == b" ":
                    pos += 1
            pos += 1
            return items
        if ch == b'"':
            out = bytearray()
            pos += 1
            while data[pos : pos + 1] != b'"':
                if data[pos : pos + 1] == b"\\":
                    pos += 1
                out += data[pos : pos + 1]
                pos += 1
            pos += 1
            return bytes(out)
        if ch == b"{":
            close = data.index(b"}\r\n", pos)
            length = int(data[pos + 1 : close])
            pos = close + 3 + length
            return data[close + 3 : pos]
        start = pos
        while pos < len(data) and data[pos : pos + 1] not in (b" ", b"(", b")"):
            pos += 1
        atom = data[start:pos]
        return None if atom == b"NIL" else atom

    items = []
    while pos < len(data):
        items.append(value())
    return items


def numbered_paths(part: dict, path: str = "") -> list[str]:
    """Every IMAP part number of a message record."""
    paths = []
    if "parts" in part:
        for n, child in enumerate(part["parts"], 1):
            child_path = f"{path}.{n}" if path else str(n)
            paths.append(child_path)
            paths += numbered_paths(child, child_path) if "parts" in child else []
            if "message" in child:
                paths += [child_path + ".HEADER", child_path + ".TEXT"]
                paths += numbered_paths(child["message"], child_path)
    else:
        body_path = f"{path}.1" if path else "1"
        paths.append(body_path)
    return paths


@st.composite
def stored_messages(draw) -> bytes:
    msg = draw(messages)
    for name in ("From", "To", "Cc", "Reply-To", "Sender"):
        if draw(st.booleans()):
            msg[name] = draw(st.sampled_from(ADDRESSES))
    msg["Subject"] = draw(st.sampled_from(['He said "hi" \\ ok', "plain", "=?utf-8?b?w5xiZXI=?="]))
    if draw(st.booleans()):
        msg["Date"] = "Sat, 28 Nov 2026 04:00:00 +0000"
        msg["Message-ID"] = "<study-1.2.840@gw.test>"
        msg["In-Reply-To"] = "<earlier@gw.test>"
    return TRACE + serialize(msg)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(blobs=st.lists(stored_messages(), min_size=1, max_size=10))
def test_renderings_equal_dovecot(blobs):
    dovecot = Dovecot(blobs)
    try:
        for n, blob in enumerate(blobs, 1):
            structure = structure_of(blob)
            assert dovecot.fetch(n, "BODYSTRUCTURE") == parse_sexp(bodystructure(structure))[0]
            assert dovecot.fetch(n, "BODY") == parse_sexp(bodystructure(structure, extensible=False))[0]
            assert dovecot.fetch(n, "ENVELOPE") == parse_sexp(envelope(structure))[0]
            for section in numbered_paths(structure) + ["HEADER", "TEXT"]:
                start, end = section_range(structure, section)
                assert dovecot.fetch(n, f"BODY.PEEK[{section}]") == blob[start:end], section
                if section[0].isdigit() and section[-1].isdigit():
                    start, end = section_range(structure, section + ".MIME")
                    assert dovecot.fetch(n, f"BODY.PEEK[{section}.MIME]") == blob[start:end], section
    finally:
        dovecot.close()


FIXED = [
    # groups, a phrase with a dot, a comment as name, a missing domain, a multipart without parts
    b'From: "John Q. Public" <jqp@example.com>, bare@x.org (Bare Name), nodomain\r\n'
    b"To: undisclosed-recipients:;, grp: a@b, c@d;\r\nSubject: hi\r\n"
    b"Content-Type: multipart/mixed; boundary=q\r\n\r\n--q\r\n\r\nl1\r\nl2\r\n--q\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n\r\nl1\r\nl2\r\n\r\n--q\r\nContent-Type: message/rfc822\r\n\r\n"
    b"Subject: inner\r\n\r\nx\r\n--q\r\nContent-Type: multipart/mixed; boundary=z\r\n\r\nnothing\r\n--q--\r\n",
    # every extension field of a body part
    b'From: a@b.example\r\nContent-Type: multipart/mixed; boundary="=_x"; type=abc\r\n'
    b"Content-Disposition: inline\r\nContent-Language: en\r\nContent-Location: http://hub.test/m\r\n\r\n"
    b'--=_x\r\nContent-Type: application/dicom; Name="x.dcm"; CharSet=binary\r\nContent-ID: <img1@gw.test>\r\n'
    b"Content-Description: CT slice 1\r\nContent-Transfer-Encoding: base64\r\n"
    b'Content-Disposition: Attachment; FileName="x.dcm"; size=3\r\nContent-Language: en, de\r\n'
    b"Content-Location: slice1.dcm\r\nContent-MD5: Q2hlY2sgSW50ZWdyaXR5IQ==\r\n\r\nAAAA\r\n--=_x--\r\n",
    # a message/rfc822 top level around a multipart; a multipart/digest with default types
    b"Subject: forwarded\r\nContent-Type: message/rfc822\r\n\r\nFrom: x@y.example\r\nSubject: inner\r\n"
    b"Content-Type: multipart/digest; boundary=d\r\n\r\n--d\r\n\r\nSubject: one\r\n\r\nbody one\r\n"
    b"--d\r\nContent-Type: text/plain\r\n\r\nplain\r\n--d--\r\n",
    # PGP/MIME as the gateways send it
    b"From: alpha@hub.test\r\nTo: beta@hub.test\r\nSubject: study\r\nMessage-ID: <s1@gw.test>\r\n"
    b'MIME-Version: 1.0\r\nContent-Type: multipart/encrypted; protocol="application/pgp-encrypted";\r\n'
    b' boundary="----enc=_1"\r\n\r\nThis is an OpenPGP/MIME encrypted message\r\n'
    b"------enc=_1\r\nContent-Type: application/pgp-encrypted\r\nContent-Description: PGP/MIME version\r\n\r\n"
    b'Version: 1\r\n\r\n------enc=_1\r\nContent-Type: application/octet-stream; name="encrypted.asc"\r\n\r\n'
    b"-----BEGIN PGP MESSAGE-----\r\n\r\nhQEMA0xyz\r\n-----END PGP MESSAGE-----\r\n\r\n------enc=_1--\r\n",
    # unterminated multipart, raw 8-bit and odd header values (an invalid Content-Type is left
    # out: RFC 2045 makes it text/plain, Dovecot keeps the type and an empty subtype)
    'Subject: Befund für Müller\r\nFrom: \r\nReply-To: "Dr. X" <x@y.example>\r\nDate: today\r\n'
    "Content-Type: multipart/alternative; boundary=u\r\n\r\n--u\r\nContent-Type: text/plain; charset=utf-8\r\n"
    "\r\nä\r\n".encode(),
    # no empty line after the header, no body at all (a line that is no header field starts the
    # body here, as in Python's email package; Dovecot counts it to the header: left out)
    b"Subject: header only\r\nFrom: a@b.example",
]


def test_fixed_messages_equal_dovecot():
    blobs = [TRACE + message for message in FIXED]
    dovecot = Dovecot(blobs)
    try:
        for n, blob in enumerate(blobs, 1):
            structure = structure_of(blob)
            assert dovecot.fetch(n, "BODYSTRUCTURE") == parse_sexp(bodystructure(structure))[0], n
            assert dovecot.fetch(n, "ENVELOPE") == parse_sexp(envelope(structure))[0], n
            for section in numbered_paths(structure):
                start, end = section_range(structure, section)
                assert dovecot.fetch(n, f"BODY.PEEK[{section}]") == blob[start:end], (n, section)
    finally:
        dovecot.close()


def test_section_range_refuses_what_the_message_does_not_have():
    structure = structure_of(TRACE + FIXED[0])
    for section in ("5", "1.1", "1.HEADER", "0", "1.2.3", "X", "HEADER.MIME", "MIME", "2.TEXT.1", "1..2"):
        assert section_range(structure, section) is None, section
    assert section_range(structure, "3.1") == section_range(structure, "3.TEXT")
    assert section_range(structure, "") == (0, len(TRACE + FIXED[0]))


def test_structure_is_compact_json_without_body_bytes():
    blob = TRACE + FIXED[3]
    text = json.dumps(structure_of(blob), separators=(",", ":"))
    assert len(text) < 1200 and "hQEMA0xyz" not in text and "Version: 1" not in text


def test_renderings_of_odd_values():
    structure = structure_of(b'Subject: \xc3\xa4 "q"\r\nFrom: ,\r\nContent-Type: text\r\n\r\nx')
    assert envelope(structure).startswith(b'(NIL {6}\r\n\xc3\xa4 "q" NIL NIL NIL NIL')
    assert bodystructure(structure) == b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 1 0 NIL NIL NIL NIL)'
    assert parse_address_list('"A \\"B\\"" <a@b>, (only comment) c@d, <@x,@y:z@w>, e@') == [
        ('A "B"', None, "a", "b"),
        ("only comment", None, "c", "d"),
        (None, "@x,@y", "z", "w"),
        (None, None, "e", "MISSING_DOMAIN"),
    ]
