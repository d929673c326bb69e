# The SMTP session's message path: what happens to a message once DATA or BDAT starts. It opens the
# IncomingMessage the data streams into (limited to the size allowed and the receivers' room, with
# the encryption policy of the recipient sites listening, the Received header first) and ends it:
# the checks at end of data (size, lines, encryption policy, removed sites, quotas), the commit to
# storage (the 250 only after it), the answer to a directory request, the log line and metrics; or,
# when the transaction ends without a reply, the message dropped and one log line. No socket here:
# the session (relay.smtp.server) reads the bytes and sends the reply; this part sees the session
# through SmtpSession (composition: the session owns one Receiver).
import functools
import logging
import time
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Protocol

from aiosmtpd.smtp import Session

from directory import DirectoryError, recipients_under_policy
from quotas import SetPart
from relay import metrics
from relay.mailbox_session import printable
from relay.policy.encryption import EncryptionPolicy
from relay.smtp import replies as R
from relay.smtp.context import SmtpContext, Transaction
from relay.smtp.ingest import IncomingMessage
from relay.smtp.protocol import with_protocol
from relay.smtp.refusals import log_throttle_refusal, track_refusal
from storage import MessageMeta, Site, StorageError

log = logging.getLogger("mailhub.smtp")


class SmtpSession(Protocol):
    """What the message path reads of its session (relay.smtp.server.HubSMTP)."""

    ctx: SmtpContext
    hostname: str
    peer_ip: str

    @property
    def tls_active(self) -> bool: ...

    @property
    def site(self) -> Site | None: ...

    def transaction(self) -> Transaction: ...

    def live_session(self) -> Session: ...


class Receiver:
    """One session's message path (see the module header)."""

    def __init__(self, session: SmtpSession) -> None:
        self._session = session
        self.ctx = session.ctx

    def abort(self, tx: Transaction, why: str) -> None:
        """A transaction whose data was being received (or committed) ends without a reply: its
        message is dropped, and the log gets one line (the first caller's reason)."""
        message = tx.receiving or tx.bdat
        if message is None:
            return
        tx.receiving = tx.bdat = None
        committing = message.spool is not None and message.spool.handed_over
        message.discard()  # (not once handed to the index writer: that commit runs to its end)
        metrics.smtp_aborted(why)
        site = self._session.site
        outcome = "unanswered (being committed: stored unless the commit fails)" if committing else "aborted"
        log.info(
            "qid=%s site=%s from=<%s> rcpts=%s received=%d outcome=%s reason=%r",
            message.queue_id,
            site.name if site else "-",
            printable(tx.mail_from or ""),
            ",".join(printable(r) for r in tx.rcpt_tos),
            message.size,
            outcome,
            why,
            extra={
                "event": "smtp.aborted",
                **self._fields(message.queue_id, tx.mail_from or "", tx.rcpt_tos),
                "size": message.size,
                "outcome": "unanswered" if committing else "aborted",
                "reason": why,
            },
        )

    def _fields(self, queue_id: str, sender: str, recipients) -> dict:
        """The JSON log fields every transaction line has (mailhub/logsetup.py FIELDS)."""
        site = self._session.site
        return {
            "queue_id": queue_id,
            "protocol": "smtp",
            "site": site.name if site else None,
            "client": self._session.peer_ip,
            "sender": printable(sender),
            "recipients": [printable(r) for r in recipients],
        }

    def new_message(self) -> IncomingMessage:
        """A message to receive, stopped (and drained) at the size limit or the receivers' room,
        checked by the encryption policy as it streams when that applies."""
        tx = self._session.transaction()
        max_size, reply = self.ctx.cfg.smtp.max_message_size, R.MESSAGE_TOO_BIG
        limit = self.ctx.throttle.stream_limit(tx, self._session.site, tx.receivers)
        if limit is not None and limit[0] < max_size:
            max_size, reply = limit
        cap = self.ctx.cfg.smtp.postmaster_max_message_size
        if tx.postmaster and self._session.site is None and cap < max_size:  # relay/smtp/postmaster.py
            max_size, reply = cap, R.POSTMASTER_TOO_BIG
        tx.policy = self._encryption_policy()
        return IncomingMessage(
            self.ctx.storage, max_size, self._trace_header, reply, [tx.policy] if tx.policy is not None else ()
        )

    def _encryption_policy(self) -> EncryptionPolicy | None:
        """The policy for this transaction's recipient sites, whoever sends (the null sender,
        postmaster and reports included: a report passes because its parts are clear reports).
        None when no recipient site is under it, or for a request to the directory only (nothing
        of it is stored)."""
        tx = self._session.transaction()
        if self.ctx.keyring is None or not tx.deliveries:
            return None
        receivers = [r for r in tx.receivers if r.id not in tx.postmaster_sites]  # postmaster@: not under it
        recipients = recipients_under_policy(receivers, self.ctx.keyring, self.ctx.cfg) if receivers else []
        if not recipients:
            return None
        return EncryptionPolicy(recipients, self.ctx.cfg.encryption.allow_hidden_recipients)

    def _trace_header(self, queue_id: str) -> bytes:
        session = self._session.live_session()
        protocol = with_protocol(session.extended_smtp, self._session.tls_active, bool(session.authenticated))
        helo = printable(session.host_name or "unknown")[:255]
        rcpts = self._session.transaction().rcpt_tos
        for_clause = f"\r\n\tfor <{printable(rcpts[0])}>" if len(rcpts) == 1 else ""
        return (
            f"Received: from {helo} ([{self._session.peer_ip}])\r\n\tby {self._session.hostname} (DICOM Mail Hub)"
            f" with {protocol} id {queue_id}{for_clause};\r\n\t{_date_now()}\r\n"
        ).encode("utf-8", "replace")

    async def finish(self, message: IncomingMessage, dot_lines: bool) -> str:
        tx = self._session.transaction()
        sender = tx.mail_from
        assert sender is not None  # DATA and BDAT come after MAIL FROM
        site = self._session.site
        started = time.monotonic()
        message.end_of_data()
        if message.failed and message.too_big:
            reply = message.too_big_reply
        elif message.lines.too_long:
            reply = R.LINE_TOO_LONG_IN_DATA
        elif message.error is not None:
            reply = message.error.reply
        elif tx.policy is not None and tx.policy.reply is not None:
            message.discard()
            reply, reason = tx.policy.reply, tx.policy.reason
            assert reason is not None  # (set with the reply)
            metrics.encryption_refusal(reason)
            log.info(
                "qid=%s site=%s refused by the encryption policy: %s",
                message.queue_id,
                site.name if site else "-",
                reply,
                extra={
                    "event": "smtp.refused",
                    **self._fields(message.queue_id, sender, tx.rcpt_tos),
                    "size": message.size,
                    "outcome": reply[:3],
                    "reason": f"encryption policy: {reason}",
                },
            )
        elif (sender_gone := site is not None and self.ctx.site_gone(site)) or any(
            self.ctx.site_gone(r) for r in tx.receivers
        ):
            message.discard()  # a site was removed during the transaction: its rows cannot be written
            reply = R.SITE_REMOVED if sender_gone else R.RECIPIENT_SITE_REMOVED
            log.info(
                "qid=%s site=%s refused: %s",
                message.queue_id,
                site.name if site else "-",
                reply,
                extra={
                    "event": "smtp.refused",
                    **self._fields(message.queue_id, sender, tx.rcpt_tos),
                    "outcome": reply[:3],
                    "reason": "site removed",
                },
            )
        else:
            meta = message.meta(sender, site, dot_lines, self._session.peer_ip)
            part = SetPart.from_headers(meta.set_id, meta.set_part, meta.set_total)
            throttle = self.ctx.throttle
            verdict = throttle.at_end_of_data(
                tx,
                site,
                [(r, tx.verdicts.get(r.id)) for r in tx.receivers],
                message.size,
                part,
                time.monotonic(),
                time.time(),
                stored=message.spooled.size,
            )
            if log.isEnabledFor(logging.DEBUG):
                log.debug("qid=%s end of data: %s", message.queue_id, verdict.log_text())
            if verdict.reply is not None:
                log_throttle_refusal(self._session.peer_ip, site, f"qid={message.queue_id}", verdict.reply, verdict)
                message.discard()
                reply = verdict.reply
            else:
                reply = await self._store(message, meta, part)
        elapsed = time.monotonic() - started
        if reply[0] != "2":
            track_refusal(self.ctx, self._session.peer_ip, site, reply, sender, tx.rcpt_tos, message)
        metrics.smtp_transaction(
            reply,
            message.size,
            site.name if site else None,
            [d.site_name for d in tx.deliveries] if reply[0] == "2" else (),
            elapsed,
        )
        if log.isEnabledFor(logging.INFO):
            log.info(
                "qid=%s site=%s from=<%s> rcpts=%s size=%d sha256=%s outcome=%r commit_ms=%.1f paced_s=%.1f",
                message.queue_id,
                site.name if site else "-",
                printable(sender),
                ",".join(printable(r) for r in tx.rcpt_tos),
                message.size,
                message.spool.sha256 if message.spool and reply[0] == "2" else "-",
                reply[:3],
                elapsed * 1000,
                tx.pacer.waited if tx.pacer else 0.0,
                extra={
                    "event": "smtp.transaction",
                    **self._fields(message.queue_id, sender, tx.rcpt_tos),
                    "size": message.size,
                    "sha256": message.spool.sha256 if message.spool and reply[0] == "2" else None,
                    "outcome": reply[:3],
                    "duration_s": round(elapsed, 4),
                },
            )
        return reply

    async def _store(self, message: IncomingMessage, meta: MessageMeta, part: SetPart | None) -> str:
        """Commit the message to its recipients' mailboxes and the outbound queue, and answer a
        directory request."""
        tx = self._session.transaction()
        try:
            if tx.deliveries or tx.remote:
                if tx.deliveries and self._session.site is not None:  # checked once more at the commit
                    limits = self.ctx.throttle.limits(self._session.site)
                    meta.max_submitted_day, meta.max_submitted_month = (
                        limits.submitted_per_day,
                        limits.submitted_per_month,
                    )
                # the sizes reserved at end of data end as the ledger counts the mail (or at RSET)
                await self.ctx.storage.commit(
                    message.spooled,
                    meta,
                    tx.deliveries,
                    remote=tx.remote,
                    on_committed=lambda: self.ctx.throttle.release(tx),
                )
                self.ctx.throttle.admitted(self._session.site, tx.receivers, part, time.monotonic())
                if self.ctx.on_stored is not None:
                    self.ctx.on_stored(message.queue_id, meta, self._session.site)
            else:
                message.discard()  # a request to the directory only: nothing to keep
            if tx.directory_request:
                directory_reply = await self._answer_directory_request(meta.message_id)
                if not (tx.deliveries or tx.remote):
                    return directory_reply
            return R.queued(message.queue_id)
        except StorageError as exc:
            return exc.reply

    async def _answer_directory_request(self, message_id: str | None) -> str:
        site, directory = self._session.site, self.ctx.directory
        assert site is not None and directory is not None  # (as for the request: see HubSMTP._directory_recipient)
        address = self._session.transaction().mail_from or site.addresses[0]
        try:
            queue_id = await directory.reply(site, address, message_id)
        except DirectoryError as exc:
            log.error("directory reply to %s failed: %s", site.name, exc)
            return R.INTERNAL_ERROR
        log.info("directory sent to site=%s rcpt=<%s> qid=%s", site.name, printable(address), queue_id)
        return R.directory_queued(queue_id)


def _date_now() -> str:
    """The RFC 5322 date of this second in UTC, "+0000" (formatted once per second)."""
    return _date_of(int(time.time()))


@functools.lru_cache(maxsize=1)
def _date_of(second: int) -> str:
    return format_datetime(datetime.fromtimestamp(second, UTC))


__all__ = ["Receiver", "SmtpSession"]
