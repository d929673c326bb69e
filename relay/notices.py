# The mails the hub writes about the mailbox lifecycle (issue 25), built from a notice's facts
# (storage.lifecycle: IDs, sizes, dates): the RFC 3464 delivery status notification that tells a
# sender its study was not fetched by the recipient within the retention time (one per study), the
# warning to a site that mail waiting for it expires soon, and the quota warnings to a site and to
# the operator. Pure: builds CRLF bytes from the facts given.
# Must never carry patient data: no Subject, file name, body or header of an original mail, only
# queue IDs, Message-IDs, study IDs, part numbers, sizes and times.
import os
import re
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import Any

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_LISTED = 200  # mails listed one by one in a notice; the rest are counted
STATUS_EXPIRED = "5.4.7"  # RFC 3463: delivery time expired (permanent: the mail is gone)


def _clean(value: object, limit: int = 300) -> str:
    return _CONTROL.sub(" ", str(value))[:limit]


def _size(octets: int | None) -> str:
    if octets is None:
        return "?"
    value = float(octets)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{octets} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{octets} bytes"


def _date(at: float | None) -> str:
    return formatdate(at, usegmt=True) if at is not None else "-"


def _head(host: str, to: str, subject: str, now: float, auto: str, extra: list[str]) -> list[str]:
    return [
        f"From: DICOM Mail Hub <MAILER-DAEMON@{host}>",
        f"To: <{_clean(to)}>",
        f"Subject: {subject}",
        f"Date: {formatdate(now, usegmt=True)}",
        f"Message-ID: <{os.urandom(8).hex()}.notice@{host}>",
        f"Auto-Submitted: {auto}",
        "MIME-Version: 1.0",
        *extra,
    ]


def _part_text(m: dict[str, Any]) -> str:
    if m.get("set_part") is None:
        return ""
    return f" part {m['set_part']}/{m.get('set_total') or '?'}"


def expiry_dsn(facts: dict[str, Any], rcpt: str, host: str, now: float | None = None) -> bytes:
    """The RFC 3464 notice (multipart/report; report-type=delivery-status) to the sender of a study
    (or of one mail without a study) whose mails were removed unfetched from a site's mailbox."""
    now = time.time() if now is None else now
    days = facts["retention_days"]
    mails: list[dict[str, Any]] = facts["mails"]
    study = facts.get("set_id")
    if study or len(mails) == 1:
        what = f"study {_clean(study, 256)}" if study else f"mail {mails[0]['queue_id']}"
        told = f"Your {what} to site {_clean(facts['site'], 64)} was not fetched by the recipient within"
        told += f" {days:g} days and has been removed from its mailbox ({len(mails)} mail(s)). Send it again"
        told += " if it is still needed."
    else:  # mails without a study of one sender expiring together (relay/expiry.py)
        told = f"Your {len(mails)} mails to site {_clean(facts['site'], 64)} were not fetched by the recipient"
        told += f" within {days:g} days and have been removed from its mailbox. Send them again if they are"
        told += " still needed."
    boundary = f"{os.urandom(8).hex()}/{host}"
    human = [f"This is the mail system at host {host}.", "", told, ""]
    for m in mails[:MAX_LISTED]:
        human.append(
            f"  queue ID {m['queue_id']}{_part_text(m)}, Message-ID {_clean(m.get('message_id') or '-')},"
            f" {_size(m.get('size'))}, delivered {_date(m.get('delivered_at'))}"
        )
    human += _more(mails)
    report = [
        f"Reporting-MTA: dns; {host}",
        *([f"X-Mailhub-Study-ID: {_clean(study, 256)}"] if study else []),
        f"Arrival-Date: {_date(min(m['delivered_at'] for m in mails))}",
        "",
    ]
    for rcpt_of in sorted({str(m.get("rcpt") or "") for m in mails}):
        report += [
            f"Final-Recipient: rfc822; {_clean(rcpt_of)}",
            "Action: failed",
            f"Status: {STATUS_EXPIRED}",
            f"Diagnostic-Code: X-Mailhub; not fetched by the recipient within {days:g} days",
            f"Last-Attempt-Date: {_date(facts.get('expired_at', now))}",
            "",
        ]
    head = _head(
        host,
        rcpt,
        f"Undelivered Mail: not fetched by the recipient within {days:g} days",
        now,
        "auto-replied",
        [f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"'],
    )
    body = [
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "Content-Description: Notification",
        "",
        *human,
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "Content-Description: Delivery report",
        "",
        *report,
        f"--{boundary}--",
        "",
    ]
    return _encode(head, body)


def expiry_warning(facts: dict[str, Any], rcpt: str, host: str, now: float | None = None) -> bytes:
    """To a site: mail waiting in its mailbox will be removed unfetched soon."""
    now = time.time() if now is None else now
    mails: list[dict[str, Any]] = facts["mails"]
    first = min((m["expires_at"] for m in mails if m.get("expires_at") is not None), default=None)
    lines = [
        f"{len(mails)} mail(s) in the mailbox of site {_clean(facts['site'], 64)} have not been fetched and will"
        f" be removed from {_date(first)} on unless they are fetched before:",
        "",
    ]
    for m in mails[:MAX_LISTED]:
        study = f" study {_clean(m['set_id'], 256)}{_part_text(m)}" if m.get("set_id") else ""
        lines.append(
            f"  queue ID {m['queue_id']}{study}, Message-ID {_clean(m.get('message_id') or '-')},"
            f" from site {_clean(m.get('from_site') or '-', 64)}, {_size(m.get('size'))},"
            f" delivered {_date(m.get('delivered_at'))}, expires {_date(m.get('expires_at'))}"
        )
    lines += _more(mails)
    return _plain(host, rcpt, f"Mail waiting for you expires soon ({len(mails)} mail(s))", now, lines)


def quota_warning(facts: dict[str, Any], rcpt: str, host: str, now: float | None = None) -> bytes:
    """To a site or the operator: the site's mailbox reached a warning level of its quota."""
    now = time.time() if now is None else now
    site, level = _clean(facts["site"], 64), facts["level"]
    lines = [
        f"The mailbox of site {site} is {facts['percent']:.0f}% full (warning level {level}%):",
        "",
        f"  {_size(facts['bytes'])} of {_size(facts['bytes_limit'])}" if facts.get("bytes_limit") else "",
        f"  {facts['messages']} of {facts['messages_limit']} mails" if facts.get("messages_limit") else "",
        "",
        "When it is full, new mail for the site is deferred (452 4.2.2). Fetch and delete mail to make room.",
    ]
    subject = f"Mailbox of site {site} is {level}% full"
    return _plain(host, rcpt, subject, now, [line for line in lines if line is not None])


def _more(mails: list[dict[str, Any]]) -> list[str]:
    return [f"  ... and {len(mails) - MAX_LISTED} more"] if len(mails) > MAX_LISTED else []


def _plain(host: str, rcpt: str, subject: str, now: float, lines: list[str]) -> bytes:
    head = _head(host, rcpt, subject, now, "auto-generated", ["Content-Type: text/plain; charset=us-ascii"])
    return _encode(head, lines + ["", f"-- the DICOM Mail Hub at {host}", ""])


def _encode(head: list[str], body: list[str]) -> bytes:
    text = "\r\n".join(head) + "\r\n\r\n" + "\r\n".join(body)
    return text.encode("ascii", "replace")


BUILDERS: dict[str, Callable[..., bytes]] = {
    "expiry_dsn": expiry_dsn,
    "expiry_warning": expiry_warning,
    "quota_warning": quota_warning,
    "quota_operator": quota_warning,
}
