# The reading side of IMAP SEARCH (relay/imap/search.py names the probes): runs in a worker thread,
# reads stored messages with os.pread and answers each probe per message: a header field contains a
# text ("H", FIELD, text), the Date: header's day ("D",), the body or the whole message contains
# octets ("B", octets) / ("T", octets), case-insensitively for ASCII letters. Every octet read counts
# against the command's ScanBudget; past its bytes or its deadline the scan gives up (None).
# Must never: run on the event loop, hold more than one chunk of a body (plus a needle's length) or
# one header block (MAX_HEADER), or read past the message's range in its blob.
from __future__ import annotations

import datetime
import email.utils
import os
import time
from collections.abc import Sequence
from typing import Literal

from relay.imap.events import Probe, ProbeAnswer, ScanBudget
from relay.imap.limits import MAX_HEADER

__all__ = ["scan_messages", "header_contains", "sent_date"]

_CHUNK = 1024 * 1024
_HEADER_READ = 64 * 1024


def scan_messages(
    messages: Sequence[tuple[str | os.PathLike[str], int, int]], probes: tuple[Probe, ...], budget: ScanBudget
) -> list[dict[Probe, ProbeAnswer]] | None:
    """messages: (path, offset in the file, size) each. Returns {probe: answer} per message, or None
    once the budget is spent (bytes or time: its deadline is set)."""
    answers = []
    for path, offset, size in messages:
        assert budget.deadline is not None
        if time.monotonic() > budget.deadline or budget.bytes_left < 0:
            return None
        with open(path, "rb") as f:
            found = _scan_one(f.fileno(), offset, size, probes, budget)
        if found is None:
            return None
        answers.append(found)
    return answers


def _scan_one(
    fd: int, offset: int, size: int, probes: tuple[Probe, ...], budget: ScanBudget
) -> dict[Probe, ProbeAnswer] | None:
    answers: dict[Probe, ProbeAnswer] = {}
    header = b""
    if any(p[0] != "T" for p in probes):
        header = _read_header(fd, offset, size, budget)
        for probe in probes:
            if probe[0] == "H":
                answers[probe] = header_contains(header, probe[1], probe[2])
            elif probe[0] == "D":
                answers[probe] = sent_date(header)
    kind: Literal["B", "T"]
    for kind, start in (("B", len(header)), ("T", 0)):
        needles = [p[1] for p in probes if p[0] == kind]
        if needles:
            hits = _contains(fd, offset + start, size - start, needles, budget)
            if hits is None:
                return None
            answers.update(((kind, needle), needle in hits) for needle in needles)
    return answers


def _read_header(fd: int, offset: int, size: int, budget: ScanBudget) -> bytes:
    """The header block up to and including its blank line (at most MAX_HEADER octets)."""
    data = b""
    limit = min(size, MAX_HEADER)
    while len(data) < limit:
        chunk = os.pread(fd, min(_HEADER_READ, limit - len(data)), offset + len(data))
        if not chunk:
            break
        budget.bytes_left -= len(chunk)
        scan_from = max(0, len(data) - 3)
        data += chunk
        if data.startswith(b"\r\n"):
            return b"\r\n"
        blank = data.find(b"\r\n\r\n", scan_from)
        if blank >= 0:
            return data[: blank + 4]
    return data


def _contains(fd: int, offset: int, length: int, needles: list[bytes], budget: ScanBudget) -> set[bytes] | None:
    """Which needles (lower-case) occur in the range, ignoring ASCII case; None past the budget."""
    assert budget.deadline is not None
    hits: set[bytes] = {n for n in needles if not n}
    keep = max(len(n) for n in needles) - 1
    tail = b""
    done = 0
    while done < length and len(hits) < len(needles):
        if time.monotonic() > budget.deadline or budget.bytes_left <= 0:
            return None
        chunk = os.pread(fd, min(_CHUNK, length - done, budget.bytes_left), offset + done)
        if not chunk:
            break
        done += len(chunk)
        budget.bytes_left -= len(chunk)
        text = tail + chunk.lower()
        hits.update(n for n in needles if n not in hits and n in text)
        tail = text[-keep:] if keep else b""
    return hits


# ---- header fields --------------------------------------------------------------------------------


def _fields(header: bytes, field: str) -> list[str]:
    """Unfolded values of every header field named `field` (upper-case); linear in the header's size
    however many continuation lines a field has."""
    values: list[list[str]] = []
    current = None
    for line in header.decode("utf-8", "replace").split("\r\n"):
        if not line:
            break
        if line[:1] in (" ", "\t"):
            if current is not None:
                current.append(line)
            continue
        name, sep, value = line.partition(":")
        current = None
        if sep and name.strip().upper() == field:
            current = [value]
            values.append(current)
    return ["".join(parts) for parts in values]


def header_contains(header: bytes, field: str, needle: str) -> bool:
    return any(needle in value.lower() for value in _fields(header, field))


def sent_date(header: bytes) -> datetime.date | None:
    values = _fields(header, "DATE")
    if not values:
        return None
    try:
        return email.utils.parsedate_to_datetime(values[0].strip()).date()
    except (TypeError, ValueError, IndexError):
        return None
