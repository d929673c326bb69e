# The receiving gateways over IMAP IDLE: one long-lived connection per site (LOGIN, SELECT INBOX),
# fetch every message (UID SEARCH ALL, UID FETCH BODY.PEEK[], STORE \Deleted, EXPUNGE), then IDLE
# until the server announces EXISTS (or a re-check interval passes), reads paced to the site's
# downlink. Mails are recorded only after the EXPUNGE succeeded, like POP3 after QUIT. Must never
# flag a message \Deleted before its whole body was read.
from __future__ import annotations

import asyncio
from pathlib import Path

from . import imap_protocol as ip
from .net import Stream
from .pgpmime import body_digest
from .pop3_driver import _SEQ, message_id_of
from .recorder import Received, Recorder

RECHECK_S = 30.0


class ImapClient:
    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.parser = ip.ResponseParser()
        self.pending: list[ip.Response] = []
        self.tags = ip.Tagger()
        self.saw_exists = False

    async def response(self, timeout: float = 120.0) -> ip.Response:
        while not self.pending:
            self.pending += self.parser.feed(await self.stream.read(timeout))
        return self.pending.pop(0)

    async def run(self, text: str) -> list[ip.Response]:
        """Send a command; return its untagged responses (after checking the tagged OK)."""
        tag, data = self.tags.command(text)
        await self.stream.write(data)
        untagged: list[ip.Response] = []
        while True:
            r = await self.response()
            if r.tag == tag:
                ip.check_tagged(r)
                return untagged
            self.saw_exists |= ip.is_exists(r)
            untagged.append(r)


async def _drain_mailbox(client: ImapClient, site: str, recorder: Recorder, save_dir: Path) -> None:
    uids = ip.search_uids(await client.run("UID SEARCH ALL"))
    recorder.server_backlog(site, len(uids), 0)
    fetched = []
    try:
        for uid in uids:
            raw = ip.fetched_body(await client.run(f"UID FETCH {uid} (BODY.PEEK[])"))
            if raw is None:
                continue
            at = recorder.now()
            path = save_dir / f"{site}-{next(_SEQ):07d}.eml"
            await asyncio.to_thread(path.write_bytes, raw)
            fetched.append(Received(message_id_of(raw), site, at, len(raw), body_digest(raw), str(path)))
            await client.run(f"UID STORE {uid} +FLAGS.SILENT (\\Deleted)")
        if uids:
            await client.run("EXPUNGE")
    except BaseException:
        for item in fetched:
            Path(item.path).unlink(missing_ok=True)
        raise
    for item in fetched:
        recorder.download(item)


async def _idle(client: ImapClient, stop: asyncio.Event) -> None:
    """IDLE until EXISTS, RECHECK_S or stop; then DONE."""
    tag, data = client.tags.command("IDLE")
    await client.stream.write(data)
    while True:
        r = await client.response()
        if r.text.startswith("+"):
            break
        if r.tag == tag:
            ip.check_tagged(r)  # a server without IDLE answers BAD here
            return
    waiter = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set():
            reader = asyncio.ensure_future(client.response(timeout=RECHECK_S + 5))
            done, _ = await asyncio.wait({reader, waiter}, timeout=RECHECK_S, return_when=asyncio.FIRST_COMPLETED)
            if reader in done:
                if ip.is_exists(reader.result()):
                    break
                continue
            reader.cancel()
            break
    finally:
        waiter.cancel()
    await client.stream.write(b"DONE\r\n")
    while True:
        r = await client.response()
        if r.tag == tag:
            ip.check_tagged(r)
            return


async def receive_loop(
    *,
    host: str,
    port: int,
    login: str,
    password: str,
    site: str,
    downlink,
    uplink,
    recorder: Recorder,
    save_dir: Path,
    stop: asyncio.Event,
) -> None:
    while not stop.is_set():
        stream = None
        try:
            stream = await Stream.connect(host, port, uplink, downlink)
            client = ImapClient(stream)
            greeting = await client.response()
            if not greeting.text.startswith("* OK"):
                raise ip.ImapError(greeting.text[:200])
            await client.run(f"LOGIN {ip.quote(login)} {ip.quote(password)}")
            await client.run("SELECT INBOX")
            while True:
                client.saw_exists = False
                await _drain_mailbox(client, site, recorder, save_dir)
                if stop.is_set():
                    break
                if not client.saw_exists:  # nothing arrived while fetching: wait for news
                    await _idle(client, stop)
            try:
                async with asyncio.timeout(5):
                    await client.run("LOGOUT")
            except (TimeoutError, ip.ImapError, OSError, ConnectionError):
                pass
            return
        except (TimeoutError, OSError, ConnectionError, ip.ImapError) as exc:
            recorder.error(site, f"IMAP session failed: {str(exc) or type(exc).__name__}")
            try:
                async with asyncio.timeout(1.0):
                    await stop.wait()
            except TimeoutError:
                pass
        finally:
            if stream is not None:
                await stream.close()
