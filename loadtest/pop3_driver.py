# The receiving gateways over POP3: poll every interval (USER/PASS, STAT, UIDL, RETR + DELE for
# each mail, QUIT), reads paced to the site's downlink. Each downloaded mail is saved for the deep
# check and recorded only after QUIT succeeded (the server committed the deletions), so a failed
# session's mails are fetched again rather than counted twice. Must never delete a mail it has not
# downloaded completely.
from __future__ import annotations

import asyncio
import itertools
import re
from pathlib import Path

from . import pop3_protocol as pp
from .net import Stream
from .pgpmime import body_digest
from .recorder import Received, Recorder

_SEQ = itertools.count(1)
_MID_RE = re.compile(rb"^Message-ID:\s*<([^>\r\n]*)>", re.I | re.M)


def message_id_of(raw: bytes) -> str:
    head = raw.split(b"\r\n\r\n", 1)[0]
    match = _MID_RE.search(head)
    return match.group(1).decode("utf-8", "replace") if match else ""


class Pop3Client:
    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    async def simple(self, data: bytes | None = None) -> str:
        if data is not None:
            await self.stream.write(data)
        return pp.status(await self.stream.readline())

    async def multi(self, data: bytes) -> bytes:
        await self.simple(data)
        body = pp.MultiLine()
        while not body.done:
            body.feed(await self.stream.read())
        self.stream.unread(body.extra)
        return body.take()


async def poll_once(
    *, host: str, port: int, login: str, password: str, site: str, downlink, uplink, recorder: Recorder, save_dir: Path
) -> int:
    """One POP3 session; returns how many mails it downloaded (and the server deleted)."""
    stream = await Stream.connect(host, port, uplink, downlink)
    client = Pop3Client(stream)
    fetched: list[Received] = []
    try:
        await client.simple()
        await client.simple(pp.command("USER", login))
        await client.simple(pp.command("PASS", password))
        count, size = pp.parse_stat(await client.simple(pp.command("STAT")))
        recorder.server_backlog(site, count, size)
        for number, _uid in pp.parse_listing(await client.multi(pp.command("UIDL"))):
            raw = await client.multi(pp.command("RETR", str(number)))
            at = recorder.now()
            path = save_dir / f"{site}-{next(_SEQ):07d}.eml"
            await asyncio.to_thread(path.write_bytes, raw)
            fetched.append(Received(message_id_of(raw), site, at, len(raw), body_digest(raw), str(path)))
            await client.simple(pp.command("DELE", str(number)))
        await client.simple(pp.command("QUIT"))
    except BaseException:
        for item in fetched:
            Path(item.path).unlink(missing_ok=True)
        raise
    finally:
        await stream.close()
    for item in fetched:
        recorder.download(item)
    return len(fetched)


async def receive_loop(
    *,
    host: str,
    port: int,
    login: str,
    password: str,
    site: str,
    interval: float,
    first_poll: float,
    downlink,
    uplink,
    recorder: Recorder,
    save_dir: Path,
    stop: asyncio.Event,
) -> None:
    """Poll until `stop` is set (a session in progress finishes first)."""
    loop = asyncio.get_running_loop()
    next_at = loop.time() + first_poll
    while not stop.is_set():
        try:
            async with asyncio.timeout(max(0.0, next_at - loop.time())):
                await stop.wait()
            return
        except TimeoutError:
            pass
        next_at = loop.time() + interval
        try:
            await poll_once(
                host=host,
                port=port,
                login=login,
                password=password,
                site=site,
                downlink=downlink,
                uplink=uplink,
                recorder=recorder,
                save_dir=save_dir,
            )
        except (TimeoutError, OSError, ConnectionError, pp.Pop3Error) as exc:
            recorder.error(site, f"POP3 session failed: {str(exc) or type(exc).__name__}")
