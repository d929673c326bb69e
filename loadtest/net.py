# Asyncio stream plumbing shared by the drivers: connect (loopback check), paced writes and reads,
# line reads, STARTTLS upgrade. Must never parse protocol replies (that is smtp_protocol /
# pop3_protocol) and never connect to a non-loopback address unless allow_remote is set.
from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl

from .pacing import Pacer

CHUNK = 65536
_UNLIMITED = Pacer(0)


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def check_loopback(host: str) -> None:
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError as exc:
        raise ValueError(f"cannot resolve {host}: {exc}") from None
    for info in infos:
        if not ipaddress.ip_address(info[4][0]).is_loopback:
            raise ValueError(f"{host} is not a loopback address; pass --allow-remote to target it")


class Stream:
    """A reader/writer pair with an uplink and a downlink pacer."""

    def __init__(self, reader, writer, up: Pacer | None = None, down: Pacer | None = None) -> None:
        self.reader, self.writer = reader, writer
        self.up, self.down = up or _UNLIMITED, down or _UNLIMITED
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def connect(cls, host: str, port: int, up=None, down=None, timeout: float = 30.0) -> Stream:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        except TimeoutError:
            raise TimeoutError(f"connect to {host}:{port} timed out after {timeout:.0f} s") from None
        return cls(reader, writer, up, down)

    @staticmethod
    async def _timed(awaitable, timeout: float):
        try:
            async with asyncio.timeout(timeout):
                return await awaitable
        except TimeoutError:
            raise TimeoutError(f"no data from the server for {timeout:.0f} s") from None

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        step = CHUNK if not self.up.unlimited else 1 << 20
        for i in range(0, len(view), step):
            piece = view[i : i + step]
            wait = self.up.reserve(len(piece), self._loop.time())
            if wait > 0:
                await asyncio.sleep(wait)
            self.writer.write(piece)
            await self.writer.drain()

    async def _paced(self, nbytes: int) -> None:
        wait = self.down.reserve(nbytes, self._loop.time())
        if wait > 0:
            await asyncio.sleep(wait)

    async def readline(self, timeout: float = 120.0) -> bytes:
        line = await self._timed(self.reader.readline(), timeout)
        if not line:
            raise ConnectionError("connection closed by the server")
        await self._paced(len(line))
        return line

    async def read(self, timeout: float = 120.0) -> bytes:
        data = await self._timed(self.reader.read(CHUNK if not self.down.unlimited else 1 << 20), timeout)
        if not data:
            raise ConnectionError("connection closed by the server")
        await self._paced(len(data))
        return data

    def unread(self, data: bytes) -> None:
        if data:
            self.reader._buffer[:0] = data  # StreamReader has no public push-back

    async def starttls(self, server_hostname: str) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # throw-away certificates on loopback test servers
        await self.writer.start_tls(context, server_hostname=server_hostname)

    async def close(self) -> None:
        self.writer.close()
        try:
            async with asyncio.timeout(5):
                await self.writer.wait_closed()
        except (TimeoutError, OSError, ssl.SSLError):
            pass
