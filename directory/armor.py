# OpenPGP ASCII armor (RFC 4880 section 6): binary packets -> armored text with a CRC-24 checksum,
# so that several keys or several signatures can travel as one block (pgpy armors one object at a
# time). Pure functions; never parses or interprets the packets themselves.
import base64

_CRC24_INIT = 0xB704CE
_CRC24_POLY = 0x1864CFB


def _table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 16
        for _ in range(8):
            crc = (crc << 1) ^ (_CRC24_POLY if crc & 0x800000 else 0)
        table.append(crc & 0xFFFFFF)
    return table


_TABLE = _table()


def crc24(data: bytes) -> int:
    crc = _CRC24_INIT
    for byte in data:
        crc = ((crc << 8) & 0xFFFFFF) ^ _TABLE[(crc >> 16) ^ byte]
    return crc


def armor(kind: str, data: bytes, comments: tuple[str, ...] = ()) -> str:
    """`kind` is e.g. "PUBLIC KEY BLOCK" or "SIGNATURE"; LF line ends, 64 columns, no trailing space."""
    body = base64.b64encode(data).decode("ascii")
    lines = [f"-----BEGIN PGP {kind}-----", *(f"Comment: {c}" for c in comments), ""]
    lines += [body[i : i + 64] for i in range(0, len(body), 64)]
    lines.append("=" + base64.b64encode(crc24(data).to_bytes(3, "big")).decode("ascii"))
    lines.append(f"-----END PGP {kind}-----")
    return "\n".join(lines) + "\n"
