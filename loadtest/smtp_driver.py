# The sending gateways: one asyncio task per study, like a DICOM e-mail gateway sending a study:
# one SMTP connection reused for the study's mails (EHLO, STARTTLS when offered and asked, AUTH
# PLAIN, PIPELINING, BDAT when CHUNKING is offered), retries after 4xx replies or dropped
# connections with exponential backoff, and pacing to the site's uplink. Must never mark a mail
# accepted without a 2xx reply to its end of data.
from __future__ import annotations

import asyncio
import random
from pathlib import Path

from . import smtp_protocol as sp
from .net import Stream
from .recorder import Recorder


class Transient(Exception):
    """A 4xx reply or a broken connection: try again later."""


class Permanent(Exception):
    """A 5xx reply: the mail is refused for good."""


class SmtpSession:
    def __init__(self, stream: Stream, host: str) -> None:
        self.stream, self.host = stream, host
        self.parser = sp.ReplyParser()
        self.pending: list[sp.Reply] = []
        self.caps: dict[str, str] = {}
        self.tls = False

    async def reply(self) -> sp.Reply:
        while not self.pending:
            self.pending += self.parser.feed(await self.stream.readline())
        return self.pending.pop(0)

    async def command(self, data: bytes) -> sp.Reply:
        await self.stream.write(data)
        return await self.reply()

    async def open(self, login: str, password: str, starttls: bool) -> None:
        greeting = await self.reply()
        if greeting.code != 220:
            raise Transient(greeting.short()) if greeting.kind == "transient" else Permanent(greeting.short())
        ehlo = await self.command(sp.ehlo("loadtest-gateway.invalid"))
        if ehlo.code != 250:
            raise Permanent(ehlo.short())
        self.caps = sp.capabilities(ehlo)
        if starttls and "STARTTLS" in self.caps:
            reply = await self.command(sp.STARTTLS)
            if reply.code != 220:
                raise Transient(reply.short())
            await self.stream.starttls(self.host)
            self.tls = True
            self.caps = sp.capabilities(await self.command(sp.ehlo("loadtest-gateway.invalid")))
        if login and "AUTH" in self.caps:  # a server that offers no AUTH takes loopback mail as is
            reply = await self.command(sp.auth_plain(login, password))
            if reply.code != 235:
                raise Transient(reply.short()) if reply.kind == "transient" else Permanent(reply.short())

    def _check(self, reply: sp.Reply, what: str) -> None:
        if reply.kind == "transient":
            raise Transient(f"{what}: {reply.short()}")
        if reply.kind == "permanent":
            raise Permanent(f"{what}: {reply.short()}")

    async def send_mail(
        self, sender: str, recipient: str, message: bytes, use_bdat: bool, pipelining: bool
    ) -> sp.Reply:
        size = len(message) if "SIZE" in self.caps else None
        bdat = use_bdat and "CHUNKING" in self.caps
        head = [sp.mail_from(sender, size), sp.rcpt_to(recipient)] + ([] if bdat else [sp.DATA])
        if pipelining and "PIPELINING" in self.caps:
            await self.stream.write(b"".join(head))
            replies = [await self.reply() for _ in head]
        else:
            replies = []
            for cmd in head:
                replies.append(await self.command(cmd))
                if replies[-1].kind != "ok" and replies[-1].code != 354:
                    break
        data_reply = replies[2] if len(replies) == 3 else None
        if data_reply is not None and data_reply.code == 354 and any(r.kind != "ok" for r in replies[:2]):
            await self.stream.write(b".\r\n")  # DATA went through anyway: end an empty mail
            await self.reply()
        for reply, what in zip(replies[:2], ("MAIL", "RCPT")):
            self._check(reply, what)
        if data_reply is not None and data_reply.code != 354:
            self._check(data_reply, "DATA")
            raise Permanent(f"DATA: unexpected {data_reply.short()}")
        if bdat and len(message) > 1 << 20:  # no copy of a big mail
            await self.stream.write(sp.bdat(len(message)))
            final = await self.command(message)
        elif bdat:
            final = await self.command(sp.bdat(len(message)) + message)
        else:
            await self.stream.write(sp.dot_stuff(message))
            final = await self.reply()
        self._check(final, "end of data")
        return final

    async def quit(self) -> None:
        try:
            async with asyncio.timeout(5):
                await self.command(sp.QUIT)
        except (TimeoutError, OSError, ConnectionError, sp.SmtpReplyError):
            pass
        await self.stream.close()


async def send_study(
    *,
    study: dict,
    corpus: Path,
    host: str,
    port: int,
    login: str,
    password: str,
    sender_address: str,
    receiver_address: str,
    smtp_cfg,
    uplink,
    downlink,
    recorder: Recorder,
    rng: random.Random,
    stop: asyncio.Event,
) -> None:
    """Send every mail of one study, retrying each until accepted, refused or out of attempts."""
    session: SmtpSession | None = None
    try:
        for mail in study["mails"]:
            message = (corpus / mail["file"]).read_bytes()
            attempt = 0
            while True:
                attempt += 1
                record = recorder.submit(mail["message_id"], study["sender"], study["receiver"], len(message))
                try:
                    if session is None:
                        stream = await Stream.connect(host, port, uplink, downlink)
                        session = SmtpSession(stream, host)
                        await session.open(login, password, smtp_cfg.starttls)
                        recorder.smtp_sessions += 1
                        recorder.smtp_tls_sessions += session.tls
                    final = await session.send_mail(
                        sender_address, receiver_address, message, smtp_cfg.chunking, smtp_cfg.pipelining
                    )
                    recorder.accepted(record, final.short())
                    break
                except Permanent as exc:
                    recorder.failed(record, "rejected", str(exc))
                    recorder.error(study["sender"], f"{mail['message_id']}: rejected: {exc}")
                    if session is not None:
                        try:
                            await session.command(sp.RSET)
                        except (TimeoutError, OSError, ConnectionError, sp.SmtpReplyError):
                            await session.quit()
                            session = None
                    break
                except (TimeoutError, Transient, OSError, ConnectionError, sp.SmtpReplyError) as exc:
                    text = str(exc) or type(exc).__name__
                    recorder.deferral(study["sender"], text)
                    if session is not None:
                        await session.quit()  # a gateway reconnects after trouble
                        session = None
                    if attempt >= smtp_cfg.max_attempts or stop.is_set():
                        recorder.failed(record, "gave-up", text)
                        recorder.error(study["sender"], f"{mail['message_id']}: gave up: {text}")
                        break
                    delay = sp.backoff_delay(
                        attempt + 1, smtp_cfg.retry_base_s, smtp_cfg.retry_max_s, rng.uniform(0.8, 1.2)
                    )
                    try:
                        async with asyncio.timeout(delay):
                            await stop.wait()
                    except TimeoutError:
                        pass
    finally:
        if session is not None:
            await session.quit()
