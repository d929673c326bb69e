# What an SMTP refusal leaves besides its reply: a throttle refusal's log line with the figures
# behind it (4xx ones counted as deferrals), and a tracking event per recipient (storage.events,
# queued: never waits for the disk). Used by the session (MAIL, RCPT) and the message path (end of
# data); the peer and the logged-in site are passed in.
import logging
import time
from collections.abc import Sequence

from quotas import Verdict
from relay import metrics
from relay.smtp.context import SmtpContext
from relay.smtp.ingest import IncomingMessage
from storage import Site
from storage.events import refusal as refusal_event

log = logging.getLogger("mailhub.smtp")


def log_throttle_refusal(
    peer_ip: str, site: Site | None, what: str, reply: str, verdict: Verdict, receiver: Site | None = None
) -> None:
    """Throttle refusals (`reply`: the verdict's) with the figures behind them; 4xx ones are
    counted as deferrals, per site: the sending site's own quotas (submitted_*) count for it, the
    rest (mailbox, received volume, drain time) for the receiving site (`receiver` at RCPT, else
    the verdict's figures)."""
    if reply[0] == "4":
        named = receiver.name if receiver is not None else verdict.figures.get("receiver")
        if verdict.reason.startswith("submitted") or not isinstance(named, str):
            metrics.smtp_deferral(verdict.reason, site.name if site else None, "sender")
        else:
            metrics.smtp_deferral(verdict.reason, named, "receiver")
    log.info(
        "%s site=%s: %s refused %s: %s",
        peer_ip,
        site.name if site else "-",
        what,
        reply[:9],
        verdict.log_text(),
        extra={
            "event": "smtp.throttled",
            "protocol": "smtp",
            "site": site.name if site else None,
            "client": peer_ip,
            "outcome": reply[:3],
            "reason": verdict.reason,
        },
    )


def track_refusal(
    ctx: SmtpContext,
    peer_ip: str,
    site: Site | None,
    reply: str,
    sender: str | None,
    rcpts: Sequence[str | None],
    message: IncomingMessage | None = None,
) -> None:
    """Queue a refused/deferred tracking event per recipient (never waits for the disk)."""
    queue_id = message_id = set_id = size = None
    if message is not None:
        message.headers.close()
        queue_id = message.spool.queue_id if message.spool is not None else None
        message_id, set_id = message.headers.message_id, message.headers.set_id
        size = message.size
    now = time.time()
    for rcpt in rcpts:
        to_site = ctx.sites.by_address(rcpt) if rcpt else None
        ctx.storage.record_event(
            refusal_event(
                now,
                reply,
                site=site.name if site else None,
                sender=sender,
                rcpt=rcpt,
                to_site=to_site.name if to_site else None,
                peer=peer_ip,
                queue_id=queue_id,
                message_id=message_id,
                set_id=set_id,
                size=size,
            )
        )


__all__ = ["log_throttle_refusal", "track_refusal"]
