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
