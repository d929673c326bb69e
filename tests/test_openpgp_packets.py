# The PKESK reader on messages made by real GnuPG: armored, binary, inside base64, fed in pieces of
# any size; hidden recipients, passphrase-only messages, old and new packet headers, and broken input.
import base64

import pytest

from directory.openpgp_armor import SessionPacketReader
from directory.openpgp_packets import WILDCARD_KEY_ID

from gpgutil import Gpg


@pytest.fixture(scope="module")
def gpg():
    g = Gpg()
    g.new_key("alpha <alpha@hub.test>")
    g.new_key("beta <beta@hub.test>")
    yield g
    g.close()


def read(data: bytes, piece: int = 1 << 20, transfer_encoding: str = ""):
    reader = SessionPacketReader(transfer_encoding)
    for i in range(0, len(data), piece):
        reader.feed(data[i : i + piece])
    return reader.close()


@pytest.mark.parametrize("piece", [1, 7, 1 << 20])
def test_armored_message_to_two_recipients(gpg, piece):
    message = gpg.encrypt(b"DICM" * 1000, "alpha@hub.test", "beta@hub.test")
    result = read(message, piece)
    assert result.error is None and result.data_tag == 18
    assert sorted(result.key_ids) == sorted(
        [gpg.encryption_key_id("alpha@hub.test"), gpg.encryption_key_id("beta@hub.test")]
    )


def test_binary_and_base64_transfer_encoding(gpg):
    binary = gpg.encrypt(b"x" * 5000, "alpha@hub.test", armor=False)
    assert binary[0] == 0x84  # GnuPG writes the PKESK with an old-format header
    expected = [gpg.encryption_key_id("alpha@hub.test")]
    assert read(binary, 3).key_ids == expected
    encoded = base64.encodebytes(binary).replace(b"\n", b"\r\n")
    assert read(encoded, 5, "base64").key_ids == expected
    armored_in_base64 = base64.encodebytes(gpg.encrypt(b"y", "alpha@hub.test")).replace(b"\n", b"\r\n")
    assert read(armored_in_base64, 11, " BASE64 ").key_ids == expected


def test_new_format_packet_headers(gpg):
    binary = gpg.encrypt(b"z" * 100, "beta@hub.test", armor=False)
    assert binary[0] == 0x84 and binary[1] < 192  # old format, one-octet length
    body = binary[2:]
    expected = [gpg.encryption_key_id("beta@hub.test")]
    one_octet = bytes([0xC1, binary[1]]) + body
    five_octet = bytes([0xC1, 0xFF]) + binary[1].to_bytes(4, "big") + body
    old_four_octet = bytes([0x86]) + binary[1].to_bytes(4, "big") + body
    for variant in (one_octet, five_octet, old_four_octet):
        result = read(variant, 2)
        assert result.key_ids == expected and result.data_tag == 18, variant[:8]


def test_hidden_recipient_and_passphrase_only(gpg):
    hidden = read(gpg.encrypt(b"a", "alpha@hub.test", extra=("--throw-keyids",)))
    assert hidden.key_ids == [WILDCARD_KEY_ID] and hidden.error is None
    symmetric = gpg.run("--symmetric", "--armor", "--passphrase", "pw", "--output", "-", input=b"b").stdout
    result = read(symmetric)
    assert result.key_ids == [] and result.passphrase_packets == 1 and result.data_tag == 18


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"hello world\r\n", "neither an ASCII-armored PGP MESSAGE nor binary"),
        (b"-----BEGIN PGP MESSAGE-----\r\n\r\n!!!!\r\n", "invalid base64"),
        (b"-----BEGIN PGP MESSAGE-----\r\n\r\n-----END PGP MESSAGE-----\r\n", "ends before its encrypted data"),
        (bytes([0x84, 0x05, 3, 1, 2]), "ends before its encrypted data"),
        (bytes([0x84, 0x03, 9, 9, 9, 0xD2, 0x01, 0x01]), "malformed public-key"),
        (bytes([0xB4, 0x01, 0x00]), "unexpected OpenPGP packet (tag 13)"),
    ],
)
def test_broken_input_gets_a_reason(data, reason):
    result = read(data)
    assert result.error is not None and reason in result.error, result


def test_nothing_may_follow_the_message(gpg):
    """The whole message is checked: text after the armor, a second armored message, a clear
    packet after the encrypted data packet are refused (they would travel in the clear)."""
    message = gpg.encrypt(b"q", "alpha@hub.test")
    reader = SessionPacketReader()
    reader.feed(message)
    assert reader.result.complete
    reader.feed(b"anything after the armored message" * 1000)
    assert "after the end of the armored message" in reader.close().error
    assert "after the end" in read(message + message).error
    binary = gpg.encrypt(b"q", "alpha@hub.test", armor=False)
    literal = bytes([0xCB, 0x0A]) + b"b\x00\x00\x00\x00\x00DICM"  # a clear literal data packet
    assert read(binary).error is None
    assert "data after the encrypted data packet" in read(binary + literal).error
    armored = base64.encodebytes(binary + literal).replace(b"\n", b"\r\n")
    assert (
        "data after the encrypted data packet"
        in read(b"-----BEGIN PGP MESSAGE-----\r\n\r\n" + armored + b"-----END PGP MESSAGE-----\r\n").error
    )
    endless = SessionPacketReader()
    endless.feed(b"-----BEGIN PGP MESSAGE-----\r\nComment: x\r\n")
    for _ in range(100):
        endless.feed(b"Comment: " + b"y" * 70 + b"\r\n")
    assert endless.result.error is None
    for _ in range(4000):
        endless.feed(b"Comment: " + b"y" * 70 + b"\r\n")
    assert "KB of ASCII armor header lines" in endless.close().error


# ---- the fast paths against a reference that decodes everything -------------------------------
# Base64Feed checks base64 text without copying it and computes where characters are when lines
# are of one length; PacketStream.walk() looks at one byte per partial-length chunk header. Both
# must agree with a plain reading of the whole decoded message on random messages, text layouts
# and feed sizes, broken ones included.


def _reference(binary: bytes):
    """(key IDs, data tag) when binary is a well-formed encrypted message (new-format headers,
    as _random_message makes them), else None: reads every byte."""
    pos, key_ids = 0, []
    while pos < len(binary):
        header = binary[pos]
        if header & 0xC0 != 0xC0:
            return None
        tag, pos = header & 0x3F, pos + 1
        if tag == 1:
            if pos >= len(binary) or binary[pos] >= 192 or pos + 1 + binary[pos] > len(binary):
                return None
            body = binary[pos + 1 : pos + 1 + binary[pos]]
            if len(body) < 10 or body[0] != 3:
                return None
            key_ids.append(body[1:9].hex().upper())
            pos += 1 + len(body)
            continue
        if tag != 18:
            return None
        while True:  # the chunks of the data packet
            if pos >= len(binary):
                return None
            octet = binary[pos]
            if 224 <= octet < 255:
                pos += 1 + (1 << (octet & 0x1F))
                continue
            if octet < 192:
                size, length = 1, octet
            elif octet < 224:
                if pos + 2 > len(binary):
                    return None
                size, length = 2, ((octet - 192) << 8) + binary[pos + 1] + 192
            else:
                if pos + 5 > len(binary):
                    return None
                size, length = 5, int.from_bytes(binary[pos + 1 : pos + 5], "big")
            return (key_ids, 18) if pos + size + length == len(binary) else None
    return None


def _random_message(rng) -> bytes:
    parts = []
    for _ in range(rng.randint(1, 3)):
        body = bytes([3]) + rng.randbytes(8) + bytes([18]) + rng.randbytes(rng.randint(1, 60))
        parts.append(bytes([0xC1, len(body)]) + body)
    parts.append(b"\xd2")
    for _ in range(rng.randint(0, 12)):
        power = rng.choice([0, 1, 2, 3, 5, 9, 10, 13])
        parts += [bytes([224 + power]), rng.randbytes(1 << power)]
    last = rng.choice([0, 1, 100, 191, 192, 700, 8383, 8384, 20000])
    if last < 192:
        parts.append(bytes([last]))
    elif last < 8384:
        parts.append(bytes([192 + ((last - 192) >> 8), (last - 192) & 0xFF]))
    else:
        parts.append(b"\xff" + last.to_bytes(4, "big"))
    parts.append(rng.randbytes(last))
    binary = b"".join(parts)
    damage = rng.random()
    if damage < 0.1:
        binary = binary[: rng.randrange(len(binary))]
    elif damage < 0.2:
        binary += rng.randbytes(rng.randint(1, 3))
    elif damage < 0.3:
        spot = rng.randrange(len(binary))
        binary = binary[:spot] + bytes([rng.randrange(256)]) + binary[spot + 1 :]
    return binary


def _random_text(rng, binary: bytes) -> bytes:
    """binary as base64 lines of one random length (sometimes ragged, with blank lines or
    trailing blanks), CRLF or LF."""
    text = base64.b64encode(binary)
    eol = rng.choice([b"\r\n", b"\n", b" \r\n", b"\t\n"])
    width = rng.choice([4, 16, 63, 64, 76, 77, 100, 1000])
    lines = [text[i : i + width] for i in range(0, len(text), width)]
    if rng.random() < 0.2:
        cuts = [rng.randint(1, len(line)) for line in lines]
        lines = [line[:cut] + b"\r\n" + line[cut:] for line, cut in zip(lines, cuts)]
    if rng.random() < 0.2:
        lines.insert(rng.randint(0, len(lines)), b"")
    return eol.join(lines) + eol


def _pieces(rng, data: bytes):
    """data in pieces of 1 to `size` bytes. With the tiny sizes, runs of tiny pieces (up to 300
    bytes) alternate with one piece of up to 4 KB: every kind of boundary is still cut many times
    in a message, at a tenth of the feed calls of tiny pieces all through (~100 KB messages)."""
    size = rng.choice([1, 3, 7, 64, 1000, 8191, 65536, 1 << 20])
    pos, run_end = 0, 0
    while pos < len(data):
        if size > 7 or pos < run_end:
            step = rng.randint(1, size)
        elif run_end and rng.random() < 0.5:
            step, run_end = rng.randint(1, 4096), 0
        else:
            step, run_end = rng.randint(1, size), pos + rng.randint(1, 300)
        yield data[pos : pos + step]
        pos += step


def _expect(binary: bytes, result) -> None:
    expected = _reference(binary)
    if expected is None:
        assert result.error is not None
    else:
        assert result.error is None, result.error
        assert (result.key_ids, result.data_tag) == expected


@pytest.mark.parametrize("seed", range(40))
def test_fast_paths_agree_with_decoding_everything(seed):
    import random

    rng = random.Random(seed)
    for _ in range(25):
        binary = _random_message(rng)
        text = _random_text(rng, binary)
        armored = b"-----BEGIN PGP MESSAGE-----\r\n\r\n" + text + b"-----END PGP MESSAGE-----\r\n"
        if rng.random() < 0.1:  # a character outside the alphabet in the base64 text
            spot = rng.randrange(len(text))
            text = text[:spot] + b"*" + text[spot:]
            armored = b"-----BEGIN PGP MESSAGE-----\r\n\r\n" + text + b"-----END PGP MESSAGE-----\r\n"
            binary = b""  # never a well-formed message
        for data, encoding in ((armored, ""), (text, "base64"), (binary, "")):
            if not data and encoding == "":
                continue
            reader = SessionPacketReader(encoding)
            for piece in _pieces(rng, data):
                reader.feed(piece)
            _expect(binary, reader.close())
