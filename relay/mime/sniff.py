# What the first bytes of a part's decoded content are, whatever its label says: a DICOM file
# (Part 10 preamble and "DICM", or a raw data set without preamble: plausible little-endian
# elements of group 0002/0008 in ascending order), the DICOM JSON or XML models, an archive
# (zip, gzip, tar, bzip2, xz, 7z, zstd), looking into zip and gzip for a DICOM file up to
# MAX_CONTAINER_DEPTH levels, the start of an OpenPGP message, or binary bytes in a text. Pure
# functions of bytes already held (at most SNIFF_BYTES); decompression is bounded to
# INFLATE_BYTES per level.
import re
import struct
import zlib

SNIFF_BYTES = 64 * 1024  # decoded bytes of a part looked at
MAX_CONTAINER_DEPTH = 3  # zip/gzip inside zip/gzip looked into
INFLATE_BYTES = 8 * 1024  # decompressed bytes looked at per level
_TEXT_CONTROLS = bytes(c for c in range(32) if c not in (9, 10, 11, 12, 13, 27)) + b"\x7f"
_VRS = {
    b"AE",
    b"AS",
    b"AT",
    b"CS",
    b"DA",
    b"DS",
    b"DT",
    b"FL",
    b"FD",
    b"IS",
    b"LO",
    b"LT",
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"PN",
    b"SH",
    b"SL",
    b"SQ",
    b"SS",
    b"ST",
    b"SV",
    b"TM",
    b"UC",
    b"UI",
    b"UL",
    b"UN",
    b"UR",
    b"US",
    b"UT",
    b"UV",
}
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_DICOM_JSON = re.compile(rb'"[0-9A-Fa-f]{8}"\s*:\s*\{\s*"vr"\s*:')
_DICOM_XML = re.compile(rb"<\s*(?:NativeDicomModel|DicomAttribute)\b")
_DICOM_NAME = re.compile(r"(?i)(\.(dcm|dicom|dic|dc3)$|^dicomdir$)")
_ARCHIVES = (
    (b"PK\x03\x04", "a zip archive"),
    (b"PK\x05\x06", "a zip archive"),
    (b"PK\x07\x08", "a zip archive"),
    (b"\x1f\x8b", "a gzip file"),
    (b"BZh", "a bzip2 file"),
    (b"\xfd7zXZ\x00", "an xz file"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"\x28\xb5\x2f\xfd", "a zstd file"),
    (b"Rar!\x1a\x07", "a RAR archive"),
)


def dicom_name(name: str) -> bool:
    return bool(_DICOM_NAME.search(name.strip()))


def dicom_signature(head: bytes) -> str | None:
    """How head is recognised as DICOM, or None."""
    if head[128:132] == b"DICM":
        return "DICM file signature"
    if head[:4] == b"DICM" and _raw_dataset(head[4:]):
        return "DICM signature without preamble"
    if _raw_dataset(head):
        return "DICOM data set without preamble"
    if _DICOM_JSON.search(head, 0, 4096):
        return "DICOM JSON model"
    if _DICOM_XML.search(head, 0, 4096):
        return "DICOM XML model"
    return None


def _raw_dataset(head: bytes) -> bool:
    """At least two plausible data elements (little endian, explicit or implicit VR) from the
    start, the first of group 0002 or 0008, tags ascending."""
    for explicit in (True, False):
        pos, previous, count = 0, -1, 0
        while count < 3 and pos + 8 <= len(head):
            group, element = struct.unpack_from("<HH", head, pos)
            tag = group << 16 | element
            if tag <= previous or group & 1 or (count == 0 and group not in (0x0002, 0x0008)):
                break
            if explicit:
                vr = head[pos + 4 : pos + 6]
                if vr not in _VRS:
                    break
                if vr in _LONG_VRS:
                    if head[pos + 6 : pos + 8] != b"\0\0" or pos + 12 > len(head):
                        break
                    length, size = struct.unpack_from("<I", head, pos + 8)[0], 12
                else:
                    length, size = struct.unpack_from("<H", head, pos + 6)[0], 8
            else:
                length, size = struct.unpack_from("<I", head, pos + 4)[0], 8
            if length != 0xFFFFFFFF and (length > 1 << 20 or length & 1):
                break
            count += 1
            previous = tag
            if length == 0xFFFFFFFF:
                break
            pos += size + length
        if count >= 2:
            return True
    return False


def archive_kind(head: bytes) -> str | None:
    for magic, label in _ARCHIVES:
        if head.startswith(magic):
            return label
    if head[257:262] == b"ustar":
        return "a tar archive"
    return None


def dicom_in_archive(head: bytes, depth: int = 0) -> str | None:
    """A DICOM file at the start of a zip entry, gzip stream or tar member (looked into up to
    MAX_CONTAINER_DEPTH levels), as "<how> in <archive>", or None."""
    if depth >= MAX_CONTAINER_DEPTH:
        return None
    kind = archive_kind(head)
    inner, name = None, ""
    if kind == "a zip archive" and head.startswith(b"PK\x03\x04") and len(head) >= 30:
        (method,) = struct.unpack_from("<H", head, 8)
        name_length, extra_length = struct.unpack_from("<HH", head, 26)
        name = head[30 : 30 + name_length].decode("utf-8", "replace")
        data = head[30 + name_length + extra_length :]
        inner = data[:INFLATE_BYTES] if method == 0 else _inflate(data, -15) if method == 8 else None
    elif kind == "a gzip file":
        inner = _inflate(head, 31)
    elif kind == "a tar archive":
        name = head[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        inner = head[512 : 512 + INFLATE_BYTES]
    if kind is None:
        return None
    if name and dicom_name(name):
        return f"{name} in {kind}"
    if inner:
        how = dicom_signature(inner) or dicom_in_archive(inner, depth + 1)
        if how is not None:
            return f"{how} in {kind}"
    return None


def _inflate(data: bytes, wbits: int) -> bytes | None:
    try:
        return zlib.decompressobj(wbits).decompress(data, INFLATE_BYTES)
    except zlib.error:
        return None


def binary_in_text(data: bytes) -> str | None:
    """Why data is not text (NUL or other control bytes than TAB, LF, VT, FF, CR, ESC), or None."""
    if data.find(b"\0") >= 0:
        return "NUL bytes"
    if len(data.translate(None, _TEXT_CONTROLS)) != len(data):
        return "control bytes"
    return None


def openpgp_start(head: bytes) -> bool:
    """head (blank space skipped) starts like an OpenPGP message: armored, or a binary session-key
    or marker packet."""
    content = head.lstrip(b" \t\r\n")
    if content.startswith(b"-----BEGIN PGP MESSAGE-----"):
        return True
    if not content or not content[0] & 0x80:
        return False
    first = content[0]
    tag = first & 0x3F if first & 0x40 else (first >> 2) & 0x0F
    return tag in (1, 3, 10)
