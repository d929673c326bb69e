# The streaming MIME parser: messages built with Python's email package, cut into any chunks,
# give the same part tree as when fed whole and as email's own parser; malformed input degrades
# to body bytes without raising; chunk edges anywhere in arbitrary bytes change nothing.
import email
import email.policy
from email.message import Message
from email.mime.application import MIMEApplication
from email.mime.message import MIMEMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.mime import stream as mime_stream
from relay.mime.stream import Listeners, MimeStreamParser, split_params


class Recorder:
    """Keeps every event as plain data (paths, types, offsets, body bytes)."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.parts: list[dict] = []
        self._bodies: dict[int, bytearray] = {}

    def part_start(self, part) -> None:
        self.events.append(
            (
                "start",
                part.path,
                part.is_message,
                part.kind,
                part.content_type,
                part.subtype,
                dict(part.params),
                list(part.headers),
                part.header_start,
                part.body_start,
            )
        )
        self._bodies[id(part)] = bytearray()

    def part_body(self, part, data) -> None:
        assert part.kind == "leaf"
        self._bodies[id(part)] += data

    def part_end(self, part) -> None:
        self.events.append(("end", part.path, part.is_message, part.body_end, part.size, part.lines))
        self.parts.append(
            {
                "path": part.path,
                "is_message": part.is_message,
                "kind": part.kind,
                "type": f"{part.content_type}/{part.subtype}",
                "body_start": part.body_start,
                "body_end": part.body_end,
                "body": bytes(self._bodies.pop(id(part))),
            }
        )


def parse(data: bytes, cuts: list[int] = ()) -> Recorder:
    recorder = Recorder()
    parser = MimeStreamParser(recorder)
    start = 0
    for cut in sorted(set(cuts)):
        parser.feed(data[start:cut])
        start = cut
    parser.feed(data[start:])
    parser.close()
    return recorder


def tree_of(recorder: Recorder) -> list[tuple]:
    return sorted(
        (p["path"], p["is_message"], p["type"], p["body"] if p["kind"] == "leaf" else None) for p in recorder.parts
    )


def email_tree(msg: Message, path: str = "", is_message: bool = True) -> list[tuple]:
    """The same tree as seen by Python's email package, numbered as IMAP does (RFC 3501)."""
    if msg.is_multipart() and msg.get_content_type() == "message/rfc822":
        inner = msg.get_payload(0)
        return [(path, is_message, "message/rfc822", None)] + email_tree(inner, path or "1", True)
    if msg.is_multipart():
        nodes = [(path, is_message, msg.get_content_type(), None)]
        for n, child in enumerate(msg.get_payload(), 1):
            nodes += email_tree(child, f"{path}.{n}" if path else str(n), False)
        return nodes
    body = msg.get_payload(decode=False).encode("ascii", "surrogateescape")
    return [(path, is_message, msg.get_content_type(), body)]


# -- messages built with the email package ---------------------------------------------------

BCHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:?"

line_text = st.text(alphabet="ab -.:\t#", max_size=30)
body_text = st.lists(line_text, max_size=6).map("\n".join) | st.lists(line_text, max_size=4).map(
    lambda lines: "\n".join(lines) + "\n"
)


@st.composite
def boundaries(draw) -> str:
    # odd but legal (RFC 2046 bchars, inner spaces); the '=' keeps them out of bodies, and
    # serialize() appends a serial so that they are distinct (one may be a prefix of another).
    core = draw(st.text(alphabet=BCHARS + " ", max_size=20)).strip()
    return f"={core}{'=' if draw(st.booleans()) else ''}"


def leaves():
    text = st.builds(
        lambda body, sub: MIMEText(body, sub, "us-ascii"), body_text, st.sampled_from(["plain", "html", "x-dicom-note"])
    )
    binary = st.builds(lambda data: MIMEApplication(data, "octet-stream"), st.binary(max_size=300))
    encrypted_control = st.builds(lambda: MIMEApplication(b"Version: 1\n", "pgp-encrypted", _encoder=lambda m: None))
    return text | binary | encrypted_control


def multipart_of(children: list, subtype: str, boundary: str, preamble: str | None) -> Message:
    msg = MIMEMultipart(subtype, boundary=boundary)
    for child in children:
        msg.attach(child)
    msg.preamble = preamble
    msg.epilogue = preamble
    return msg


def extend(children):
    multipart = st.builds(
        multipart_of,
        st.lists(children, min_size=1, max_size=3),
        st.sampled_from(["mixed", "alternative", "encrypted", "related"]),
        boundaries(),
        st.none() | body_text,
    )
    rfc822 = st.builds(lambda inner: MIMEMessage(_with_envelope(inner)), children)
    return multipart | rfc822


def _with_envelope(msg: Message) -> Message:
    msg["Subject"] = "inner"
    msg["From"] = "a@hub.test"
    return msg


messages = st.recursive(leaves(), extend, max_leaves=8)


def serialize(msg: Message) -> bytes:
    for serial, part in enumerate(msg.walk()):
        if part.get_boundary() is not None:
            part.set_boundary(f"{part.get_boundary()}{serial}")
    return msg.as_bytes(policy=email.policy.SMTP)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msg=messages, data=st.data())
def test_chunked_equals_whole_equals_email_package(msg, data):
    raw = serialize(msg)
    whole = parse(raw)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=12))
    chunked = parse(raw, cuts)
    assert chunked.events == whole.events
    assert tree_of(whole) == sorted(email_tree(email.message_from_bytes(raw)))
    for part in whole.parts:
        if part["kind"] == "leaf":
            assert raw[part["body_start"] : part["body_end"]] == part["body"]
    assert [p["path"] for p in whole.parts][-1] == ""


@pytest.mark.parametrize(
    "raw, value",
    [
        (b"X:\r\n \r\n", ""),  # found by the test below in a CI run: chunked, the value was " "
        (b"X:\r\n  a\r\n", "a"),
        (b"X: \r\n \r\n a\r\n", "a"),
        (b"X:\r\n\ta\r\n b\r\n\r\nbody", "a b"),
        (b"X: a\r\n b\r\n", "a b"),
    ],
)
def test_a_field_whose_first_line_is_empty_has_the_same_value_however_it_is_chunked(raw, value):
    whole = parse(raw)
    assert whole.events[0][7] == [("X", value)]
    for cut in range(len(raw) + 1):
        assert parse(raw, [cut]).events == whole.events, cut
    assert parse(raw, range(len(raw))).events == whole.events


@settings(max_examples=300, deadline=None)
@given(
    raw=st.lists(
        st.sampled_from(
            [
                b"\r\n",
                b"\n",
                b"\r",
                b"--",
                b"-",
                b"--b",
                b"--b--",
                b"--c",
                b"Content-Type: multipart/mixed; boundary=b",
                b"boundary=c",
                b"Content-Type: message/rfc822",
                b"X:",
                b" ",
                b"a",
                b"\r\n\r\n",
            ]
        ),
        max_size=60,
    ).map(b"".join),
    data=st.data(),
)
def test_arbitrary_bytes_never_raise_and_chunking_changes_nothing(raw, data):
    whole = parse(raw)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=10))
    assert parse(raw, cuts).events == whole.events
    assert parse(raw, range(len(raw))).events == whole.events
    top = whole.parts[-1]
    assert top["path"] == "" and top["body_end"] == len(raw)
    starts = [e for e in whole.events if e[0] == "start"]
    assert len(starts) == len(whole.parts)


# -- fixed cases ---------------------------------------------------------------------------------

PGP_MIME = (
    b"From: alpha@hub.test\r\nTo: beta@hub.test\r\nSubject: study\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted";\r\n'
    b' boundary="----enc=_1"\r\n\r\n'
    b"This is an OpenPGP/MIME encrypted message (RFC 4880 and 3156)\r\n"
    b"------enc=_1\r\nContent-Type: application/pgp-encrypted\r\n"
    b"Content-Description: PGP/MIME version identification\r\n\r\nVersion: 1\r\n\r\n"
    b'------enc=_1\r\nContent-Type: application/octet-stream; name="encrypted.asc"\r\n'
    b'Content-Disposition: inline; filename="encrypted.asc"\r\n\r\n'
    b"-----BEGIN PGP MESSAGE-----\r\n\r\nhQEMA0xyz\r\n=abcd\r\n-----END PGP MESSAGE-----\r\n\r\n"
    b"------enc=_1--\r\n"
)


def test_pgp_mime_parts_types_and_bodies():
    rec = parse(PGP_MIME)
    by_path = {p["path"]: p for p in rec.parts}
    assert by_path[""]["type"] == "multipart/encrypted"
    start = rec.events[0]
    assert start[6] == {"protocol": "application/pgp-encrypted", "boundary": "----enc=_1"}
    assert by_path["1"]["type"] == "application/pgp-encrypted"
    assert by_path["1"]["body"] == b"Version: 1\r\n"
    assert by_path["2"]["body"] == (
        b"-----BEGIN PGP MESSAGE-----\r\n\r\nhQEMA0xyz\r\n=abcd\r\n-----END PGP MESSAGE-----\r\n"
    )
    assert ("end", "", True, len(PGP_MIME), len(PGP_MIME) - start[9], None) == rec.events[-1]
    assert parse(PGP_MIME, range(len(PGP_MIME))).events == rec.events


def test_offsets_are_relative_to_the_first_byte_fed():
    prefix = b"Received: from gw by hub; Sat, 28 Nov 2026 04:00:00 +0000\r\n"
    rec = parse(prefix + PGP_MIME)
    assert rec.events[0][7][0] == ("Received", "from gw by hub; Sat, 28 Nov 2026 04:00:00 +0000")
    assert {p["path"]: p["body_start"] for p in parse(PGP_MIME).parts}["2"] + len(prefix) == {
        p["path"]: p["body_start"] for p in rec.parts
    }["2"]


def test_folded_headers_are_unfolded_and_params_parsed():
    raw = b'Content-Type: text/plain;\r\n\tcharset="utf-8" (a comment);\r\n name*=x\r\nSubject: one\r\n two\r\n\r\nbody'
    start = parse(raw).events[0]
    assert start[4:7] == ("text", "plain", {"charset": "utf-8", "name": "x"})  # RFC 2231, decoded
    assert ("Subject", "one two") in start[7]
    assert split_params('a/b; x="q\\"uote;d"; X=2; y') == ("a/b", {"x": 'q"uote;d'})


def test_lf_only_message_still_gives_headers_and_body():
    raw = b"Subject: lf\nContent-Type: multipart/mixed; boundary=q\n\n--q\nContent-Type: text/html\n\nhi\n--q--\n"
    rec = parse(raw)
    assert tree_of(rec) == [("", True, "multipart/mixed", None), ("1", False, "text/html", b"hi")]
    assert parse(raw, range(len(raw))).events == rec.events


def test_missing_close_boundary_ends_parts_at_end_of_data():
    raw = b"Content-Type: multipart/mixed; boundary=q\r\n\r\n--q\r\n\r\nunterminated\r\n"
    rec = parse(raw)
    assert tree_of(rec) == [("", True, "multipart/mixed", None), ("1", False, "text/plain", b"unterminated\r\n")]
    assert rec.parts[-1]["body_end"] == len(raw)


def test_boundary_never_seen_leaves_a_multipart_without_children():
    raw = b"Content-Type: multipart/mixed; boundary=q\r\n\r\njust text\r\n"
    rec = parse(raw)
    assert [(p["path"], p["kind"]) for p in rec.parts] == [("", "multipart")]
    no_boundary = parse(b"Content-Type: multipart/mixed\r\n\r\n--q\r\nx\r\n")
    assert no_boundary.parts[0]["kind"] == "leaf" and no_boundary.parts[0]["body"] == b"--q\r\nx\r\n"


def test_no_header_body_separator():
    rec = parse(b"Subject: x\r\nthis line is no header\r\nmore\r\n")
    assert rec.parts[0]["body"] == b"this line is no header\r\nmore\r\n"
    header_only = parse(b"Subject: x\r\nFrom: y")
    assert header_only.events[0][7] == [("Subject", "x"), ("From", "y")]
    assert header_only.parts[0]["body"] == b"" and header_only.parts[0]["body_start"] == 19
    empty = parse(b"")
    assert [(p["path"], p["type"], p["body"]) for p in empty.parts] == [("", "text/plain", b"")]
    no_header = parse(b"\r\nbody only")
    assert no_header.parts[0]["body"] == b"body only" and no_header.events[0][7] == []


def test_part_ended_by_a_boundary_inside_its_header_block():
    raw = b"Content-Type: multipart/mixed; boundary=q\r\n\r\n--q\r\nContent-Type: text/x\r\n--q--\r\n"
    rec = parse(raw)
    part = {p["path"]: p for p in rec.parts}["1"]
    assert (part["type"], part["body"], part["body_start"], part["body_end"]) == ("text/x", b"", 72, 72)


def test_oversized_header_block_becomes_body_and_parsing_goes_on():
    big = b"".join(b"X-Filler-%06d: %s\r\n" % (i, b"v" * 100) for i in range(3000))
    raw = b"Content-Type: multipart/mixed; boundary=q\r\n" + big + b"\r\n--q\r\n\r\npart\r\n--q--\r\n"
    rec = parse(raw, range(0, len(raw), 1000))
    start = rec.events[0]
    assert len(start[7]) <= mime_stream.MAX_HEADERS
    assert start[3] == "multipart" and [p["path"] for p in rec.parts] == ["1", ""]
    one_line = parse(b"Subject: " + b"s" * (mime_stream.MAX_HEADER_BYTES + 10) + b"\r\n\r\nbody")
    assert one_line.events[0][7] == [] and one_line.parts[0]["body"].endswith(b"\r\n\r\nbody")


def test_nesting_beyond_the_depth_limit_becomes_body():
    depth = mime_stream.MAX_DEPTH + 5
    raw = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) for i in range(depth))
    raw += b"\r\ninnermost\r\n" + b"".join(b"--b%d--\r\n" % i for i in reversed(range(depth)))
    rec = parse(raw)
    deepest = max(rec.parts, key=lambda p: p["path"].count("."))
    assert deepest["path"].count(".") == mime_stream.MAX_DEPTH - 1
    assert deepest["kind"] == "leaf" and b"innermost" in deepest["body"]
    assert parse(raw, range(0, len(raw), 7)).events == rec.events


def test_outer_boundary_closes_an_unterminated_inner_multipart():
    raw = (
        b"Content-Type: multipart/mixed; boundary=out\r\n\r\n--out\r\n"
        b"Content-Type: multipart/alternative; boundary=in\r\n\r\n--in\r\n\r\ninner\r\n"
        b"--out\r\n\r\nsecond\r\n--out--\r\n"
    )
    rec = parse(raw)
    assert tree_of(rec) == [
        ("", True, "multipart/mixed", None),
        ("1", False, "multipart/alternative", None),
        ("1.1", False, "text/plain", b"inner"),
        ("2", False, "text/plain", b"second"),
    ]


def test_lines_of_text_and_message_rfc822_parts():
    inner = b"Subject: s\r\n\r\nl1\r\nl2"
    raw = (
        b"Content-Type: multipart/mixed; boundary=q\r\n\r\n--q\r\n\r\na\r\nb\r\n\r\n--q\r\n"
        b"Content-Type: message/rfc822\r\n\r\n" + inner + b"\r\n--q--\r\n"
    )
    ends = {(e[1], e[2]): e for e in parse(raw).events if e[0] == "end"}
    assert ends[("1", False)][4:] == (6, 2)  # "a\r\nb\r\n": the last CRLF is the delimiter's
    assert ends[("2", False)][4:] == (len(inner), 3)  # line feeds, as Dovecot counts
    assert ends[("2", True)][4:] == (6, 1)
    assert ends[("", True)][5] is None  # multipart: not counted


def test_long_dash_lines_are_body():
    line = b"--" + b"q" * (mime_stream.MAX_BOUNDARY_LINE + 10)
    raw = b"Content-Type: multipart/mixed; boundary=q\r\n\r\n--q\r\n\r\n" + line + b"\r\n--q--\r\n"
    rec = parse(raw, range(0, len(raw), 100))
    assert {p["path"]: p["body"] for p in rec.parts}["1"] == line


def test_lines_of_a_large_text_body_whatever_the_chunks():
    body = b"".join(b"line %d %s\r\n" % (i, b"x" * (i % 90)) for i in range(20000)) + b"no line end"
    raw = b"Content-Type: multipart/mixed; boundary=q\r\n\r\n--q\r\n\r\n" + body + b"\r\n--q--\r\n"
    for cuts in ((), range(0, len(raw), 100_000), range(0, len(raw), 70_001)):
        ends = {e[1]: e for e in parse(raw, cuts).events if e[0] == "end"}
        assert ends["1"][4:] == (len(body), body.count(b"\n"))


def test_listeners_share_one_parser():
    first, second = Recorder(), Recorder()
    parser = MimeStreamParser(Listeners(first, second))
    parser.feed(PGP_MIME)
    parser.close()
    assert first.events == second.events == parse(PGP_MIME).events
    assert first.parts == second.parts


def test_parts_beyond_the_limit_become_body_of_the_last_one(monkeypatch):
    monkeypatch.setattr(mime_stream, "MAX_PARTS", 20)
    raw = (
        b"Content-Type: multipart/mixed; boundary=q\r\n\r\n"
        + b"".join(b"--q\r\n\r\npart %d\r\n" % i for i in range(50))
        + b"--q--\r\nepilogue\r\n"
    )
    rec = parse(raw, range(0, len(raw), 33))
    assert len(rec.parts) == 20 and rec.parts[-1]["path"] == ""
    last = rec.parts[-2]
    assert last["path"] == "19" and last["body"].startswith(b"part 18\r\n--q\r\n") and last["body"].endswith(b"part 49")
