# PGP/MIME signed entities (RFC 3156): a multipart/signed body whose first part is signed exactly
# as transmitted (CRLF line ends, 7-bit, no trailing white space: the signed bytes end before the
# CRLF that precedes the boundary) and whose second part is the detached signature. Builds bytes
# only; the key is passed in as a signing function.
import base64
import os
from email import quoprimime
from typing import Callable

CRLF = "\r\n"


def _boundary(tag: str) -> str:
    return f"=_{tag}_{os.urandom(12).hex()}"


def mixed_part(text: str, attachment: bytes, attachment_type: str, filename: str) -> bytes:
    """A multipart/mixed entity (with its Content-Type header): a quoted-printable text part and a
    base64 attachment; every line short, ASCII, CRLF-terminated."""
    boundary = _boundary("part")
    text_body = quoprimime.body_encode(text.replace("\r\n", "\n"), maxlinelen=76, eol=CRLF)
    encoded = base64.encodebytes(attachment).decode("ascii").replace("\n", CRLF)
    lines = [
        f'Content-Type: multipart/mixed; boundary="{boundary}"', "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: quoted-printable", "",
        text_body.rstrip(CRLF),
        f"--{boundary}",
        f'Content-Type: {attachment_type}; name="{filename}"',
        f'Content-Disposition: attachment; filename="{filename}"',
        "Content-Transfer-Encoding: base64", "",
        encoded.rstrip(CRLF),
        f"--{boundary}--",
    ]
    return CRLF.join(lines).encode("ascii")


def signed_body(signed_part: bytes, sign_detached: Callable[[bytes], str]) -> tuple[str, bytes]:
    """(Content-Type header value, body) of a multipart/signed entity over `signed_part`."""
    if b"\n" in signed_part.replace(b"\r\n", b"") or any(line != line.rstrip() for line in signed_part.split(b"\r\n")):
        raise ValueError("the signed part must be canonical: CRLF line ends, no trailing white space")
    signature = sign_detached(signed_part).replace("\r\n", "\n").strip().replace("\n", CRLF)
    boundary = _boundary("signed")
    body = CRLF.join([
        "This is an OpenPGP/MIME signed message (RFC 3156).",
        f"--{boundary}", ""]).encode("ascii") + signed_part + CRLF.join([
            "", f"--{boundary}",
            'Content-Type: application/pgp-signature; name="signature.asc"',
            "Content-Description: OpenPGP digital signature",
            'Content-Disposition: attachment; filename="signature.asc"', "",
            signature,
            f"--{boundary}--", ""]).encode("ascii")
    content_type = (f'multipart/signed; micalg=pgp-sha256; protocol="application/pgp-signature";'
                    f'{CRLF}\tboundary="{boundary}"')
    return content_type, body
