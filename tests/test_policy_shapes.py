# The encryption policy as a pure function of a mail's bytes: a table of mail shapes (allowed, or
# refused with a reason code and a reply) that every change must keep, each fed whole and in
# 7-byte pieces; and property tests that wrap a clear DICOM file in random legal MIME (types,
# names, transfer encodings written in every legal and lenient way, nesting in multiparts, reports,
# signed parts, encapsulated and encoded messages, archives) and assert it is never allowed, and
# that random harmless wrappings of a right PGP/MIME message are always allowed.
import base64
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from directory.policy import RecipientKeys
from relay.mime import stream as mime_stream
from relay.mime.stream import MimeStreamParser
from relay.policy.encryption import EncryptionPolicy

from mailshapes import (
    CRLF,
    KEY,
    OTHER_KEY,
    armored,
    b64,
    dicom_attachment,
    dicom_file,
    dicom_json,
    dicom_raw,
    dicom_xml,
    gzipped,
    key_block,
    literal_packet,
    mail,
    multipart,
    openpgp,
    part,
    pgp_mime,
    signature_block,
    tarred,
    text,
    zipped,
)

BETA = [RecipientKeys("beta", {KEY: "current key"})]
PGP = armored(openpgp())


def verdict(message: bytes, recipients=BETA, piece: int = 1 << 20, allow_hidden: bool = False):
    """(reason, reply) of a refusal, or None when the mail is allowed."""
    policy = EncryptionPolicy(recipients, allow_hidden)
    parser = MimeStreamParser(policy)
    for i in range(0, len(message), piece):
        parser.feed(message[i : i + piece])
    parser.close()
    return None if policy.reply is None else (policy.reason, policy.reply)


def report(report_type: bytes, fields: bytes, returned: bytes, boundary: bytes = b"rep") -> bytes:
    return multipart(
        b"report",
        [text(b"The message could not be delivered.\r\n"), part(b"message/" + report_type, fields), returned],
        boundary,
        b"; report-type=" + report_type,
    )


DSN_FIELDS = (
    b"Reporting-MTA: dns; hub.test\r\nArrival-Date: Sat, 5 Dec 2026 10:00:00 +0000\r\n\r\n"
    b"Final-Recipient: rfc822; beta@remote.test\r\nAction: failed\r\nStatus: 5.1.1\r\n"
    b"Diagnostic-Code: smtp; 550 5.1.1 no such user\r\n"
)
MDN_FIELDS = (
    b"Reporting-UA: gateway.beta; DICOM gateway 3.1\r\nFinal-Recipient: rfc822; beta@hub.test\r\n"
    b"Original-Message-ID: <study-1@alpha>\r\nDisposition: automatic-action/MDN-sent-automatically; processed\r\n"
)
ORIGINAL_HEADER = part(b"text/rfc822-headers", b"From: alpha@hub.test\r\nTo: beta@remote.test\r\nSubject: study\r\n")


def nest(depth: int, leaf: bytes) -> bytes:
    for level in range(depth):
        leaf = multipart(b"mixed", [leaf], b"n%03d" % level)
    return leaf


def partial(number: int, body: bytes, extra: bytes = b"", total: int = 2) -> bytes:
    return part(b'message/partial; id="frag-1@alpha"; number=%d; total=%d' % (number, total), body, None, extra)


_FRAGMENTED = pgp_mime(armored(openpgp(size=6000)))
_CUT = _FRAGMENTED.index(b"-----BEGIN PGP MESSAGE-----") + 600
FRAGMENT_1 = _FRAGMENTED[:_CUT]
FRAGMENT_2 = _FRAGMENTED[_CUT:]


def odd_base64(data: bytes) -> bytes:
    """base64 as odd gateways write it: short and long lines, blank lines, blanks, tabs."""
    text = base64.b64encode(data)
    out, pos, widths = [], 0, [10, 76, 3, 60, 200]
    while pos < len(text):
        width = widths[len(out) % len(widths)]
        out.append(text[pos : pos + width])
        pos += width
    return b"\r\n \r\n\t".join(b" ".join(line[i : i + 7] for i in range(0, len(line), 7)) for line in out) + CRLF


def junk_base64(data: bytes) -> bytes:
    text = base64.b64encode(data)
    return b"\r\n".join(b"*" + text[i : i + 60] + b"#" for i in range(0, len(text), 60)) + CRLF


def qp(data: bytes) -> bytes:
    import binascii

    return binascii.b2a_qp(data, quotetabs=True, istext=False).replace(b"\n", CRLF)


def uuencoded(data: bytes, name: bytes = b"img.dcm") -> bytes:
    import binascii

    lines = [binascii.b2a_uu(data[i : i + 45]).rstrip(b"\n") for i in range(0, len(data), 45)]
    return b"begin 644 " + name + CRLF + CRLF.join(lines) + b"\r\n`\r\nend\r\n"


def uuencoded_base64(data: bytes, name: bytes = b"img.dcm") -> bytes:
    """What `uuencode -m` writes: a "begin-base64" line, base64 lines, "====" as the end."""
    encoded = base64.b64encode(data)
    lines = [encoded[i : i + 60] for i in range(0, len(encoded), 60)]
    return b"begin-base64 644 " + name + CRLF + CRLF.join(lines) + b"\r\n====\r\n"


DICOM = dicom_file()
# random payloads of shapes that must not depend on chance: a DER SEQUENCE starts every S/MIME
# (CMS) structure, and a first byte without bit 7 is no OpenPGP packet header (random bytes that
# start like one are refused as a malformed OpenPGP message instead, another reason)
DER = b"\x30\x82\x03\x80"
ALLOWED = None
SHAPES = [
    # ---- allowed: text ---------------------------------------------------------------------------
    ("plain text, no MIME", b"From: a@hub.test\r\nSubject: hi\r\n\r\nplain text is fine\r\n", ALLOWED),
    ("empty body", b"From: a@hub.test\r\nSubject: nothing\r\n\r\n", ALLOWED),
    ("header only, no empty line", b"From: a@hub.test\r\nSubject: nothing", ALLOWED),
    (
        "text/plain utf-8 8bit",
        mail(part(b"text/plain; charset=utf-8", "Grüße, Befund anbei\r\n".encode(), b"8bit")),
        ALLOWED,
    ),
    (
        "text/plain quoted-printable",
        mail(part(b"text/plain; charset=utf-8", b"Gr=C3=BC=C3=9Fe=\r\n end\r\n", b"quoted-printable")),
        ALLOWED,
    ),
    ("text/plain base64", mail(part(b"text/plain", b64(b"a report\r\n" * 40), b"base64")), ALLOWED),
    ("text/plain BASE64 upper case", mail(part(b"text/plain", b64(b"a report\r\n"), b"BASE64")), ALLOWED),
    ("text/html", mail(text(b"<html><body><p>Befund</p></body></html>\r\n", b"html")), ALLOWED),
    (
        "multipart/alternative text + html",
        mail(multipart(b"alternative", [text(), text(b"<p>x</p>", b"html")])),
        ALLOWED,
    ),
    ("text/calendar", mail(part(b"text/calendar", b"BEGIN:VCALENDAR\r\nEND:VCALENDAR\r\n")), ALLOWED),
    ("application/json text", mail(part(b"application/json", b'{"sites": ["alpha", "beta"]}\r\n')), ALLOWED),
    (
        "preamble and epilogue text",
        mail(multipart(b"mixed", [text()], preamble=b"This is a multi-part message.\r\n", epilogue=b"bye\r\n")),
        ALLOWED,
    ),
    ("Content-Type with comments", mail(part(b"text/plain (a comment); charset=us-ascii", b"x\r\n")), ALLOWED),
    ("text part with inline PGP message", mail(text(PGP)), ALLOWED),
    (
        "text attachment named by RFC 2231",
        mail(
            multipart(
                b"mixed",
                [
                    text(),
                    part(
                        b"text/plain",
                        b"notes\r\n",
                        None,
                        b"Content-Disposition: attachment; filename*=utf-8''Befund%202026.txt\r\n",
                    ),
                ],
            )
        ),
        ALLOWED,
    ),
    (
        "text attachment named by encoded word",
        mail(multipart(b"mixed", [part(b'text/plain; name="=?utf-8?q?Befund_=C3=BC.txt?="', b"notes\r\n")])),
        ALLOWED,
    ),
    (
        "multipart/digest of text messages",
        mail(multipart(b"digest", [b"\r\nSubject: one\r\n\r\nfirst\r\n", b"\r\nSubject: two\r\n\r\nsecond\r\n"])),
        ALLOWED,
    ),
    ("LF-only text mail", b"From: a@hub.test\nSubject: lf\nContent-Type: text/plain\n\nline\n", ALLOWED),
    # ---- allowed: PGP/MIME -------------------------------------------------------------------------
    ("PGP/MIME armored", mail(pgp_mime()), ALLOWED),
    ("PGP/MIME partial-length chunks", mail(pgp_mime(armored(openpgp(size=9000, partial=True)))), ALLOWED),
    (
        "PGP/MIME armor headers, no CRC",
        mail(pgp_mime(armored(openpgp(), b"Version: GnuPG v2\r\nComment: x", crc=False))),
        ALLOWED,
    ),
    ("PGP/MIME armor 76-wide lines, LF only", mail(pgp_mime(armored(openpgp(), width=76, eol=b"\n"))), ALLOWED),
    ("PGP/MIME binary in base64", mail(pgp_mime(b64(openpgp()), b"base64")), ALLOWED),
    ("PGP/MIME binary in odd base64", mail(pgp_mime(odd_base64(openpgp()), b"base64")), ALLOWED),
    ("PGP/MIME binary, binary transfer", mail(pgp_mime(openpgp(), b"binary")), ALLOWED),
    ("PGP/MIME armored in quoted-printable", mail(pgp_mime(qp(PGP), b"quoted-printable")), ALLOWED),
    ("PGP/MIME armored in base64", mail(pgp_mime(b64(PGP), b"base64")), ALLOWED),
    ("PGP/MIME marker packet first", mail(pgp_mime(armored(openpgp(marker=True)))), ALLOWED),
    ("PGP/MIME two recipients", mail(pgp_mime(armored(openpgp((OTHER_KEY, KEY))))), ALLOWED),
    ("PGP/MIME key and passphrase", mail(pgp_mime(armored(openpgp(passphrase=True)))), ALLOWED),
    ("PGP/MIME v6 session key packet", mail(pgp_mime(armored(openpgp(v6=True)))), ALLOWED),
    (
        "PGP/MIME RFC 2231 boundary",
        mail(pgp_mime(boundary=b"enc").replace(b'boundary="enc"', b'boundary*0="e"; boundary*1="nc"')),
        ALLOWED,
    ),
    ("PGP/MIME with a cover note", mail(multipart(b"mixed", [text(), pgp_mime()])), ALLOWED),
    (
        "PGP/MIME signed outside",
        mail(
            multipart(
                b"signed",
                [pgp_mime(), part(b"application/pgp-signature", signature_block())],
                b"s",
                b'; protocol="application/pgp-signature"; micalg=pgp-sha256',
            )
        ),
        ALLOWED,
    ),
    (
        "encrypted file attached (armored)",
        mail(multipart(b"mixed", [text(), part(b'application/octet-stream; name="study.asc"', PGP)])),
        ALLOWED,
    ),
    (
        "encrypted file attached (binary, base64)",
        mail(
            multipart(
                b"mixed", [part(b'application/pgp-encrypted; name="study.gpg"', b64(openpgp(partial=True)), b"base64")]
            )
        ),
        ALLOWED,
    ),
    (
        "large encrypted file attached (armored, 300 KB)",
        mail(
            multipart(
                b"mixed",
                [
                    text(),
                    part(b'application/octet-stream; name="study.asc"', armored(openpgp(size=300_000, partial=True))),
                ],
            )
        ),
        ALLOWED,
    ),
    (
        "large encrypted file attached (binary, base64, 300 KB)",
        mail(
            multipart(
                b"mixed", [part(b'application/pgp-encrypted; name="study.gpg"', b64(openpgp(size=300_000)), b"base64")]
            )
        ),
        ALLOWED,
    ),
    ("old-style application/pgp", mail(part(b"application/pgp; format=text; x-action=encrypt", PGP)), ALLOWED),
    (
        "forwarded PGP/MIME (message/rfc822)",
        mail(multipart(b"mixed", [text(), part(b"message/rfc822", mail(pgp_mime()))])),
        ALLOWED,
    ),
    ("message/global with PGP/MIME", mail(part(b"message/global", mail(pgp_mime()))), ALLOWED),
    ("message/global base64 with PGP/MIME", mail(part(b"message/global", b64(mail(pgp_mime())), b"base64")), ALLOWED),
    ("message/news with PGP/MIME", mail(part(b"message/news", mail(pgp_mime()))), ALLOWED),
    (
        "signed text, armored signature",
        mail(
            multipart(
                b"signed",
                [text(), part(b"application/pgp-signature", signature_block())],
                b"s",
                b'; protocol="application/pgp-signature"',
            )
        ),
        ALLOWED,
    ),
    ("public key attached", mail(multipart(b"mixed", [text(), part(b"application/pgp-keys", key_block())])), ALLOWED),
    ("first fragment of PGP/MIME", mail(partial(1, mail(FRAGMENT_1))), ALLOWED),
    ("later fragment of PGP/MIME", mail(partial(2, FRAGMENT_2)), ALLOWED),
    # ---- allowed: reports --------------------------------------------------------------------------
    ("DSN with headers returned", mail(report(b"delivery-status", DSN_FIELDS, ORIGINAL_HEADER)), ALLOWED),
    (
        "DSN with the PGP/MIME original (another key)",
        mail(
            report(
                b"delivery-status", DSN_FIELDS, part(b"message/rfc822", mail(pgp_mime(armored(openpgp((OTHER_KEY,))))))
            )
        ),
        ALLOWED,
    ),
    (
        "DSN, global form",
        mail(report(b"global-delivery-status", DSN_FIELDS, part(b"message/global-headers", b"Subject: x\r\n"))),
        ALLOWED,
    ),
    ("MDN, processed", mail(report(b"disposition-notification", MDN_FIELDS, ORIGINAL_HEADER)), ALLOWED),
    (
        "MDN with the PGP/MIME original",
        mail(report(b"disposition-notification", MDN_FIELDS, part(b"message/rfc822", mail(pgp_mime())))),
        ALLOWED,
    ),
    (
        "MDN without returned content",
        mail(
            multipart(
                b"report",
                [text(b"Displayed.\r\n"), part(b"message/disposition-notification", MDN_FIELDS)],
                b"r",
                b"; report-type=disposition-notification",
            )
        ),
        ALLOWED,
    ),
    (
        "DSN from the null sender header",
        mail(
            report(b"delivery-status", DSN_FIELDS, ORIGINAL_HEADER),
            b"From: MAILER-DAEMON@hub.test\r\nMIME-Version: 1.0\r\n",
        ),
        ALLOWED,
    ),
    # ---- refused: DICOM in the clear ---------------------------------------------------------------
    (
        "application/dicom base64",
        mail(multipart(b"mixed", [text(), dicom_attachment()])),
        ("cleartext_dicom", "part 2"),
    ),
    (
        "application/dicom binary",
        mail(part(b"application/dicom", DICOM, b"binary")),
        ("cleartext_dicom", "type application/dicom"),
    ),
    ("image/dicom", mail(part(b"image/dicom", b64(DICOM), b"base64")), ("cleartext_dicom", "image/dicom")),
    (
        "octet-stream with DICM",
        mail(dicom_attachment(b"application/octet-stream", name=b"file.bin")),
        ("cleartext_dicom", "DICM file signature"),
    ),
    (
        "octet-stream binary DICM",
        mail(part(b"application/octet-stream", DICOM, b"binary")),
        ("cleartext_dicom", "DICM"),
    ),
    (
        "image/jpeg named img.dcm",
        mail(dicom_attachment(b"image/jpeg", b"\xff\xd8\xff" + os.urandom(300))),
        ("cleartext_dicom", "file name img.dcm"),
    ),
    (
        "name by RFC 2231 encoding",
        mail(
            part(
                b"application/octet-stream",
                b64(os.urandom(300)),
                b"base64",
                b"Content-Disposition: attachment; filename*=utf-8''CT%2E1%2Edcm\r\n",
            )
        ),
        ("cleartext_dicom", "CT.1.dcm"),
    ),
    (
        "name by RFC 2231 continuation",
        mail(part(b'application/octet-stream; name*0="CT"; name*1=".DCM"', b64(os.urandom(300)), b"base64")),
        ("cleartext_dicom", "CT.DCM"),
    ),
    (
        "name by encoded word",
        mail(part(b'application/octet-stream; name="=?utf-8?B?aW1nLmRjbQ==?="', b64(os.urandom(300)), b"base64")),
        ("cleartext_dicom", "img.dcm"),
    ),
    (
        "DICOMDIR by name",
        mail(part(b'application/octet-stream; name="DICOMDIR"', b64(os.urandom(300)), b"base64")),
        ("cleartext_dicom", "DICOMDIR"),
    ),
    (
        "raw data set, no preamble",
        mail(part(b"application/octet-stream", b64(dicom_raw()), b"base64")),
        ("cleartext_dicom", "without preamble"),
    ),
    (
        "meta group without preamble",
        mail(part(b"application/octet-stream", b64(DICOM[128:]), b"base64")),
        ("cleartext_dicom", "DICM signature without preamble"),
    ),
    ("DICOM JSON model", mail(part(b"application/json", dicom_json())), ("cleartext_dicom", "DICOM JSON")),
    ("DICOM XML model", mail(part(b"text/xml", dicom_xml())), ("cleartext_dicom", "DICOM XML")),
    ("DICOM as text/plain binary", mail(part(b"text/plain", DICOM, b"8bit")), ("cleartext_dicom", "DICM")),
    ("DICOM as text/plain base64", mail(part(b"text/plain", b64(DICOM), b"base64")), ("cleartext_dicom", "DICM")),
    (
        "DICOM base64 text without encoding",
        mail(part(b"text/plain", b64(DICOM))),
        ("cleartext_dicom", "as base64 text"),
    ),
    (
        "DICOM in odd base64",
        mail(part(b"application/octet-stream", odd_base64(DICOM), b"base64")),
        ("cleartext_dicom", "DICM"),
    ),
    (
        "DICOM in base64 with junk",
        mail(part(b"application/octet-stream", junk_base64(DICOM), b"base64")),
        ("cleartext_dicom", "DICM"),
    ),
    (
        "DICOM after early padding",
        mail(part(b"application/octet-stream", b"QQ==\r\n" + b64(DICOM), b"base64")),
        ("cleartext_data", "application/octet-stream"),
    ),
    (
        "DICOM in quoted-printable",
        mail(part(b"application/octet-stream", qp(DICOM), b"quoted-printable")),
        ("cleartext_dicom", "DICM"),
    ),
    (
        "DICOM x-uuencode",
        mail(part(b"application/octet-stream", uuencoded(DICOM), b"x-uuencode")),
        ("cleartext_dicom", "DICM"),
    ),
    (
        "DICOM uuencode",
        mail(part(b"application/octet-stream", uuencoded(DICOM, b"a.bin"), b"uuencode")),
        ("cleartext_dicom", "DICM"),
    ),
    (
        "uuencoded DICOM in a text body",
        mail(text(b"see below\r\n\r\n" + uuencoded(DICOM))),
        ("cleartext_dicom", "img.dcm"),
    ),
    (
        "uuencoded file in a text body",
        mail(text(b"see below\r\n" + uuencoded(b"x" * 300, b"a.bin"))),
        ("cleartext_data", "uuencoded file"),
    ),
    (
        "raw DICOM labelled x-uuencode (no begin line: readers show the raw bytes)",
        mail(part(b"application/octet-stream", DICOM, b"x-uuencode")),
        ("ambiguous", "x-uuencode without a 'begin' line"),
    ),
    (
        "uuencoded lines without a begin line in a text part",
        mail(part(b"text/plain", uuencoded(DICOM).split(CRLF, 1)[1], b"x-uuencode")),
        ("ambiguous", "cannot decode"),
    ),
    (
        "a uuencoded line too long",
        mail(part(b"application/octet-stream", b"M" * 100_000 + CRLF, b"uuencode")),
        ("ambiguous", "uuencoded line longer than"),
    ),
    (
        "begin-base64 DICOM in a text body",
        mail(text(b"see below\r\n\r\n" + uuencoded_base64(DICOM))),
        ("cleartext_dicom", "img.dcm"),
    ),
    (
        "begin-base64 file in a text body",
        mail(text(b"see below\r\n" + uuencoded_base64(b"x" * 300, b"a.bin"))),
        ("cleartext_data", "uuencoded file"),
    ),
    (
        "yEnc in a text body",
        mail(text(b"x\r\n=ybegin line=128 size=300 name=a.bin\r\nabc\r\n")),
        ("cleartext_data", "yEnc"),
    ),
    (
        "DICOM in a data: URI",
        mail(text(b'<img src="data:application/dicom;base64,' + base64.b64encode(DICOM) + b'">', b"html")),
        ("cleartext_dicom", "data: URI"),
    ),
    (
        "zip with img.dcm (stored)",
        mail(part(b"application/zip", b64(zipped("img.dcm", DICOM, False)), b"base64")),
        ("cleartext_dicom", "img.dcm in a zip archive"),
    ),
    (
        "zip deflated, DICM content",
        mail(part(b"application/octet-stream", b64(zipped("scan", DICOM)), b"base64")),
        ("cleartext_dicom", "DICM file signature in a zip archive"),
    ),
    (
        "gzip of DICOM",
        mail(part(b"application/gzip", b64(gzipped(DICOM)), b"base64")),
        ("cleartext_dicom", "in a gzip file"),
    ),
    (
        "tar.gz of DICOM",
        mail(part(b"application/octet-stream", b64(gzipped(tarred("s/1.dcm", DICOM))), b"base64")),
        ("cleartext_dicom", "in a tar archive in a gzip file"),
    ),
    (
        "zip in zip of DICOM",
        mail(part(b"application/zip", b64(zipped("in.zip", zipped("x", DICOM), False)), b"base64")),
        ("cleartext_dicom", "in a zip archive in a zip archive"),
    ),
    (
        "DICOM in forwarded message/rfc822",
        mail(part(b"message/rfc822", mail(multipart(b"mixed", [dicom_attachment()])))),
        ("cleartext_dicom", "part 1.1"),
    ),
    ("DICOM in message/global", mail(part(b"message/global", mail(dicom_attachment()))), ("cleartext_dicom", "part 1")),
    (
        "DICOM in base64 message/global",
        mail(
            part(b"message/global", b64(mail(dicom_attachment(b"application/octet-stream", name=b"x.bin"))), b"base64")
        ),
        ("cleartext_dicom", "part 1 (application/octet-stream"),
    ),
    (
        "DICOM in quoted-printable message/global",
        mail(part(b"message/global", qp(mail(dicom_attachment())), b"quoted-printable")),
        ("cleartext_dicom", "part 1 ("),
    ),
    ("DICOM in message/news", mail(part(b"message/news", mail(dicom_attachment()))), ("cleartext_dicom", "part 1 (")),
    (
        "DSN carrying DICOM",
        mail(report(b"delivery-status", DSN_FIELDS, dicom_attachment())),
        ("cleartext_dicom", "part 3"),
    ),
    (
        "DSN returning a clear DICOM mail",
        mail(
            report(
                b"delivery-status", DSN_FIELDS, part(b"message/rfc822", mail(multipart(b"mixed", [dicom_attachment()])))
            )
        ),
        ("cleartext_dicom", "part 3.1"),
    ),
    (
        "MDN carrying DICOM",
        mail(report(b"disposition-notification", MDN_FIELDS, dicom_attachment())),
        ("cleartext_dicom", "part 3"),
    ),
    (
        "report type at the top does not exempt",
        mail(multipart(b"report", [text(), dicom_attachment()], b"r", b"; report-type=delivery-status")),
        ("cleartext_dicom", ""),
    ),
    (
        "DICOM in the signed part",
        mail(
            multipart(
                b"signed",
                [multipart(b"mixed", [dicom_attachment()]), part(b"application/pgp-signature", signature_block())],
                b"s",
                b'; protocol="application/pgp-signature"',
            )
        ),
        ("cleartext_dicom", "part 1.1"),
    ),
    (
        "DICOM beside PGP/MIME",
        mail(multipart(b"mixed", [pgp_mime(), dicom_attachment()])),
        ("cleartext_dicom", "part 2"),
    ),
    (
        "DICOM in alternative",
        mail(multipart(b"alternative", [text(), dicom_attachment(b"image/png")])),
        ("cleartext_dicom", ""),
    ),
    ("DICOM nested five deep", mail(nest(5, dicom_attachment())), ("cleartext_dicom", "part 1.1.1.1.1")),
    (
        "DICOM labelled as a signature",
        mail(
            multipart(
                b"signed",
                [text(), part(b"application/pgp-signature", b64(DICOM), b"base64")],
                b"s",
                b'; protocol="application/pgp-signature"',
            )
        ),
        ("cleartext_data", "signature"),
    ),
    ("DICOM in a digest", mail(multipart(b"digest", [b"\r\n" + mail(dicom_attachment())])), ("cleartext_dicom", "")),
    # ---- refused: other content in the clear -------------------------------------------------------
    (
        "application/pdf in the clear",
        mail(part(b"application/pdf", b64(b"%PDF-1.7\n" + os.urandom(500)), b"base64")),
        ("cleartext_data", "application/pdf"),
    ),
    (
        "image/png in the clear",
        mail(part(b"image/png", b64(b"\x89PNG\r\n\x1a\n" + os.urandom(500)), b"base64")),
        ("cleartext_data", "image/png"),
    ),
    (
        "zip without DICOM",
        mail(part(b"application/zip", b64(zipped("a.txt", b"x" * 500)), b"base64")),
        ("cleartext_data", "a zip archive"),
    ),
    (
        "gzip as octet-stream",
        mail(part(b"application/octet-stream", b64(gzipped(b"x" * 500)), b"base64")),
        ("cleartext_data", "a gzip file"),
    ),
    (
        "message/x-custom opaque",
        mail(part(b"message/x-custom", b"some opaque data\r\n" * 10)),
        ("cleartext_data", "message/x-custom"),
    ),
    ("text with NUL bytes", mail(part(b"text/plain", b"abc\0def\r\n", b"8bit")), ("cleartext_data", "NUL")),
    (
        "text with control bytes",
        mail(part(b"text/plain", b"abc\x01\x02def\r\n", b"8bit")),
        ("cleartext_data", "control"),
    ),
    (
        "S/MIME signature",
        mail(
            multipart(
                b"signed",
                [text(), part(b"application/pkcs7-signature", b64(DER + os.urandom(900)), b"base64")],
                b"s",
                b'; protocol="application/pkcs7-signature"',
            )
        ),
        ("cleartext_data", "pkcs7"),
    ),
    (
        "S/MIME encrypted",
        mail(part(b"application/pkcs7-mime; smime-type=enveloped-data", b64(DER + os.urandom(900)), b"base64")),
        ("cleartext_data", "pkcs7-mime"),
    ),
    (
        "random bytes labelled application/pgp-encrypted",
        mail(
            multipart(
                b"mixed",
                [
                    text(),
                    part(
                        b'application/pgp-encrypted; name="study.dcm.pgp"', b64(b"\x00" + os.urandom(3000)), b"base64"
                    ),
                ],
            )
        ),
        ("cleartext_data", "no OpenPGP message (though labelled application/pgp-encrypted)"),
    ),
    (
        "secret key attached",
        mail(part(b"application/pgp-keys", key_block(secret=True))),
        ("cleartext_data", "secret key"),
    ),
    (
        "unencrypted OpenPGP (gpg --store)",
        mail(part(b"application/octet-stream", armored(literal_packet(DICOM)))),
        ("malformed", "tag 11"),
    ),
    (
        "binary preamble",
        mail(multipart(b"mixed", [text()], preamble=b"\0\0\0" + DICOM)),
        ("cleartext_data", "preamble"),
    ),
    ("empty octet-stream is no data", mail(part(b"application/octet-stream", b"\r\n")), ALLOWED),
    # ---- refused: malformed PGP/MIME and OpenPGP -------------------------------------------------------
    ("Version: 2", mail(pgp_mime(version=b"Version: 2\r\n")), ("malformed", "Version: 1")),
    ("version part carrying data", mail(pgp_mime(version=b"Version: 1\r\n" + b64(DICOM))), ("malformed", "holds")),
    (
        "wrong protocol",
        mail(pgp_mime().replace(b'application/pgp-encrypted";', b'application/pkcs7-mime";')),
        ("malformed", "protocol"),
    ),
    (
        "three parts",
        mail(pgp_mime().replace(b"\r\n--enc--", b"\r\n--enc\r\nContent-Type: text/plain\r\n\r\nx\r\n--enc--")),
        ("malformed", "exactly two parts"),
    ),
    (
        "second part text/plain",
        mail(pgp_mime().replace(b"application/octet-stream", b"text/plain")),
        ("malformed", "second part"),
    ),
    (
        "multipart inside multipart/encrypted",
        mail(
            pgp_mime().replace(
                b'Content-Type: application/octet-stream; name="encrypted.asc"',
                b'Content-Type: multipart/mixed; boundary="in"',
            )
        ),
        ("malformed", "inside multipart/encrypted"),
    ),
    (
        "clear literal packet after the data",
        mail(pgp_mime(armored(openpgp(after=literal_packet(DICOM))))),
        ("malformed", "data after the encrypted data packet"),
    ),
    (
        "clear literal after partial chunks",
        mail(pgp_mime(b64(openpgp(partial=True, after=literal_packet(DICOM))), b"base64")),
        ("malformed", "data after the encrypted data packet"),
    ),
    (
        "second armored message after END",
        mail(pgp_mime(PGP + armored(literal_packet(DICOM)))),
        ("malformed", "after the end of the armored message"),
    ),
    ("text after the armor", mail(pgp_mime(PGP + b64(DICOM))), ("malformed", "after the end")),
    (
        "junk in the armor",
        mail(pgp_mime(CRLF.join(line + b"*" if n == 4 else line for n, line in enumerate(PGP.split(CRLF))))),
        ("malformed", "base64"),
    ),
    ("armor without END", mail(pgp_mime(PGP.split(b"-----END")[0])), ("malformed", "no END line")),
    (
        "data packet cut short",
        mail(pgp_mime(armored(openpgp()[:-100]))),
        ("malformed", "inside its encrypted data packet"),
    ),
    ("empty payload", mail(pgp_mime(b"")), ("malformed", "empty")),
    ("payload neither armored nor binary", mail(pgp_mime(b"hello\r\n")), ("malformed", "neither")),
    (
        "multipart/signed with three parts",
        mail(
            multipart(
                b"signed",
                [text(), part(b"application/pgp-signature", signature_block()), text()],
                b"s",
                b'; protocol="application/pgp-signature"',
            )
        ),
        ("malformed", "exactly two parts"),
    ),
    (
        "multipart/signed, second part text",
        mail(multipart(b"signed", [text(), text()], b"s", b'; protocol="application/pgp-signature"')),
        ("malformed", "second part"),
    ),
    # ---- refused: ambiguous structure ----------------------------------------------------------------
    (
        "two Content-Type fields",
        mail(part(b"text/plain", b64(DICOM), b"base64", b"Content-Type: application/dicom\r\n")),
        ("ambiguous", "two Content-Type fields"),
    ),
    (
        "two Content-Transfer-Encoding fields",
        mail(part(b"text/plain", b"x\r\n", b"7bit", b"Content-Transfer-Encoding: base64\r\n")),
        ("ambiguous", "two Content-Transfer-Encoding"),
    ),
    (
        "base64 on a multipart",
        mail(multipart(b"mixed", [text()]).replace(CRLF + CRLF, b"\r\nContent-Transfer-Encoding: base64\r\n\r\n", 1)),
        ("ambiguous", "on a multipart/mixed"),
    ),
    (
        "base64 on message/rfc822",
        mail(part(b"message/rfc822", b64(mail(text())), b"base64")),
        ("ambiguous", "message/rfc822"),
    ),
    (
        "lone CR in a header",
        mail(part(b"text/plain\rContent-Type: application/dicom", b"x\r\n")),
        ("ambiguous", "lone carriage"),
    ),
    (
        "lone CR before a boundary",
        mail(multipart(b"mixed", [text(b"x\r--b1\rContent-Type: application/dicom\r\r\nDICM\r\n")])),
        ("ambiguous", "lone carriage"),
    ),
    (
        "line starting with the boundary",
        mail(multipart(b"mixed", [text(b"--b1x hidden\r\n")])),
        ("ambiguous", "starts with a boundary"),
    ),
    (
        "boundary that prefixes the inner one",
        mail(multipart(b"mixed", [multipart(b"mixed", [text()], b"b1-inner")])),
        ("ambiguous", "prefix of an enclosing"),
    ),
    (
        "no close delimiter",
        mail(multipart(b"mixed", [text()]).replace(b"--b1--", b"")),
        ("ambiguous", "closing boundary"),
    ),
    (
        "multipart without boundary",
        mail(b"Content-Type: multipart/mixed\r\n\r\n--x\r\n\r\nDICM\r\n"),
        ("ambiguous", "without a boundary"),
    ),
    (
        "multipart without parts",
        mail(b'Content-Type: multipart/mixed; boundary="q"\r\n\r\nno parts\r\n'),
        ("ambiguous", ""),
    ),
    (
        "header without empty line",
        b"From: a@hub.test\r\nSubject: x\r\nthis is no header\r\n",
        ("ambiguous", "empty line"),
    ),
    ("unparseable Content-Type", mail(part(b"application/", b64(DICOM), b"base64")), ("ambiguous", "cannot be parsed")),
    (
        "boundary given twice",
        mail(multipart(b"mixed", [text()], params=b'; boundary="other"')),
        ("ambiguous", "given twice"),
    ),
    (
        "boundary plain and RFC 2231",
        mail(multipart(b"mixed", [text()], params=b'; boundary*0="b"')),
        ("ambiguous", "given twice"),
    ),
    # ---- refused: not understood ---------------------------------------------------------------------
    (
        "unknown transfer encoding",
        mail(part(b"application/octet-stream", b64(DICOM), b"x-gzip64")),
        ("unsupported", "x-gzip64"),
    ),
    (
        "message/external-body",
        mail(
            part(
                b'message/external-body; access-type=URL; URL="http://x/y.dcm"',
                b"Content-Type: application/dicom\r\n\r\n",
            )
        ),
        ("unsupported", "external-body"),
    ),
    # ---- refused: limits ----------------------------------------------------------------------------
    ("nesting deeper than the limit", mail(nest(mime_stream.MAX_DEPTH + 2, text())), ("structure_limit", "deeper")),
    (
        "too many header fields",
        mail(text().replace(CRLF + CRLF, CRLF + b"".join(b"X-F%d: v\r\n" % i for i in range(1005)) + CRLF, 1)),
        ("structure_limit", "header fields"),
    ),
    (
        "header block too big",
        mail(b"X-Big: " + b"x" * (mime_stream.MAX_HEADER_BYTES + 10) + b"\r\n\r\n" + DICOM),
        ("structure_limit", "header block"),
    ),
    (
        "boundary longer than 200",
        mail(multipart(b"mixed", [text()], b"b" * 250)),
        ("structure_limit", "boundary longer"),
    ),
    (
        "preamble over 64 KB",
        mail(multipart(b"mixed", [text()], preamble=b"filler line\r\n" * 6000)),
        ("structure_limit", "preamble"),
    ),
    (
        "signature part over 64 KB",
        mail(part(b"application/pgp-signature", signature_block() + b"\r\n" * 40000)),
        ("cleartext_data", "more than 64 KB"),
    ),
    # ---- refused: fragments ---------------------------------------------------------------------------
    (
        "first fragment announcing text",
        mail(partial(1, mail(multipart(b"mixed", [dicom_attachment()])))),
        ("fragment", "announces multipart/mixed"),
    ),
    ("first fragment cut before the keys", mail(partial(1, mail(_FRAGMENTED[: _CUT - 560]))), ("malformed", "")),
    (
        "later fragment with clear text",
        mail(partial(2, b"Content-Type: application/dicom\r\n\r\nDICM\r\n")),
        ("fragment", "not part of an encrypted message"),
    ),
    ("later fragment with base64 DICOM", mail(partial(2, b64(DICOM, 64))), ("fragment", "DICM")),
    ("later fragment not ciphertext", mail(partial(2, b64(b"A" * 70000, 64))), ("fragment", "not ciphertext")),
    ("fragment without id", mail(part(b"message/partial; number=2; total=2", FRAGMENT_2)), ("fragment", "id")),
    (
        "fragment base64-encoded",
        mail(partial(2, b64(FRAGMENT_2), b"Content-Transfer-Encoding: base64\r\n")),
        ("fragment", "encoded"),
    ),
    # ---- refused: keys ----------------------------------------------------------------------------------
    ("PGP/MIME to another key", mail(pgp_mime(armored(openpgp((OTHER_KEY,))))), ("wrong_key", OTHER_KEY)),
    (
        "attachment to another key",
        mail(part(b"application/octet-stream", armored(openpgp((OTHER_KEY,))))),
        ("wrong_key", OTHER_KEY),
    ),
    ("passphrase only", mail(pgp_mime(armored(openpgp((), passphrase=True)))), ("wrong_key", "passphrase only")),
    ("hidden recipient", mail(pgp_mime(armored(openpgp(("0000000000000000",))))), ("hidden_recipient", "key ID 0")),
    (
        "wrong key inside a forwarded message",
        mail(part(b"message/rfc822", mail(pgp_mime(armored(openpgp((OTHER_KEY,))))))),
        ("wrong_key", OTHER_KEY),
    ),
]


def test_the_table_is_large_and_names_are_unique():
    assert len(SHAPES) >= 100
    assert len({name for name, _, _ in SHAPES}) == len(SHAPES)
    assert sum(expected is None for _, _, expected in SHAPES) >= 40


@pytest.mark.parametrize("name, message, expected", SHAPES, ids=[name for name, _, _ in SHAPES])
def test_shape(name, message, expected):
    got = verdict(message)
    if expected is None:
        assert got is None, f"{name}: refused with {got}"
    else:
        assert got is not None, f"{name}: allowed"
        reason, text = expected
        assert got[0] == reason and text in got[1], f"{name}: {got}"
        assert got[1][:3] in ("550", "552", "554") and got[1][4:5] == "5", got[1]
        assert all(32 <= ord(c) < 127 for c in got[1]), got[1]  # a reply line: printable ASCII only
    assert verdict(message, piece=7) == got, f"{name}: another verdict when fed in 7-byte pieces"


def test_two_recipient_sites_each_need_their_key():
    both = BETA + [RecipientKeys("gamma", {OTHER_KEY: "current key"})]
    assert verdict(mail(pgp_mime(armored(openpgp((KEY, OTHER_KEY))))), both) is None
    reason, reply = verdict(mail(pgp_mime()), both)
    assert reason == "wrong_key" and "site gamma" in reply


def test_hidden_recipients_when_allowed_and_sites_without_key():
    hidden = mail(pgp_mime(armored(openpgp(("0000000000000000",)))))
    assert verdict(hidden, allow_hidden=True) is None
    assert verdict(mail(pgp_mime(armored(openpgp((OTHER_KEY,))))), [RecipientKeys("gamma", {})]) is None
    assert verdict(mail(dicom_attachment()), [RecipientKeys("gamma", {})])[0] == "cleartext_dicom"


def test_parts_beyond_the_limit_are_refused(monkeypatch):
    monkeypatch.setattr(mime_stream, "MAX_PARTS", 50)
    message = mail(multipart(b"mixed", [text(b"p\r\n")] * 60))
    assert verdict(message)[0] == "structure_limit"


# ---- properties -----------------------------------------------------------------------------------


def _dicom_payloads():
    return st.sampled_from(
        [
            ("part10", dicom_file()),
            ("raw", dicom_raw()),
            ("meta", dicom_file()[128:]),
            ("zip", zipped("study/1.dcm", dicom_file())),
            ("gzip", gzipped(dicom_file())),
            ("tgz", gzipped(tarred("x", dicom_file()))),
            ("json", dicom_json()),
            ("xml", dicom_xml()),
        ]
    )


@st.composite
def _encoded(draw, data: bytes):
    """(Content-Transfer-Encoding, body) in a legal or leniently read form."""
    kind = draw(st.sampled_from(["base64", "base64-odd", "base64-junk", "qp", "uu", "binary", "8bit", "none"]))
    if kind == "base64":
        width = draw(st.integers(4, 200))
        return b"base64", b64(data, width, draw(st.sampled_from([CRLF, b"\n"])))
    if kind == "base64-odd":
        return b"Base64", odd_base64(data)
    if kind == "base64-junk":
        return b"base64", junk_base64(data)
    if kind == "qp":
        return b"quoted-printable", qp(data)
    if kind == "uu":
        return draw(st.sampled_from([b"x-uuencode", b"uuencode", b"x-uue"])), uuencoded(data, b"a.bin")
    return (None if kind == "none" else kind.encode()), data


_TYPES = [
    b"application/octet-stream",
    b"application/dicom",
    b"image/jpeg",
    b"application/pdf",
    b"text/plain",
    b"text/html",
    b"application/json",
    b"message/x-study",
    b"application/pgp-signature",
    b"application/pgp-keys",
    b"application/zip",
    b"image/png",
    b"video/mp4",
    b"message/delivery-status",
    b"text/rfc822-headers",
    b"application/pgp-encrypted",
    b"model/x-dicom",
    b"application/vnd.x",
]


@st.composite
def _dicom_leaf(draw) -> bytes:
    _, data = draw(_dicom_payloads())
    content_type = draw(st.sampled_from(_TYPES))
    name = draw(st.sampled_from([b"", b"scan.bin", b"report.txt", b"x", b"IMG0001", b"signature.asc"]))
    if name:
        content_type += draw(st.sampled_from([b'; name="' + name + b'"', b"; name=" + name]))
    encoding, body = draw(_encoded(data))
    disposition = draw(
        st.sampled_from([b"", b"Content-Disposition: attachment\r\n", b"Content-Disposition: inline\r\n"])
    )
    return part(content_type, body, encoding, disposition)


@st.composite
def _wrapped(draw, leaf: bytes, depth: int = 0) -> bytes:
    if depth >= 3 or draw(st.booleans()):
        return leaf
    kind = draw(
        st.sampled_from(
            ["mixed", "alternative", "related", "report", "signed", "rfc822", "global", "global64", "news", "digest"]
        )
    )
    inner = draw(_wrapped(leaf, depth + 1))
    boundary = b"w%d-%s" % (depth, draw(st.sampled_from([b"a", b"=_Part_1", b"----=_NextPart_000"])))
    siblings = draw(st.lists(st.sampled_from([text(), text(b"<p>x</p>", b"html")]), max_size=2))
    position = draw(st.integers(0, len(siblings)))
    children = siblings[:position] + [inner] + siblings[position:]
    if kind in ("mixed", "alternative", "related"):
        return multipart(kind.encode(), children, boundary, preamble=draw(st.sampled_from([b"", b"MIME.\r\n"])))
    if kind == "report":
        return multipart(
            b"report",
            [text(), part(b"message/delivery-status", DSN_FIELDS), inner],
            boundary,
            b"; report-type=delivery-status",
        )
    if kind == "signed":
        return multipart(
            b"signed",
            [inner, part(b"application/pgp-signature", signature_block())],
            boundary,
            b'; protocol="application/pgp-signature"',
        )
    if kind == "digest":
        return multipart(b"digest", [b"\r\n" + mail(inner)], boundary)
    if kind == "global64":
        return part(b"message/global", b64(mail(inner)), b"base64")
    return part(b"message/" + kind.encode(), mail(inner))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_clear_dicom_in_any_legal_mime_is_never_allowed(data):
    leaf = data.draw(_dicom_leaf())
    message = mail(data.draw(_wrapped(leaf)))
    if data.draw(st.booleans()):
        message = message.replace(CRLF, b"\n")
    piece = data.draw(st.sampled_from([1 << 20, 4096, 97, 13]))
    got = verdict(message, piece=piece)
    assert got is not None, message[:3000]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_right_pgp_mime_in_harmless_wrappings_is_allowed(data):
    payload = data.draw(
        st.sampled_from(
            [
                pgp_mime(armored(openpgp(size=data.draw(st.integers(0, 20000)), partial=data.draw(st.booleans())))),
                pgp_mime(b64(openpgp(partial=True), data.draw(st.integers(4, 120))), b"base64"),
                pgp_mime(openpgp(marker=True), b"binary"),
            ]
        )
    )
    kind = data.draw(st.sampled_from(["top", "mixed", "signed", "rfc822", "global64"]))
    if kind == "mixed":
        payload = multipart(b"mixed", [text(), payload])
    elif kind == "signed":
        payload = multipart(
            b"signed",
            [payload, part(b"application/pgp-signature", signature_block())],
            b"s",
            b'; protocol="application/pgp-signature"',
        )
    elif kind == "rfc822":
        payload = multipart(b"mixed", [text(), part(b"message/rfc822", mail(payload))])
    elif kind == "global64":
        payload = part(b"message/global", b64(mail(payload)), b"base64")
    piece = data.draw(st.sampled_from([1 << 20, 4096, 97, 13]))
    assert verdict(mail(payload), piece=piece) is None


@settings(max_examples=300, deadline=None)
@given(noise=st.binary(max_size=300), cut=st.integers(0, 2000), piece=st.integers(1, 5000))
def test_mangled_shapes_end_in_a_verdict(noise, cut, piece):
    """Whatever the bytes, the policy ends without an exception (its refusals are replies)."""
    base = mail(multipart(b"mixed", [text(), pgp_mime(), dicom_attachment()]))
    cut = min(cut, len(base))
    got = verdict(base[:cut] + noise + base[cut:], piece=piece)
    assert got is None or got[1][:3] in ("550", "552", "554")
