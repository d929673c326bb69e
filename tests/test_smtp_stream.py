# Unit and property tests of the DATA decoder and the streaming scanners (in memory, no sockets).
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.smtp.message_scan import DotLineScanner, HeaderScanner
from relay.smtp.stream import DataDecoder, dot_stuff_bytes


def decode(wire: bytes, cuts: list[int]) -> tuple[bytes, DataDecoder, bytes]:
    """Feed `wire` cut at `cuts`; return (decoded, decoder, bytes after the terminator)."""
    decoder = DataDecoder()
    out = []
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    for a, b in zip(points, points[1:]):
        out.append(decoder.feed(wire[a:b]))
        if decoder.done:
            return b"".join(out), decoder, decoder.leftover + wire[b:]
    return b"".join(out), decoder, b""


lines = st.lists(
    st.sampled_from([b"", b".", b"..", b".x", b"x.", b"\r", b"\n", b"abc", b". ", b"\r\n."]), max_size=12
).map(lambda parts: b"".join(parts))
messages = st.lists(lines, max_size=12).map(lambda ls: b"".join(line + b"\r\n" for line in ls))


@settings(max_examples=600, deadline=None)
@given(
    message=messages,
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
    trailer=st.binary(max_size=20),
)
def test_any_dot_stuffed_message_cut_anywhere_decodes_to_the_original(message, cuts, trailer):
    wire = dot_stuff_bytes(message) + trailer
    decoded, decoder, rest = decode(wire, cuts)
    assert decoder.done
    assert decoded == message
    # bytes after the terminator are handed back untouched (pipelined commands)
    assert rest == trailer
    # a line starts with "." after a CRLF or a bare LF (POP3 clients read lines either way)
    assert decoder.dot_lines == (message.startswith(b".") or b"\n." in message)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=10))
def test_random_bytes_never_crash_and_only_crlf_dot_crlf_ends(data, cuts):
    decoded, decoder, _ = decode(data, cuts)
    ends = data.startswith(b".\r\n") or b"\r\n.\r\n" in data
    assert decoder.done == ends


def test_bare_lf_dot_lf_does_not_end_data():
    decoder = DataDecoder()
    assert decoder.feed(b"a\n.\nb\r\n") == b"a\n.\nb"
    assert not decoder.done
    assert decoder.feed(b".\r\n") == b"\r\n"
    assert decoder.done


def test_empty_message_and_byte_by_byte():
    decoder = DataDecoder()
    out = b"".join(decoder.feed(bytes([b])) for b in b".\r\n")
    assert decoder.done and out == b""
    wire = b"..a\r\nb\r\n.\r\nQUIT\r\n"
    decoder = DataDecoder()
    out = b""
    for i in range(len(wire)):
        out += decoder.feed(wire[i : i + 1])
        if decoder.done:
            break
    assert out == b".a\r\nb\r\n" and decoder.dot_lines
    assert decoder.leftover == b""  # fed byte by byte: nothing past the terminator was given yet


@settings(max_examples=300, deadline=None)
@given(message=messages, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=10))
def test_dot_line_scanner_matches_a_whole_scan(message, cuts):
    scanner = DotLineScanner()
    points = sorted({c % (len(message) + 1) for c in cuts} | {0, len(message)})
    for a, b in zip(points, points[1:]):
        scanner.feed(message[a:b])
    assert scanner.found == (message.startswith(b".") or b"\n." in message)


def test_header_scanner_reads_study_headers_across_chunks():
    message = (
        b"Message-ID: <abc@site>\r\nX-TELEMEDICINE-SETID: 1.2.840.1\r\nX-Telemedicine-Setpart: 3\r\n"
        b"X-TELEMEDICINE-SETTOTAL: 330\r\n\r\nbody\r\n"
    )
    for cut in range(len(message)):
        scanner = HeaderScanner()
        scanner.feed(message[:cut])
        scanner.feed(message[cut:])
        scanner.close()
        assert (scanner.message_id, scanner.set_id, scanner.set_part, scanner.set_total) == (
            "<abc@site>",
            "1.2.840.1",
            3,
            330,
        )


def test_header_scanner_is_bounded_and_tolerates_garbage():
    scanner = HeaderScanner()
    scanner.feed(b"X-TELEMEDICINE-SETPART: many\r\n" + b"A" * 600_000)
    assert scanner.done
    scanner.close()
    assert scanner.set_part is None and scanner.message_id is None


def _header_facts_oracle(message: bytes):
    """What the header scanner must find: the header block (up to the blank line, or all) in its
    first MAX_HEADER_BYTES, split in CRLF lines, first occurrence of each wanted field, unfolded."""
    from relay.smtp.message_scan import MAX_HEADER_BYTES

    end = message.find(b"\r\n\r\n")
    block = b"" if message.startswith(b"\r\n") else message if end < 0 else message[: end + 2]
    block = block[:MAX_HEADER_BYTES]
    fields, name = {}, None
    for line in block.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if name is not None:
                fields[name] += " " + line.decode("utf-8", "replace")
            continue
        key, colon, value = line.partition(b":")
        key = key.strip().lower().decode("latin-1")
        name = None
        if (
            colon
            and key in ("message-id", "x-telemedicine-setid", "x-telemedicine-setpart", "x-telemedicine-settotal")
            and key not in fields
        ):
            name = key
            fields[name] = value.decode("utf-8", "replace")

    def clean(key, limit):
        text = " ".join(fields.get(key, "").split())[:limit]
        return text or None

    def small_int(key):
        text = clean(key, 20)
        return int(text) if text is not None and text.isdigit() else None

    return (
        clean("message-id", 998),
        clean("x-telemedicine-setid", 256),
        small_int("x-telemedicine-setpart"),
        small_int("x-telemedicine-settotal"),
    )


_header_line = st.one_of(
    st.sampled_from(
        [
            b"Message-ID: <a@b>",
            b"message-id:<c@d>",
            b"X-TELEMEDICINE-SETID: 1.2.3",
            b" folded more",
            b"\tx",
            b"X-Telemedicine-Setpart: 7",
            b"X-TELEMEDICINE-SETTOTAL:  12 ",
            b"Subject: s",
            b"X-TELEMEDICINE-SETPART: 1 2",
            b"Message-ID :\xff\xfe",
            b"no colon",
            b"",
            b" ",
            b"X-TELEMEDICINE-SETID: " + b"9" * 300,
            b"Message-ID: " + b"x " * 800,
        ]
    ),
    st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")),
)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(_header_line, max_size=12),
    st.sampled_from([b"\r\n", b"", b"\r\n\r\nbody\r\n"]),
    st.lists(st.integers(1, 200), max_size=6),
)
def test_header_scanner_matches_the_block_parser_at_any_chunking(lines, tail, cuts):
    message = b"\r\n".join(lines) + tail
    scanner = HeaderScanner()
    start = 0
    for cut in cuts:
        scanner.feed(message[start : start + cut])
        start += cut
    scanner.feed(message[start:])
    scanner.close()
    assert (scanner.message_id, scanner.set_id, scanner.set_part, scanner.set_total) == _header_facts_oracle(message)


def test_header_scanner_keeps_little_of_a_huge_header_line():
    scanner = HeaderScanner()
    scanner.feed(b"Message-ID: <" + b"m" * 100)
    for _ in range(40):  # 200 KB of one line, fed in pieces
        scanner.feed(b"m" * 5000)
        assert len(scanner._partial) <= 64 * 1024 + 1
    scanner.feed(b">\r\n\r\n")
    assert scanner.done and scanner.message_id.startswith("<mmm") and len(scanner.message_id) == 998
