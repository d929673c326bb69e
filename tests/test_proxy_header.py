# The PROXY protocol header parser (relay/proxy_header.py) on exact wire bytes: v2 (signature,
# version/command, family, lengths, LOCAL), v1, and that it never asks for a byte past the header.
import pytest

from relay.proxy_header import MAX_V2_LENGTH, ProxyHeader, ProxyHeaderError, ProxyHeaderReader

SIG = b"\r\n\r\n\x00\r\nQUIT\n"

# PROXY TCP4 192.0.2.10:51000 -> 198.51.100.1:25, as HAProxy's send-proxy-v2 writes it
V2_TCP4 = SIG + b"\x21\x11\x00\x0c" + bytes([192, 0, 2, 10, 198, 51, 100, 1]) + b"\xc7\x38\x00\x19"
V2_TCP6 = (
    SIG
    + b"\x21\x21\x00\x24"
    + bytes.fromhex("20010db8000000000000000000000001")
    + bytes.fromhex("20010db8000000000000000000000002")
    + b"\x01\xbb\x00\x8f"
)
V2_LOCAL = SIG + b"\x20\x00\x00\x00"


def read_all(data: bytes, step: int | None = None) -> tuple[ProxyHeader, int]:
    """Feed `data` as a socket would (at most wanted() bytes, or `step` at a time); the header and
    how many bytes it took."""
    reader = ProxyHeaderReader()
    used = 0
    while True:
        want = reader.wanted()
        assert want > 0
        chunk = data[used : used + min(want, step or want)]
        assert chunk, "the reader asked for more bytes than the header has"
        used += len(chunk)
        header = reader.feed(chunk)
        if header is not None:
            assert reader.wanted() == 0
            return header, used


@pytest.mark.parametrize("step", [None, 1, 5])
def test_v2_tcp4_and_the_bytes_after_it_are_not_read(step):
    header, used = read_all(V2_TCP4 + b"EHLO gateway\r\n", step)
    assert header == ProxyHeader(2, ("192.0.2.10", 51000), ("198.51.100.1", 25))
    assert used == len(V2_TCP4) == 28
    assert not header.local


def test_v2_tcp6():
    header, used = read_all(V2_TCP6 + b"\x16\x03\x01")  # a TLS ClientHello follows
    assert header == ProxyHeader(2, ("2001:db8::1", 443), ("2001:db8::2", 143))
    assert used == len(V2_TCP6)


def test_v2_local_is_a_health_check_with_no_client_address():
    header, used = read_all(V2_LOCAL + b"rest")
    assert header.local and header.source is None and used == 16


def test_v2_local_may_carry_addresses_which_are_ignored():
    local = SIG + b"\x20\x11\x00\x0c" + bytes(12)
    header, used = read_all(local)
    assert header.local and used == 28


def test_v2_tlvs_after_the_addresses_are_skipped():
    tlv = b"\x05\x00\x04abcd"  # PP2_TYPE_UNIQUE_ID
    data = SIG + b"\x21\x11\x00\x13" + bytes([10, 0, 0, 7, 10, 0, 0, 1]) + b"\x00\x50\x00\x19" + tlv
    header, used = read_all(data + b"next")
    assert header.source == ("10.0.0.7", 80) and used == len(data)


def test_v2_unspec_family_uses_the_connection_addresses():
    header, _ = read_all(SIG + b"\x21\x00\x00\x00")
    assert header.local


def test_v1_tcp4_read_byte_by_byte_up_to_the_crlf():
    line = b"PROXY TCP4 192.0.2.10 198.51.100.1 51000 25\r\n"
    header, used = read_all(line + b"EHLO x\r\n")
    assert header == ProxyHeader(1, ("192.0.2.10", 51000), ("198.51.100.1", 25))
    assert used == len(line)


def test_v1_tcp6_and_unknown():
    header, _ = read_all(b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 110\r\n")
    assert header.source == ("2001:db8::1", 4000)
    header, used = read_all(b"PROXY UNKNOWN\r\nUSER x\r\n")
    assert header.local and used == 15
    header, _ = read_all(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n")
    assert header.local


def feed_until_error(data: bytes) -> str:
    reader = ProxyHeaderReader()
    used = 0
    with pytest.raises(ProxyHeaderError) as caught:
        while used < len(data):
            chunk = data[used : used + reader.wanted()]
            used += len(chunk)
            reader.feed(chunk)
    return str(caught.value)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"EHLO gateway.example\r\n", "no PROXY protocol header"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03abcdefgh", "no PROXY protocol header"),  # TLS first
        (SIG[:6] + b"X" + SIG[7:] + b"\x21\x11\x00\x0c", "no PROXY protocol header"),  # a bad signature
        (SIG + b"\x11\x11\x00\x0c" + bytes(12), "version 1"),
        (SIG + b"\x22\x11\x00\x0c" + bytes(12), "unknown command 2"),
        (SIG + b"\x21\x41\x00\x0c" + bytes(12), "unknown address family 4"),
        (SIG + b"\x21\x12\x00\x0c" + bytes(12), "not a TCP stream"),
        (SIG + b"\x21\x11\x00\x08" + bytes(8), "too short for its addresses"),
        (SIG + b"\x21\x21\x00\x0c" + bytes(12), "too short for its addresses"),
        (SIG + b"\x21\x31\x00\xd8" + bytes(216), "unix socket"),
        (SIG + b"\x21\x11\xff\xff", f"at most {MAX_V2_LENGTH}"),
        (b"PROXY TCP4 192.0.2.10 198.51.100.1 51000\r\n", "malformed PROXY v1"),
        (b"PROXY UDP4 192.0.2.10 198.51.100.1 1 2\r\n", "malformed PROXY v1"),
        (b"PROXY TCP4 2001:db8::1 198.51.100.1 1 2\r\n", "bad TCP4 address"),
        (b"PROXY TCP4 192.0.2.10 198.51.100.1 65536 25\r\n", "bad port"),
        (b"PROXY TCP4 192.0.2.10 198.51.100.1 025 25\r\n", "bad port"),
        (b"PROXY TCP4 192.0.2.10 198.51.100.1 -1 25\r\n", "bad port"),
        (b"PROXY TCP4 192.0.2.\xff 198.51.100.1 1 25\r\n", "not in ASCII"),
        (b"PROXY " + b"A" * 200, "longer than 107 bytes"),
    ],
)
def test_malformed_headers_are_one_line_errors(data, message):
    assert message in feed_until_error(data)


def test_a_long_v1_line_is_refused_at_107_bytes_without_reading_further():
    reader = ProxyHeaderReader()
    data = b"PROXY " + b"1" * 500
    used = 0
    with pytest.raises(ProxyHeaderError):
        while True:
            chunk = data[used : used + reader.wanted()]
            used += len(chunk)
            reader.feed(chunk)
    assert used == 107


def test_feeding_more_than_wanted_is_a_caller_bug():
    reader = ProxyHeaderReader()
    with pytest.raises(ValueError):
        reader.feed(V2_TCP4)  # wanted() is 15 at first
