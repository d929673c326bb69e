# Unit and property tests of the DATA decoder and the streaming scanners (in memory, no sockets).
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.message_scan import DotLineScanner, HeaderScanner
from relay.smtp_stream import DataDecoder, dot_stuff_bytes


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


lines = st.lists(st.sampled_from([b"", b".", b"..", b".x", b"x.", b"\r", b"\n", b"abc", b". ", b"\r\n."]),
                 max_size=12).map(lambda parts: b"".join(parts))
messages = st.lists(lines, max_size=12).map(lambda ls: b"".join(line + b"\r\n" for line in ls))


@settings(max_examples=600, deadline=None)
@given(message=messages, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
       trailer=st.binary(max_size=20))
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
        out += decoder.feed(wire[i:i + 1])
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
    message = (b"Message-ID: <abc@site>\r\nX-TELEMEDICINE-SETID: 1.2.840.1\r\nX-Telemedicine-Setpart: 3\r\n"
               b"X-TELEMEDICINE-SETTOTAL: 330\r\n\r\nbody\r\n")
    for cut in range(len(message)):
        scanner = HeaderScanner()
        scanner.feed(message[:cut])
        scanner.feed(message[cut:])
        scanner.close()
        assert (scanner.message_id, scanner.set_id, scanner.set_part, scanner.set_total) == (
            "<abc@site>", "1.2.840.1", 3, 330)


def test_header_scanner_is_bounded_and_tolerates_garbage():
    scanner = HeaderScanner()
    scanner.feed(b"X-TELEMEDICINE-SETPART: many\r\n" + b"A" * 600_000)
    assert scanner.done
    scanner.close()
    assert scanner.set_part is None and scanner.message_id is None
