# Receipts (issue 25): a gateway's message disposition notification (RFC 8098: multipart/report;
# report-type=disposition-notification) passes through the hub untouched like any mail; this module
# finds, in its recorded MIME structure (relay/mime/structure.py), the message/disposition-notification
# part and reads from its fields the Original-Message-ID it answers and the Disposition, so that the
# hub can link the receipt to that mail and its study (storage.lifecycle.record_receipt).
# Pure: takes the structure record and the part's bytes; reads at most MAX_FIELDS_BYTES of them.
import base64
import binascii
import quopri
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any

MAX_FIELDS_BYTES = 16 * 1024  # of the disposition-notification part read (its fields are a few lines)
_MAX_VALUE = 998


@dataclass(frozen=True, slots=True)
class Receipt:
    original_message_id: str
    disposition: str  # e.g. "automatic-action/MDN-sent-automatically; displayed"
    final_recipient: str | None = None
    reporting_ua: str | None = None


def disposition_part(structure: dict[str, Any] | None) -> tuple[int, int, str | None] | None:
    """(body start, body end, transfer encoding) in the message of its disposition-notification
    part, if the message is an MDN (the top level is multipart/report with
    report-type=disposition-notification); else None."""
    if not structure or structure.get("type") != "multipart" or structure.get("subtype") != "report":
        return None
    if (structure.get("params") or {}).get("report-type", "").lower() != "disposition-notification":
        return None
    for part in structure.get("parts") or ():
        if part.get("type") == "message" and part.get("subtype") in (
            "disposition-notification",
            "global-disposition-notification",
        ):
            start, end = part.get("bs"), part.get("be")
            if isinstance(start, int) and isinstance(end, int) and 0 <= start <= end:
                return start, end, part.get("encoding")
    return None


def parse_fields(data: bytes, encoding: str | None = None) -> Receipt | None:
    """The receipt the disposition-notification fields tell, or None without an
    Original-Message-ID (a receipt that cannot be linked)."""
    data = data[:MAX_FIELDS_BYTES]
    kind = (encoding or "").lower()
    try:
        if kind == "base64":
            data = base64.b64decode(b"".join(data.split()), validate=False)
        elif kind == "quoted-printable":
            data = quopri.decodestring(data)
    except (binascii.Error, ValueError):
        return None
    fields = BytesHeaderParser(policy=compat32).parsebytes(data.lstrip(b"\r\n"))
    original = _value(fields.get("Original-Message-ID"))
    if not original:
        return None
    return Receipt(
        original,
        _value(fields.get("Disposition")) or "unknown",
        _value(fields.get("Final-Recipient")),
        _value(fields.get("Reporting-UA")),
    )


def _value(raw: object) -> str | None:
    if raw is None:
        return None
    text = " ".join(str(raw).split())[:_MAX_VALUE]
    return text or None
