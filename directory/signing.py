# PGP/MIME signed entities (RFC 3156): a multipart/signed body whose first part is signed exactly
# as transmitted (CRLF line ends, 7-bit, no trailing white space: the signed bytes end before the
# CRLF that precedes the boundary) and whose second part is the detached signature. Builds bytes
# only; the key is passed in as a signing function.
import base64
import os
from collections.abc import Callable
from email import quoprimime

CRLF = "\r\n"


def _boundary(tag: str) -> str:
    return f"=_{tag}_{os.urandom(12).hex()}"


def mixed_part(text: str, attachments: list[tuple[str, str, bytes]]) -> bytes:
    """A multipart/mixed entity (with its Content-Type header): a quoted-printable text part, then
    each attachment (content type, file name, data): base64, or 7bit when the data is already
    short lines of printable ASCII (an armored key); every line short, ASCII, CRLF-terminated."""
    boundary = _boundary("part")
    text_body = quoprimime.body_encode(text.replace("\r\n", "\n"), maxlinelen=76, eol=CRLF)
    lines = [
        f'Content-Type: multipart/mixed; boundary="{boundary}"',
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: quoted-printable",
        "",
        text_body.rstrip(CRLF),
    ]
    for content_type, filename, data in attachments:
        armored = _is_7bit_text(data)
        body = (
            data.decode("ascii").replace("\n", CRLF)
            if armored
            else (base64.encodebytes(data).decode("ascii").replace("\n", CRLF))
        )
        lines += [
            f"--{boundary}",
            f'Content-Type: {content_type}; name="{filename}"',
            f'Content-Disposition: attachment; filename="{filename}"',
            f"Content-Transfer-Encoding: {'7bit' if armored else 'base64'}",
            "",
            body.rstrip(CRLF),
        ]
    lines.append(f"--{boundary}--")
    return CRLF.join(lines).encode("ascii")


def _is_7bit_text(data: bytes) -> bool:
    """LF-terminated lines of at most 76 printable ASCII characters, none ending in white space."""
    if not data.endswith(b"\n") or b"\r" in data:
        return False
    lines = data[:-1].split(b"\n")
    return all(len(line) <= 76 and line == line.rstrip() and all(32 <= c < 127 for c in line) for line in lines)


def signed_body(signed_part: bytes, sign_detached: Callable[[bytes], str]) -> tuple[str, bytes]:
    """(Content-Type header value, body) of a multipart/signed entity over `signed_part`."""
    if b"\n" in signed_part.replace(b"\r\n", b"") or any(line != line.rstrip() for line in signed_part.split(b"\r\n")):
        raise ValueError("the signed part must be canonical: CRLF line ends, no trailing white space")
    signature = sign_detached(signed_part).replace("\r\n", "\n").strip().replace("\n", CRLF)
    boundary = _boundary("signed")
    body = (
        CRLF.join(["This is an OpenPGP/MIME signed message (RFC 3156).", f"--{boundary}", ""]).encode("ascii")
        + signed_part
        + CRLF.join(
            [
                "",
                f"--{boundary}",
                'Content-Type: application/pgp-signature; name="signature.asc"',
                "Content-Description: OpenPGP digital signature",
                'Content-Disposition: attachment; filename="signature.asc"',
                "",
                signature,
                f"--{boundary}--",
                "",
            ]
        ).encode("ascii")
    )
    content_type = (
        f'multipart/signed; micalg=pgp-sha256; protocol="application/pgp-signature";{CRLF}\tboundary="{boundary}"'
    )
    return content_type, body
