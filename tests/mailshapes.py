# Builders of mail shapes for the encryption policy's tests: DICOM files (Part 10, raw data sets,
# JSON), OpenPGP messages made of synthetic packets (the policy never decrypts, so a session-key
# packet with a chosen key ID and random "ciphertext" is what it must accept), PGP/MIME and other
# MIME structures, transfer encodings written the way odd gateways write them.
import base64
import binascii
import gzip
import io
import os
import struct
import tarfile
import zipfile

KEY = "0FDD75A8550A376D"  # the recipient site's encryption key ID in the tests
OTHER_KEY = "1122334455667788"
CRLF = b"\r\n"


# ---- DICOM ----------------------------------------------------------------------------------------


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0" if vr in (b"UI", b"OB") else b" "
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2sHI", group, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def dicom_dataset(pixels: int = 2000) -> bytes:
    """A small explicit-VR little-endian data set (patient, study, pixel data)."""
    return b"".join(
        [
            _element(0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.2"),
            _element(0x0008, 0x0018, b"UI", b"1.2.826.0.1.3680043.2.1125.1.42"),
            _element(0x0010, 0x0010, b"PN", b"Doe^Jane"),
            _element(0x0010, 0x0020, b"LO", b"PAT-0001"),
            _element(0x0028, 0x0010, b"US", struct.pack("<H", 32)),
            _element(0x7FE0, 0x0010, b"OW", os.urandom(pixels)),
        ]
    )


def dicom_meta() -> bytes:
    group = _element(0x0002, 0x0010, b"UI", b"1.2.840.10008.1.2.1")
    return _element(0x0002, 0x0000, b"UL", struct.pack("<I", len(group))) + group


def dicom_file(pixels: int = 2000) -> bytes:
    """A DICOM Part 10 file: 128-byte preamble, "DICM", meta group, data set."""
    return b"\0" * 128 + b"DICM" + dicom_meta() + dicom_dataset(pixels)


def dicom_raw() -> bytes:
    """A data set without preamble (as some tools store them)."""
    return dicom_dataset()


def dicom_json() -> bytes:
    return (
        b'[{"00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},'
        b' "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]}}]'
    )


def dicom_xml() -> bytes:
    return (
        b'<?xml version="1.0"?>\n<NativeDicomModel>\n<DicomAttribute tag="00100010" vr="PN">'
        b'<PersonName number="1"><Alphabetic><FamilyName>Doe</FamilyName></Alphabetic></PersonName>'
        b"</DicomAttribute>\n</NativeDicomModel>\n"
    )


def zipped(name: str, data: bytes, deflate: bool = True) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED) as archive:
        archive.writestr(name, data)
    return out.getvalue()


def gzipped(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def tarred(name: str, data: bytes) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


# ---- OpenPGP --------------------------------------------------------------------------------------


def _new_packet(tag: int, body: bytes) -> bytes:
    size = len(body)
    if size < 192:
        length = bytes([size])
    elif size < 8384:
        length = bytes([192 + ((size - 192) >> 8), (size - 192) & 0xFF])
    else:
        length = b"\xff" + size.to_bytes(4, "big")
    return bytes([0xC0 | tag]) + length + body


def pkesk(key_id: str = KEY, v6: bool = False) -> bytes:
    if v6:
        fingerprint = bytes.fromhex("AB" * 12 + key_id)
        return _new_packet(1, bytes([6, 21, 4]) + fingerprint + bytes([25]) + os.urandom(80))
    return _new_packet(1, bytes([3]) + bytes.fromhex(key_id) + bytes([18]) + os.urandom(80))


def skesk() -> bytes:
    return _new_packet(3, bytes([4, 9, 3, 8]) + os.urandom(8) + bytes([96]))


def seipd(size: int = 3000, partial: bool = False) -> bytes:
    data = b"\x01" + os.urandom(size)
    if not partial:
        return _new_packet(18, data)
    out, pos = [bytes([0xD2])], 0
    while len(data) - pos > 1024:
        out += [bytes([0xEA]), data[pos : pos + 1024]]  # 1 KB partial chunks
        pos += 1024
    rest = data[pos:]
    out.append(_new_packet(18, rest)[1:])
    return b"".join(out)


def openpgp(
    key_ids=(KEY,),
    size: int = 3000,
    partial: bool = False,
    marker: bool = False,
    passphrase: bool = False,
    v6: bool = False,
    after: bytes = b"",
) -> bytes:
    """A binary OpenPGP message: [marker] PKESKs [SKESK] SEIPD [after]."""
    packets = [b"\xa8\x03PGP"] if marker else []
    packets += [pkesk(key_id, v6) for key_id in key_ids]
    if passphrase:
        packets.append(skesk())
    return b"".join(packets) + seipd(size, partial) + after


def armored(binary: bytes, headers: bytes = b"", crc: bool = True, width: int = 64, eol: bytes = CRLF) -> bytes:
    text = base64.b64encode(binary)
    lines = [text[i : i + width] for i in range(0, len(text), width)]
    if crc:
        lines.append(b"=" + base64.b64encode(binascii.crc32(binary).to_bytes(4, "big")[1:]))
    return eol.join(
        [
            b"-----BEGIN PGP MESSAGE-----",
            *([headers] if headers else []),
            b"",
            *lines,
            b"-----END PGP MESSAGE-----",
            b"",
        ]
    )


def literal_packet(data: bytes) -> bytes:
    return _new_packet(11, b"b\x00\x00\x00\x00\x00" + data)


def signature_block() -> bytes:
    binary = _new_packet(2, bytes([4, 0, 22, 8]) + os.urandom(60))
    text = base64.encodebytes(binary).replace(b"\n", CRLF)
    return b"-----BEGIN PGP SIGNATURE-----\r\n\r\n" + text + b"-----END PGP SIGNATURE-----\r\n"


def key_block(secret: bool = False) -> bytes:
    binary = (
        _new_packet(5 if secret else 6, bytes([4, 0, 0, 0, 0, 22]) + os.urandom(40))
        + _new_packet(13, b"site <site@hub.test>")
        + _new_packet(2, bytes([4, 0x13, 22, 8]) + os.urandom(60))
    )
    text = base64.encodebytes(binary).replace(b"\n", CRLF)
    label = b"PRIVATE KEY BLOCK" if secret else b"PUBLIC KEY BLOCK"
    return b"-----BEGIN PGP " + label + b"-----\r\n\r\n" + text + b"-----END PGP " + label + b"-----\r\n"


# ---- MIME -------------------------------------------------------------------------------------------

HEAD = b"From: alpha@hub.test\r\nTo: beta@hub.test\r\nSubject: study\r\nMIME-Version: 1.0\r\n"


def b64(data: bytes, width: int = 76, eol: bytes = CRLF) -> bytes:
    text = base64.b64encode(data)
    return eol.join(text[i : i + width] for i in range(0, len(text), width)) + eol


def part(content_type: bytes, body: bytes, encoding: bytes | None = None, extra: bytes = b"") -> bytes:
    """A MIME entity: its header fields, an empty line, its body."""
    head = b"Content-Type: " + content_type + CRLF
    if encoding is not None:
        head += b"Content-Transfer-Encoding: " + encoding + CRLF
    return head + extra + CRLF + body


def multipart(
    subtype: bytes,
    parts: list[bytes],
    boundary: bytes = b"b1",
    params: bytes = b"",
    preamble: bytes = b"",
    epilogue: bytes = b"",
) -> bytes:
    """A multipart entity (header and body)."""
    body = (
        preamble
        + b"".join(b"\r\n--" + boundary + CRLF + p for p in parts)
        + b"\r\n--"
        + boundary
        + b"--\r\n"
        + epilogue
    )
    if not preamble:
        body = body[2:]
    return b"Content-Type: multipart/" + subtype + b'; boundary="' + boundary + b'"' + params + CRLF + CRLF + body


def mail(entity: bytes, head: bytes = HEAD) -> bytes:
    return head + entity


def pgp_mime(
    payload: bytes | None = None,
    encoding: bytes | None = None,
    boundary: bytes = b"enc",
    version: bytes = b"Version: 1\r\n",
) -> bytes:
    """The multipart/encrypted entity of RFC 3156 around an OpenPGP message."""
    if payload is None:
        payload = armored(openpgp())
    return (
        b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted";\r\n boundary="'
        + boundary
        + b'"\r\n\r\nThis is an OpenPGP/MIME encrypted message (RFC 4880 and 3156)\r\n--'
        + boundary
        + b"\r\nContent-Type: application/pgp-encrypted\r\nContent-Description: PGP/MIME"
        b" version identification\r\n\r\n"
        + version
        + b"\r\n--"
        + boundary
        + b'\r\nContent-Type: application/octet-stream; name="encrypted.asc"\r\n'
        + (b"Content-Transfer-Encoding: " + encoding + CRLF if encoding else b"")
        + b'Content-Disposition: inline; filename="encrypted.asc"\r\n\r\n'
        + payload
        + b"\r\n--"
        + boundary
        + b"--\r\n"
    )


def dicom_attachment(
    content_type: bytes = b"application/dicom", data: bytes | None = None, name: bytes = b"img.dcm"
) -> bytes:
    data = dicom_file() if data is None else data
    return part(
        content_type + b'; name="' + name + b'"',
        b64(data),
        b"base64",
        b'Content-Disposition: attachment; filename="' + name + b'"\r\n',
    )


def text(body: bytes = b"Hello,\r\nthe study follows.\r\n", subtype: bytes = b"plain") -> bytes:
    return part(b"text/" + subtype + b"; charset=utf-8", body)
