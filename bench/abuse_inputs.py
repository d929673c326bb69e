# The hostile inputs of the abuse benchmark (bench/abuse_attacks.py) and the attacker's mailboxes
# it fills first (bench/abuse.py): IMAP commands that are cheap to send and may be dear to answer,
# adversarial MIME mails, malformed SMTP lines, oversized HTTP requests. Pure data, no I/O.
# Must never: make a command line over 64 KB (the hub's IMAP command limit: a longer one measures
# the parser's refusal, not the command), or a mail line over 998 octets.
import itertools
import os

BULK_MAILS = 100  # the attacker's own mailbox: 1 MB mails with big headers
BULK_SIZE = 1_000_000
FILLER_FIELDS = 200  # X-Filler-N header fields of ~300 octets each: 60 KB headers
LINE = 76


def _body_lines(size: int) -> bytes:
    line = (os.urandom(LINE // 2).hex()[:LINE] + "\r\n").encode()
    return line * max(1, size // len(line))


def bulk_mail(domain: str, sender: str, recipient: str, number: int) -> bytes:
    fields = "".join(f"X-Filler-{i}: {'filler ' * 42}{number}\r\n" for i in range(FILLER_FIELDS))
    header = (
        f"From: {sender}@{domain}\r\nTo: {recipient}@{domain}\r\nSubject: bulk {number}\r\n"
        f"Message-ID: <bulk-{number}-{os.urandom(6).hex()}@{domain}>\r\n{fields}\r\n"
    ).encode()
    return header + _body_lines(BULK_SIZE - len(header))


# ------------------------------------------------------------------------- IMAP


def list_patterns(offset: int):
    """LIST/LSUB commands, endlessly; a fresh number in each pattern defeats any pattern cache."""
    for n in itertools.count(offset * 1_000_000):
        yield b'LIST "" "*%*%*%*%*%*%*%*%*%*%*%*%*%*%x"'
        yield b'LSUB "" "' + b"*%" * 1000 + b'%dx"' % n
        yield b'LIST "" "' + b"%" * 30000 + b'%d"' % n
        yield b'LIST "' + b"*" * 30000 + b'" "' + b"%" * 30000 + b'%dx"' % n


_FETCH_ITEMS = (
    b"FLAGS UID RFC822.SIZE INTERNALDATE ENVELOPE BODYSTRUCTURE "
    b"BODY.PEEK[HEADER.FIELDS (SUBJECT FROM TO)] BODY.PEEK[1]<0.100> "
)


def many_item_fetches():
    items = (_FETCH_ITEMS * (60_000 // len(_FETCH_ITEMS))).strip()
    fields = b" ".join(b"X-F%d" % i for i in range(8000))
    while True:
        yield b"FETCH 1:* (" + items + b")"
        yield b"FETCH 1:* (BODY.PEEK[HEADER.FIELDS (" + fields + b")])"
        yield b"FETCH " + b",".join([b"1:*"] * 15000) + b" (UID FLAGS)"


def deep_searches():
    while True:
        for depth in (1000, 4000, 15000):
            yield b"SEARCH " + b"NOT " * depth + b"ALL"
            yield b"SEARCH " + b"(" * depth + b"ALL" + b")" * depth
            yield b"SEARCH " + b"OR ALL " * (depth // 2) + b"ALL"


def text_searches():
    for n in itertools.count():
        yield b'SEARCH HEADER X-Filler-7 "needle-%d"' % n
        yield b'SEARCH SUBJECT "not-there-%d"' % n
        yield b'SEARCH BODY "needle-%d"' % n
        yield b'SEARCH TEXT "needle-%d"' % n
        yield b'SEARCH HEADER X-Filler-1 "' + b"filler " * 8000 + b'%d"' % n
        yield b'SEARCH OR OR HEADER X-Filler-2 "x%d" HEADER X-Filler-3 "y" OR TEXT "z" BODY "w"' % n


def structure_fetches():
    path = b".".join([b"1"] * 2000)
    while True:
        yield b"FETCH 1:* (BODYSTRUCTURE)"
        yield b"FETCH 1:* (ENVELOPE BODY)"
        yield b"FETCH 1:* (BODY.PEEK[" + path + b"])"
        yield b"FETCH 1:* (BODY.PEEK[20000.MIME] BODY.PEEK[9999] BODY.PEEK[1.2.3.4.5.6.7.8.9.10.11.12])"


# ------------------------------------------------------------------------- MIME mails


def _mail(domain: str, sender: str, recipient: str, kind: str, content_type: str, rest: bytes) -> bytes:
    return (
        f"From: {sender}@{domain}\r\nTo: {recipient}@{domain}\r\nSubject: hostile {kind}\r\n"
        f"Message-ID: <{kind}-{os.urandom(6).hex()}@{domain}>\r\nMIME-Version: 1.0\r\n"
        f"Content-Type: {content_type}\r\n"
    ).encode() + rest


def wide_mime(parts: int) -> bytes:
    part = b"--w\r\nContent-Type: text/plain\r\n\r\nx\r\n"
    return b"\r\n" + part * parts + b"--w--\r\n"


def deep_mime(depth: int) -> bytes:
    opening = b"".join(
        b"--d%d\r\nContent-Type: multipart/mixed; boundary=d%d\r\n\r\n" % (i, i + 1) for i in range(depth)
    )
    closing = b"".join(b"--d%d--\r\n" % i for i in reversed(range(depth + 1)))
    return b"\r\n" + opening + b"--d%d\r\nContent-Type: text/plain\r\n\r\nleaf\r\n" % depth + closing


def dash_runs(lines: int) -> bytes:
    near = [b"-" * 990, b"--=_b" + b"-" * 900, b"--=_b-" + b"=" * 500, b"--=_" + b"b" * 900]
    body = b"\r\n".join(near[i % len(near)] for i in range(lines))
    return b"\r\n--=_b\r\nContent-Type: text/plain\r\n\r\n" + body + b"\r\n--=_b--\r\n"


def folded_header(lines: int) -> bytes:
    return b"X-Folded: start\r\n" + b" folded line\r\n" * lines + b"\r\nbody\r\n"


def many_boundaries(depth: int, near_misses: int) -> bytes:
    opening = b"".join(
        b"--B%d\r\nContent-Type: multipart/mixed; boundary=B%d\r\n\r\n" % (i, i + 1) for i in range(depth)
    )
    misses = b"".join(b"--B%d-x\r\n" % (i % depth) for i in range(near_misses))
    closing = b"".join(b"--B%d--\r\n" % i for i in reversed(range(depth + 1)))
    return b"\r\n" + opening + b"--B%d\r\nContent-Type: text/plain\r\n\r\n" % depth + misses + closing


def hostile_mime_mails(domain: str, sender: str, recipient: str, parts: int) -> list[tuple[str, bytes]]:
    """(name, mail) pairs, CRLF, no line over 998 octets and none starting with '.'."""
    kinds = [
        ("wide", "multipart/mixed; boundary=w", wide_mime(parts)),
        ("deep", "multipart/mixed; boundary=d0", deep_mime(2000)),
        ("dashes", 'multipart/mixed; boundary="=_b"', dash_runs(2000)),
        ("folded", "text/plain", folded_header(100_000)),
        ("boundaries", "multipart/mixed; boundary=B0", many_boundaries(30, 20_000)),
    ]
    return [(name, _mail(domain, sender, recipient, name, content_type, rest)) for name, content_type, rest in kinds]


def data_filler(size: int) -> bytes:
    """The start of a mail's DATA (never its end): a header and `size` octets of body lines."""
    return b"Subject: stalled mid-DATA\r\n\r\n" + _body_lines(size)


# ------------------------------------------------------------------------- SMTP


def malformed_smtp(domain: str) -> list[bytes]:
    d = domain.encode()
    return [
        b"MAIL FROM:<a@" + d,
        b"MAIL FROM:<" + b"a" * 5000 + b"@" + d + b">",
        b"MAIL FROM:a@" + d,
        b"MAIL FROM:<a@b> SIZE=abc",
        b"MAIL FROM:<a@b> SIZE=" + b"9" * 500,
        b"MAIL FROM:<a@b> BODY=8BITMIME BODY=7BIT",
        b"MAIL FROM:<a@b> " + b"X=Y " * 400,
        b"MAIL FROM:<a@[300.1.1.1]>",
        b"MAIL FROM:<a@[IPv6:zz::q]>",
        b'MAIL FROM:<"quo\\"ted"@' + d + b">",
        b"MAIL FROM:<\xc3\xa9@" + d + b"> SMTPUTF8",
        b"MAIL FROM:<<>>",
        b"MAIL TO:<a@b>",
        b"MAIL",
        b"MAIL FROM:",
        b"MAIL FROM:<@a,@b:c@" + d + b">",
        b"RCPT TO:<>",
        b"RCPT TO:<@a,@b:c@d>",
        b"RCPT TO:<postmaster>",
        b"RCPT TO:<" + b"r" * 900 + b"@" + d,
        b"RCPT TO:<a@" + d + b"> NOTIFY=SUCCESS,NEVER ORCPT=rfc822;" + b"x" * 300,
        b"RCPT",
        b"RCPT TO:<a@b>>",
        b"AUTH",
        b"AUTH PLAIN ===",
        b"AUTH PLAIN " + b"A" * 1900,
        b"AUTH PLAIN AGFAYg",
        b"AUTH CRAM-MD5",
        b"AUTH XOAUTH2 x",
        b"AUTH PLAIN =",
        b"AUTH LOGIN",
        b"\xff\xfe",
        b"AUTH LOGIN " + b"!" * 100,
        b"*",
        b"EHLO",
        b"HELO",
        b"EHLO " + b"\xff" * 100,
        b"HELO a b c",
        b"EHLO [300.300.1.1]",
        b"\x00\x01\x02\x03",
        b"\x1b[2J",
        b"",
        b" ",
        b"DATA",
        b"DATA x",
        b"BDAT",
        b"BDAT -1",
        b"BDAT x LAST",
        b"VRFY " + b"%" * 1000,
        b"EXPN x",
        b"HELP " + b"\x7f" * 10,
        b"NOOP " + b"x" * 1500,
        b"RSET x",
        b"STARTTLS x",
        b"X" * 100_000,
        b"MAIL FROM:<a@b>\rRCPT TO:<c@d>",
        b"\tMAIL FROM:<a@b>",
        b"mail from:<A@" + d.upper() + b">",
        b"ETRN x",
        b"TURN",
        b"XCLIENT ADDR=1.2.3.4",
    ]


# ------------------------------------------------------------------------- HTTP


def big_http_requests() -> list[bytes]:
    return [
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-H: v\r\n" * 10_000 + b"\r\n",
    ]
