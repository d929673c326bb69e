# Self-describing blobs: the envelope record stored with every mail, before its 250, so that the
# index can be rebuilt from the blob store (storage/rebuild.py). A record is compact JSON: queue ID,
# arrival time, size, SHA-256, dot-lines flag, envelope sender and sending site, local deliveries
# (site id, recipient, site name), remote recipients, study headers, client address, MIME
# structure, and for a packed mail the group commit it belongs to (seq, attempt; storage/ledger.py).
#   pack:        frames back to back: header (magic MHF1, record length, message length, CRC-32 of
#                the record; 20 bytes), record, message bytes (the index's blob_offset points here)
#   single file: message bytes, record, trailer (record length, message length, CRC-32, magic
#                MHT1; 20 bytes) at the very end; the message starts at offset 0
# Pure encoding and reading; no index, no event loop. Must never trust a length it read without
# checking it against the file's size and the record's CRC.
import json
import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .records import Delivery, MessageMeta

FRAME_MAGIC = b"MHF1"
TRAILER_MAGIC = b"MHT1"
_FRAME = struct.Struct(">4sIQI")  # magic, record length, message length, crc32(record)
_TRAILER = struct.Struct(">IQI4s")  # record length, message length, crc32(record), magic
HEADER_SIZE = _FRAME.size  # == _TRAILER.size == 20
MAX_RECORD = 16 * 1024 * 1024  # a longer record length is damage, not a record
_SCAN_STEP = 1 << 20  # bytes read at a time when looking for the next frame


_ENCODE = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode  # ASCII: any text goes


def structure_json(meta: MessageMeta) -> str:
    """The MIME structure as the index stores it (messages.structure), "null" when unknown."""
    return "null" if meta.structure is None else _ENCODE(meta.structure)


def record(
    queue_id: str,
    size: int,
    received_at: float,
    sha256: str,
    meta: MessageMeta,
    deliveries: Iterable[Delivery],
    remote: Iterable[str],
    structure: str,
    **batch: Any,
) -> bytes:
    """The JSON record of one mail (`meta` a storage.MessageMeta, `deliveries` storage.Delivery,
    `structure` its structure_json, spliced in as it is)."""
    doc = {
        "v": 1,
        "q": queue_id,
        "at": received_at,
        "size": size,
        "sha256": sha256,
        "dots": int(meta.dot_lines),
        "from": meta.mail_from,
        "ss": meta.sender_site,
        "sn": meta.sender_name,
        "d": [[d.site_id, d.rcpt, d.site_name] for d in deliveries],
        "r": list(remote),
        "mid": meta.message_id,
        "set": [meta.set_id, meta.set_part, meta.set_total],
        "peer": meta.peer,
    }
    doc.update(batch)
    return (_ENCODE(doc)[:-1] + ',"st":' + structure + "}").encode()


def frame_header(record_bytes: bytes, message_size: int) -> bytes:
    return _FRAME.pack(FRAME_MAGIC, len(record_bytes), message_size, zlib.crc32(record_bytes))


def trailer(record_bytes: bytes, message_size: int) -> bytes:
    """What follows a single-file message: its record and the fixed-size trailer."""
    return record_bytes + _TRAILER.pack(len(record_bytes), message_size, zlib.crc32(record_bytes), TRAILER_MAGIC)


@dataclass
class Found:
    """A mail found in a blob file: its record (None if unreadable) and where its bytes are."""

    record: dict[str, Any] | None
    offset: int  # of the message bytes
    size: int
    frame_offset: int  # where its frame (pack) or its message (single file) begins
    end: int  # where the next frame begins


def has_trailer(fd: int, file_size: int) -> bool:
    return file_size >= HEADER_SIZE and os.pread(fd, 4, file_size - 4) == TRAILER_MAGIC


def read_trailer(fd: int, file_size: int) -> Found | None:
    """The record of a single-file blob, or None if its end is not a whole trailer."""
    if file_size < HEADER_SIZE:
        return None
    length, size, crc, magic = _TRAILER.unpack(os.pread(fd, HEADER_SIZE, file_size - HEADER_SIZE))
    if magic != TRAILER_MAGIC or length > MAX_RECORD or size + length + HEADER_SIZE != file_size:
        return None
    data = os.pread(fd, length, size)
    doc = _decode(data, crc)
    return None if doc is None else Found(doc, 0, size, 0, file_size)


def is_pack(fd: int) -> bool:
    return os.pread(fd, 4, 0) == FRAME_MAGIC


def read_frame(fd: int, offset: int, file_size: int) -> Found | None:
    """The frame at `offset`, or None if there is no whole, intact frame header and record there
    (the message bytes are not read)."""
    if offset + HEADER_SIZE > file_size:
        return None
    magic, length, size, crc = _FRAME.unpack(os.pread(fd, HEADER_SIZE, offset))
    start = offset + HEADER_SIZE + length
    if magic != FRAME_MAGIC or length > MAX_RECORD or start + size > file_size:
        return None
    doc = _decode(os.pread(fd, length, offset + HEADER_SIZE), crc)
    return None if doc is None else Found(doc, start, size, offset, start + size)


def frames(fd: int, start: int, end: int) -> Iterator[Found]:
    """Every frame in [start, end) of a pack, in order. Where a frame cannot be read (damage, a
    torn write) the scan looks for the next intact one; each skipped range is yielded as a Found
    with record None."""
    offset = start
    while offset < end:
        found = read_frame(fd, offset, end)
        if found is not None:
            yield found
            offset = found.end
            continue
        following = _next_frame(fd, offset + 1, end)
        yield Found(None, offset, following - offset, offset, following)
        offset = following


def _next_frame(fd: int, offset: int, end: int) -> int:
    while offset < end:
        block = os.pread(fd, min(_SCAN_STEP + 3, end - offset), offset)
        at = block.find(FRAME_MAGIC)
        while at >= 0:
            if read_frame(fd, offset + at, end) is not None:
                return offset + at
            at = block.find(FRAME_MAGIC, at + 1)
        if len(block) <= 3:
            break
        offset += len(block) - 3
    return end


def _decode(data: bytes, crc: int) -> dict[str, Any] | None:
    if zlib.crc32(data) != crc:
        return None
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("q"), str) else None
