# relay.mime.decode.decoder_for: a decoder for each known Content-Transfer-Encoding, an error for
# any other (the policy refuses unknown encodings before it asks for a decoder).
import pytest

from relay.mime.decode import KNOWN_ENCODINGS, decoder_for


def test_decoder_for_known_encodings_only() -> None:
    assert decoder_for("base64").feed(b"aGVs\nbG8=") == b"hello"
    assert decoder_for("quoted-printable").feed(b"a=3Db\n") == b"a=b\n"
    for encoding in KNOWN_ENCODINGS:
        assert decoder_for(encoding).close() == b""
    with pytest.raises(ValueError):
        decoder_for("x-unknown")
