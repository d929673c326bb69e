# Pins the aiosmtpd (and asyncio StreamReader) behaviours relay/smtp/aiosmtpd_adapter.py relies on,
# against the installed aiosmtpd, on both event loops the hub runs with (asyncio, uvloop): the task
# connection_made() starts, the envelope hook, the verb table, the reader's buffer, EOF without
# cancelling the session, the idle timer (connection_lost cancels it; aiosmtpd's _timeout_cb closes
# the transport), STARTTLS in place. Also: the installed version is in pyproject.toml's range, and no
# other module of relay/ touches aiosmtpd's private members. Real sockets on 127.0.0.1 only.
import ast
import asyncio
import importlib.metadata
import os
import re
import socket
import ssl
import time
import tomllib
from pathlib import Path

import pytest
import uvloop
from aiosmtpd.smtp import SMTP, Envelope

from relay.smtp.aiosmtpd_adapter import AiosmtpdSession

from conftest import until

ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 10.0
LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


class Handler:
    """aiosmtpd wants an event handler; the adapter's subclasses answer everything themselves."""


class Probe(AiosmtpdSession):
    """A session whose serve() runs a script (a coroutine function taking the session) and records
    what the adapter's hooks saw."""

    def __init__(self, script, timeout: float = 30.0, tls_context=None):
        super().__init__(
            Handler(),
            hostname="probe.test",
            ident="ESMTP probe",
            timeout=timeout,
            tls_context=tls_context,
            auth_require_tls=True,
            loop=asyncio.get_running_loop(),
        )
        self.script = script
        self.envelopes = 0
        self.idle_timeouts: list[float] = []
        self.eof_seen = asyncio.Event()
        self.done = asyncio.get_running_loop().create_future()

    def new_envelope(self) -> Envelope:
        self.envelopes += 1
        return Envelope()

    def on_idle_timeout(self) -> None:
        self.idle_timeouts.append(self.loop.time())

    def eof_received(self):
        self.eof_seen.set()
        return super().eof_received()

    async def serve(self) -> None:
        try:
            result = await self.script(self)
        except asyncio.CancelledError:  # (aiosmtpd cancels the session at EOF and connection loss)
            self.done.cancel()
            raise
        except Exception as exc:
            if not self.done.done():
                self.done.set_exception(exc)
            raise
        if not self.done.done():
            self.done.set_result(result)


def run(loop_name: str, main):
    loop = LOOPS[loop_name]()
    try:
        return loop.run_until_complete(asyncio.wait_for(main(), DEADLINE))
    finally:
        loop.close()


async def serve_one(script, client, **kwargs):
    """Listen on 127.0.0.1, run `client(port)` in a thread against one Probe session; the Probe,
    what the client returned, and what serve() returned."""
    sessions: list[Probe] = []

    def factory():
        sessions.append(Probe(script, **kwargs))
        return sessions[-1]

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client_result = await asyncio.to_thread(client, port)
        await until(  # a client that closed at once may be done before the accept
            lambda: sessions, timeout=DEADLINE, interval=0.01, message="the server's session made"
        )
        result = await sessions[0].done
    finally:
        server.close()
    return sessions[0], client_result, result


def read_until(sock: socket.socket, end: bytes) -> bytes:
    data = b""
    sock.settimeout(DEADLINE)
    while not data.endswith(end):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize("loop_name", LOOPS)
def test_connection_starts_serve_with_an_envelope_and_the_verb_table(loop_name):
    async def script(session: Probe):
        await session.push(f"220 {session.hostname} {session.ident}")
        return (
            session.envelopes,
            session.commands.get("EHLO"),
            session.commands.get("NOOP"),
            session.auth_require_tls,
            session.tls_active,
            session.idle_timeout,
        )

    def client(port):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            return read_until(sock, b"\r\n")

    async def main():
        session, greeting, (envelopes, ehlo, noop, require_tls, tls, idle) = await serve_one(script, client)
        assert greeting == b"220 probe.test ESMTP probe\r\n"
        assert envelopes == 1  # connection_made -> _set_rset_state -> _create_envelope
        assert ehlo == session.smtp_EHLO and noop == session.smtp_NOOP  # bound smtp_<VERB> methods
        assert require_tls is True and tls is False and idle == 30.0
        session.auth_require_tls = False
        assert session.auth_require_tls is False
        session.reset_transaction()
        session.end_transaction()
        assert session.envelopes == 3
        fresh = session.new_session()
        assert fresh is not session.session and not fresh.authenticated and fresh.host_name is None

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_the_reader_buffer_helpers(loop_name):
    async def script(session: Probe):
        first = await session.read_until_lf()
        await until(  # not raising: `seen` below says what was buffered
            lambda: session.buffered_bytes() >= len(b"B\r\nC"), timeout=DEADLINE, interval=0.01, raise_on_timeout=False
        )
        seen = (first, session.buffered_bytes(), session.has_buffered_line())
        session.unread(b"X\r\n")
        unread = await session.read_until_lf()
        second = await session.read_until_lf()
        partial = (session.buffered_bytes(), session.has_buffered_line())
        session.discard_buffered()
        after_discard = session.buffered_bytes()
        await session.send(b"done\r\n")
        return seen, unread, second, partial, after_discard, session.reader_holds_socket_paused()

    def client(port):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"A\r\nB\r\nC")
            return read_until(sock, b"\r\n")

    async def main():
        _, reply, (seen, unread, second, partial, after_discard, paused) = await serve_one(script, client)
        assert seen == (b"A\r\n", 4, True)
        assert unread == b"X\r\n" and second == b"B\r\n"
        assert partial == (1, False)
        assert after_discard == 0 and paused is False
        assert reply == b"done\r\n"

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_read_some_keeps_the_order_of_handed_and_buffered_bytes(loop_name):
    """read_some takes bytes that arrive while it waits on an empty buffer as the transport gave
    them (no copy); the rest is buffered. Whatever the mix, the bytes come in order, no read is
    longer than asked, a read cancelled as bytes were handed to it leaves them to the next one,
    and the end of the stream reads as b""."""
    sent = [os.urandom(n) for n in (10, 70_000, 3, 300_000, 5000, 1)]

    async def script(session: Probe):
        got, sizes = [], []
        # a read cancelled right after bytes were handed to it (before it ran again)
        waiting = asyncio.ensure_future(session.read_some(100))
        await asyncio.sleep(0)  # one turn of the loop: the read is waiting
        session.data_received(b"kept")  # (as the transport would)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        got.append(await session.read_some(100))
        await session.send(b"go\r\n")
        for i, size in enumerate((100, 65536, 1, 1 << 20, 7, 1 << 20, 1 << 20, 1 << 20)):
            if i % 3 == 2:
                await asyncio.sleep(0.02)  # let bytes pile up in the buffer
            chunk = await session.read_some(size)
            sizes.append((len(chunk), size))
            got.append(chunk)
            if sum(map(len, got)) >= 4 + sum(map(len, sent)):
                break
        while chunk:
            chunk = await session.read_some(1 << 20)
            got.append(chunk)
        await session.send(b"bye\r\n")
        return got, sizes

    def client(port):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            read_until(sock, b"go\r\n")
            for part in sent:
                sock.sendall(part)
                time.sleep(0.01)  # pacing: the parts arrive apart
            sock.shutdown(socket.SHUT_WR)
            return read_until(sock, b"bye\r\n")

    async def main():
        _, _, (got, sizes) = await serve_one(script, client)
        assert got[0] == b"kept" and got[-1] == b""
        assert b"".join(got[1:]) == b"".join(sent)
        assert all(0 < length <= size for length, size in sizes), sizes

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_eof_leaves_the_session_running(loop_name):
    """aiosmtpd alone cancels the session's task at EOF; through the adapter the lines sent before
    are still read and answered over the half-closed connection."""

    async def script(session: Probe):
        await session.eof_seen.wait()  # (the whole test runs under a deadline: run())
        lines = [await session.read_until_lf(), await session.read_until_lf()]
        with pytest.raises(asyncio.IncompleteReadError):
            await session.read_until_lf()
        await session.send(b"got " + b" ".join(line.strip() for line in lines) + b"\r\n")
        return lines

    def client(port):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"L1\r\nL2\r\n")
            sock.shutdown(socket.SHUT_WR)
            return read_until(sock, b"\r\n")

    async def main():
        _, reply, lines = await serve_one(script, client)
        assert lines == [b"L1\r\n", b"L2\r\n"]
        assert reply == b"got L1 L2\r\n"

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_the_idle_deadline(loop_name):
    """touch_idle_deadline() moves the deadline either way; at the deadline on_idle_timeout() runs
    once and aiosmtpd's _timeout_cb closes the transport. A deadline under a millisecond away works
    on uvloop too (its call_at returns a Handle without when() then)."""

    async def script(session: Probe):
        session.touch_idle_deadline(0.2)
        await asyncio.sleep(0.1)  # time-based: half the deadline passes before it is moved
        touched = session.loop.time()
        session.touch_idle_deadline(0.4)  # later: the timer armed for 0.2 waits on
        assert session.idle_deadline == pytest.approx(touched + 0.4, abs=0.01)
        return touched

    async def soon(session: Probe):
        session.touch_idle_deadline(0.0005)

    def client(port):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            return read_until(sock, b"\r\n")  # b"" once the server closes

    async def main():
        session, received, touched = await serve_one(script, client)
        assert received == b""
        assert len(session.idle_timeouts) == 1
        assert session.idle_timeouts[0] >= touched + 0.4 - 0.005
        session, received, _ = await serve_one(soon, client)
        assert len(session.idle_timeouts) == 1 and received == b""

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_connection_lost_stops_the_idle_timer(loop_name):
    async def script(session: Probe):
        session.touch_idle_deadline(0.3)
        with pytest.raises(asyncio.IncompleteReadError):
            await session.read_until_lf()
        session.transport.close()  # as the hub's session does at its end: connection_lost follows
        return session.idle_deadline

    def client(port):
        socket.create_connection(("127.0.0.1", port)).close()

    async def main():
        errors = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
        session, _, deadline = await serve_one(script, client)
        while asyncio.get_running_loop().time() < deadline + 0.2:  # past the deadline the timer had
            await asyncio.sleep(0.05)
        assert session.idle_timeouts == [] and errors == []

    run(loop_name, main)


@pytest.fixture(scope="module")
def tls_context(self_signed_certificate) -> ssl.SSLContext:
    cert, key = self_signed_certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


@pytest.mark.parametrize("loop_name", LOOPS)
def test_start_tls_in_place(loop_name, tls_context):
    async def script(session: Probe):
        before = await session.read_until_lf()
        await session.send(b"220 go ahead\r\n")
        await session.start_tls(session.tls_context)
        after = await session.read_until_lf()
        await session.send(b"250 over TLS\r\n")
        return before, after, session.tls_active, session.transport.get_extra_info("ssl_object") is not None

    def client(port):
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"STARTTLS\r\n")
            ready = read_until(sock, b"\r\n")
            with context.wrap_socket(sock) as tls:
                tls.sendall(b"NOOP\r\n")
                return ready, read_until(tls, b"\r\n")

    async def main():
        _, (ready, reply), (before, after, active, has_ssl) = await serve_one(script, client, tls_context=tls_context)
        assert (ready, reply) == (b"220 go ahead\r\n", b"250 over TLS\r\n")
        assert (before, after, active, has_ssl) == (b"STARTTLS\r\n", b"NOOP\r\n", True, True)

    run(loop_name, main)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def test_the_installed_aiosmtpd_is_in_the_declared_range():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in dependencies if d.startswith("aiosmtpd"))
    low, high = re.fullmatch(r"aiosmtpd>=([\d.]+),<([\d.]+)", spec).groups()
    installed = _version(importlib.metadata.version("aiosmtpd"))
    assert _version(low) <= installed < _version(high), (spec, installed)


def _private_names() -> set[str]:
    """aiosmtpd SMTP's private attribute names (class and instance) and the StreamReader's."""

    async def build():
        return vars(SMTP(Handler(), loop=asyncio.get_running_loop()))

    instance = asyncio.run(build())
    names = {n for n in list(dir(SMTP)) + list(instance) if n.startswith("_") and not n.endswith("__")}
    names |= {n for n in vars(asyncio.StreamReader(loop=asyncio.new_event_loop())) if n.startswith("_")}
    return names | {"__ident__", "_reader", "_writer"}  # the last two: set at connection


def test_only_the_adapter_touches_aiosmtpd_private_members():
    private = _private_names()
    assert {"_reader", "_writer", "_timeout_handle", "_set_rset_state", "_tls_protocol", "_buffer"} <= private
    offenders, users = [], []
    for path in sorted((ROOT / "relay").rglob("*.py")):
        tree = ast.parse(path.read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        if path.name == "aiosmtpd_adapter.py" or not imported & {"aiosmtpd.smtp", "relay.smtp.aiosmtpd_adapter"}:
            continue  # (other modules' own private names may be spelt alike: _buffer, _transport, ...)
        users.append(path.name)
        for node in ast.walk(tree):
            named = (
                node.attr
                if isinstance(node, ast.Attribute)
                else (node.name if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None)
            )
            if named in private:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {named}")
    assert users == ["connection.py", "context.py", "receiving.py", "server.py"] and offenders == []
