# OpenPGP keys and PGP/MIME (RFC 3156 multipart/encrypted) mails as DICOM e-mail gateways send
# them, made with pgpy: throw-away site keys, encryption of an inner MIME entity carrying DICOM
# files, and the reverse (decrypt, list the DICOM files). No I/O beyond what callers pass in;
# must never be used with real keys: the secret keys it writes are unprotected.
from __future__ import annotations

import base64
import binascii
import email
import email.policy
import hashlib
import uuid
import warnings
from email.utils import formatdate
from typing import cast

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import pgpy
    from pgpy.constants import (
        CompressionAlgorithm,
        EllipticCurveOID,
        HashAlgorithm,
        KeyFlags,
        PubKeyAlgorithm,
        SymmetricKeyAlgorithm,
    )

warnings.filterwarnings("ignore", module="pgpy")
CRLF = b"\r\n"


def new_site_key(name: str, address: str) -> pgpy.PGPKey:
    """A P-256 signing key with an ECDH encryption subkey (fast to make, fine for tests)."""
    key = pgpy.PGPKey.new(PubKeyAlgorithm.ECDSA, EllipticCurveOID.NIST_P256)
    key.add_uid(
        pgpy.PGPUID.new(name, comment="mailhub-loadtest throw-away key", email=address),
        usage={KeyFlags.Sign, KeyFlags.Certify},
        hashes=[HashAlgorithm.SHA256],
        ciphers=[SymmetricKeyAlgorithm.AES256],
        compression=[CompressionAlgorithm.Uncompressed],
    )
    sub = pgpy.PGPKey.new(PubKeyAlgorithm.ECDH, EllipticCurveOID.NIST_P256)
    key.add_subkey(sub, usage={KeyFlags.EncryptCommunications, KeyFlags.EncryptStorage})
    return key


def load_key(text: str) -> pgpy.PGPKey:
    key, _ = pgpy.PGPKey.from_blob(text)
    return key


def armor(binary: bytes) -> bytes:
    """ASCII armor without the optional CRC-24 line (RFC 9580 6.1 says not to emit it)."""
    b64 = base64.b64encode(binary)
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return CRLF.join([b"-----BEGIN PGP MESSAGE-----", b"", *lines, b"-----END PGP MESSAGE-----", b""])


def dearmor(text: bytes) -> bytes:
    body = text.split(b"-----BEGIN PGP MESSAGE-----", 1)[1].split(b"-----END PGP MESSAGE-----", 1)[0]
    head, _, data = body.replace(CRLF, b"\n").lstrip(b"\n").partition(b"\n\n")
    if b":" not in head:  # no armor headers: the blank line came later or not at all
        data = body.replace(CRLF, b"\n")
    lines = [ln for ln in data.split(b"\n") if ln and not (ln.startswith(b"=") and len(ln) == 5)]
    return binascii.a2b_base64(b"".join(lines))


def encrypt(public_key, plaintext: bytes) -> bytes:
    msg = pgpy.PGPMessage.new(plaintext, compression=CompressionAlgorithm.Uncompressed)
    return bytes(public_key.encrypt(msg, cipher=SymmetricKeyAlgorithm.AES256))


def decrypt(secret_key, binary: bytes) -> bytes:
    message = secret_key.decrypt(pgpy.PGPMessage.from_blob(binary)).message
    return bytes(message) if not isinstance(message, str) else message.encode()


def _b64_lines(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", CRLF)


def inner_entity(files: list[tuple[str, bytes]]) -> bytes:
    """The MIME entity that gets encrypted: one application/dicom part, or multipart/mixed."""

    def part(name, data):
        return (
            f'Content-Type: application/dicom; name="{name}"\r\nContent-Transfer-Encoding: base64\r\n'
            f'Content-Disposition: attachment; filename="{name}"\r\n\r\n'
        ).encode() + _b64_lines(data)

    if len(files) == 1:
        return part(*files[0])
    boundary = "inner-" + uuid.uuid4().hex
    out = [f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'.encode()]
    for name, data in files:
        out += [f"--{boundary}\r\n".encode(), part(name, data), CRLF]
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out)


def pgp_mime_mail(
    *,
    sender: str,
    recipient: str,
    public_key,
    files: list[tuple[str, bytes]],
    set_id: str,
    set_part: int,
    set_total: int,
    message_id: str,
    subject: str,
) -> bytes:
    """A complete CRLF mail: RFC 3156 multipart/encrypted, telemedicine set headers, MDN request."""
    encrypted = armor(encrypt(public_key, inner_entity(files)))
    boundary = "pgp-" + uuid.uuid4().hex
    headers = (
        f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: {subject}\r\n"
        f"Date: {formatdate(localtime=False)}\r\nMessage-ID: <{message_id}>\r\nMIME-Version: 1.0\r\n"
        f"X-TELEMEDICINE-SETID: {set_id}\r\nX-TELEMEDICINE-SETPART: {set_part}\r\n"
        f"X-TELEMEDICINE-SETTOTAL: {set_total}\r\nDisposition-Notification-To: <{sender}>\r\n"
        f'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted";\r\n'
        f' boundary="{boundary}"\r\n\r\n'
    )
    body = (
        f"This is an OpenPGP/MIME encrypted message (RFC 3156).\r\n--{boundary}\r\n"
        "Content-Type: application/pgp-encrypted\r\nContent-Description: PGP/MIME version identification\r\n"
        f"\r\nVersion: 1\r\n\r\n--{boundary}\r\n"
        'Content-Type: application/octet-stream; name="encrypted.asc"\r\n'
        "Content-Description: OpenPGP encrypted message\r\n"
        'Content-Disposition: inline; filename="encrypted.asc"\r\n\r\n'
    ).encode()
    return headers.encode() + body + encrypted + f"\r\n--{boundary}--\r\n".encode()


def split_mail(raw: bytes) -> tuple[bytes, bytes]:
    """(header block, body) of a CRLF or LF mail."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = raw.find(sep)
        if i >= 0:
            return raw[:i], raw[i + len(sep) :]
    return raw, b""


def body_digest(raw: bytes) -> str:
    """SHA-256 of the body with line ends normalised, unchanged by trace headers a server adds."""
    return hashlib.sha256(split_mail(raw)[1].replace(CRLF, b"\n")).hexdigest()


def dicom_digests(secret_key, raw: bytes) -> list[str]:
    """Decrypt a PGP/MIME mail and return the SHA-256 of each DICOM file in it, in order."""
    body = split_mail(raw)[1]
    start = body.find(b"-----BEGIN PGP MESSAGE-----")
    if start < 0:
        raise ValueError("no PGP message in the mail")
    inner = decrypt(secret_key, dearmor(body[start:]))
    entity = email.message_from_bytes(inner, policy=email.policy.compat32)
    return [
        hashlib.sha256(cast(bytes, p.get_payload(decode=True))).hexdigest()  # a leaf part: its decoded bytes
        for p in entity.walk()
        if p.get_content_type() == "application/dicom"
    ]
