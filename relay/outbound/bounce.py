# Delivery status notifications of the outbound relay (RFC 3464): a multipart/report with a
# human-readable part, a message/delivery-status part and the original message's header
# (text/rfc822-headers, never its body). Pure: builds bytes from the facts given. Must never be
# asked to bounce a bounce: the caller checks for the null sender <> first.
import os
import re
import time
from dataclasses import dataclass
from email.utils import formatdate

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ENHANCED = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")
MAX_HEADER = 64 * 1024  # of the original message quoted in a notice


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    rcpt: str
    code: int  # SMTP reply code (or 4xx for expiry after temporary failures)
    diagnostic: str  # the next hop's reply or the hub's reason
    remote_mta: str = ""  # next hop host, when one answered


def status_of(failure: FailedRecipient) -> str:
    """The RFC 3463 status: the reply's enhanced code when it has one, else its class."""
    match = _ENHANCED.search(failure.diagnostic)
    if match and match.group(1)[0] == str(failure.code)[0]:
        return match.group(1)
    return f"{str(failure.code)[0]}.0.0"


def header_of(head: bytes) -> bytes:
    """The header block of a message from its first bytes (up to MAX_HEADER)."""
    end = head.find(b"\r\n\r\n")
    return head[: end + 2] if end >= 0 else head[:MAX_HEADER]


# Header fields of the original that a notice may quote: they name the mail and its way through the
# hub, never its content (Subject, display names and filenames can carry patient data).
_QUOTABLE = {b"date", b"message-id", b"x-telemedicine-setid", b"x-telemedicine-setpart", b"x-telemedicine-settotal"}


def identifying_fields(header: bytes) -> bytes:
    """Of a header block, the hub's own Received: field (the first) and the fields of _QUOTABLE,
    each with its folded lines; everything else left out."""
    kept: list[bytes] = []
    keep = False
    received_seen = False
    for line in header.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):  # a folded continuation of the field before
            if keep:
                kept.append(line)
            continue
        name = line.partition(b":")[0].strip().lower()
        keep = name in _QUOTABLE or (name == b"received" and not received_seen)
        received_seen = received_seen or name == b"received"
        if keep:
            kept.append(line)
    return b"".join(line + b"\r\n" for line in kept)


def build_dsn(
    *,
    reporting_mta: str,
    sender: str,
    queue_id: str,
    arrival: float,
    failures: list[FailedRecipient],
    delayed: bool,
    original_header: bytes,
    retry_until: float | None = None,
    subject: str | None = None,
    explanation: str | None = None,
) -> bytes:
    """A complete RFC 5322 message (CRLF) from MAILER-DAEMON to the original sender. `subject` and
    `explanation` (the human-readable part's first paragraph) replace the relay's own wording."""
    boundary = f"{queue_id}.{os.urandom(6).hex()}/{reporting_mta}"
    if delayed:
        subject = subject or "Delayed Mail (still being retried)"
        human = (
            "This is the mail system at host {host}.\r\n\r\nYour message could not be delivered to "
            "the recipient(s) below yet. The hub keeps trying{until}; no action is needed.\r\n"
        )
    else:
        subject = subject or "Undelivered Mail Returned to Sender"
        human = (
            "This is the mail system at host {host}.\r\n\r\nYour message could not be delivered to "
            "the recipient(s) below. This is a permanent error; the hub has given up.\r\n"
        )
    until = f" until {formatdate(retry_until, usegmt=True)}" if retry_until else ""
    if explanation is not None:
        human = f"This is the mail system at host {reporting_mta}.\r\n\r\n{explanation}"
    else:
        human = human.format(host=reporting_mta, until=until)
    lines = [human, ""]
    lines += [f"<{_clean(f.rcpt)}>: {_clean(f.diagnostic)}\r\n" for f in failures]
    report = [
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Mailhub-Queue-ID: {queue_id}",
        f"Arrival-Date: {formatdate(arrival, usegmt=True)}",
        "",
    ]
    for f in failures:
        report += [
            f"Final-Recipient: rfc822; {_clean(f.rcpt)}",
            f"Action: {'delayed' if delayed else 'failed'}",
            f"Status: {status_of(f)}",
        ]
        if f.remote_mta:
            report.append(f"Remote-MTA: dns; {_clean(f.remote_mta)}")
        report.append(f"Diagnostic-Code: smtp; {_clean(f.diagnostic)}")
        if delayed and retry_until:
            report.append(f"Will-Retry-Until: {formatdate(retry_until, usegmt=True)}")
        report.append("")
    head = (
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>\r\n"
        f"To: <{_clean(sender)}>\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {formatdate(time.time(), usegmt=True)}\r\n"
        f"Message-ID: <{queue_id}.{os.urandom(4).hex()}.dsn@{reporting_mta}>\r\n"
        f"Auto-Submitted: auto-replied\r\n"
        f"MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"\r\n'
        f"\r\nThis is a MIME-encapsulated message.\r\n\r\n"
    )
    parts = [
        f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Description: Notification\r\n\r\n"
        + "".join(lines),
        f"--{boundary}\r\nContent-Type: message/delivery-status\r\nContent-Description: Delivery report\r\n\r\n"
        + "\r\n".join(report),
        f"--{boundary}\r\nContent-Type: text/rfc822-headers\r\nContent-Description: "
        f"{'Delayed' if delayed else 'Undelivered'} Message Headers\r\n\r\n",
    ]
    header = original_header if original_header.endswith(b"\r\n") else original_header + b"\r\n"
    return (head + "".join(parts)).encode() + header + f"\r\n--{boundary}--\r\n".encode()


def identity_header(message_id: str | None, set_id: str | None, set_part: int | None, set_total: int | None) -> bytes:
    """The header fields that name a mail without its content (a notice from the hub must carry no
    patient data: no Subject, no From display name, no body): Message-ID and the study fields."""
    fields = [
        ("Message-ID", message_id),
        ("X-TELEMEDICINE-SETID", set_id),
        ("X-TELEMEDICINE-SETPART", set_part),
        ("X-TELEMEDICINE-SETTOTAL", set_total),
    ]
    return "".join(f"{name}: {_clean(str(value))}\r\n" for name, value in fields if value is not None).encode()


def returned_notice(
    *,
    reporting_mta: str,
    sender: str,
    queue_id: str,
    arrival: float,
    rcpt: str,
    reason: str,
    message_id: str | None,
    set_id: str | None,
    set_part: int | None,
    set_total: int | None,
) -> bytes:
    """The RFC 3464 notice for a mail the hub's operator took out of a mailbox and returned to its
    sender (`mailhub mailbox return`: "not for us"): names the mail by queue ID, Message-ID and
    study, never its content."""
    study = f", part {set_part} of {set_total} of study {set_id}" if set_id else ""
    named = f"Message-ID {message_id}" if message_id else f"queue ID {queue_id}"
    explanation = (
        f"Your message ({_clean(named)}{_clean(study)}) was delivered to the mailbox of <{_clean(rcpt)}>, but the\r\n"
        "hub's operator has removed it from there and returns it to you: the receiving site did not\r\n"
        f"accept it ({_clean(reason)}). It was not read by the hub; nothing of it is attached.\r\n"
        "Please check the recipient and send it again if needed.\r\n"
    )
    return build_dsn(
        reporting_mta=reporting_mta,
        sender=sender,
        queue_id=queue_id,
        arrival=arrival,
        failures=[FailedRecipient(rcpt, 550, f"5.0.0 returned to the sender by the hub's operator: {reason}")],
        delayed=False,
        original_header=identity_header(message_id, set_id, set_part, set_total),
        subject="Mail Returned to Sender by the Hub Operator",
        explanation=explanation,
    )


def _clean(text: str) -> str:
    return _CONTROL.sub(" ", text)[:900]
