# Behind a TCP balancer (HAProxy `send-proxy-v2`): the first protocol of every connection on a
# listener when proxy.trusted_balancers is set. From a trusted balancer it reads the PROXY header
# (relay/proxy_header.py) byte-exactly -- bounded in size and time -- then, for an implicit-TLS
# listener, does the TLS handshake, and hands the connection to the listener's own protocol (SMTP,
# POP3, IMAP) with the client's address from the header (`proxied_peer`), which that protocol then
# uses for everything that depends on it: peer networks, per-address limits and login penalties,
# logs, Received:, the sessions listing. Any other peer is handed over at once, as without a
# balancer, and its bytes go to the protocol unread: a PROXY header from it is never believed.
# Why not aiosmtpd's own PROXY support (SMTP(proxy_protocol_timeout=...)): it wants a header from
# every peer (no list of balancers), keeps session.peer at the balancer's address (the client's is
# only in session.proxy_data), reads it in _handle_client, which the hub replaces (serve()), after
# the connection was counted against the balancer's address; and POP3/IMAP need the same anyway.
# Must never: believe a header from an address outside proxy.trusted_balancers, read a byte past
# the header (it belongs to the protocol or the TLS handshake), keep a connection without a valid
# header from a balancer, or leave a connection or task behind after close_pending().
import asyncio
import asyncio.sslproto as sslproto
import ipaddress
import logging
import ssl
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from relay import metrics
from relay.mailbox_session import client_ip, printable
from relay.proxy_header import ProxyHeaderError, ProxyHeaderReader

log = logging.getLogger("mailhub.proxy")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Proxied(Protocol):
    """What a listener's protocol offers for the gate: the client's (address, port) from the
    header, set before connection_made(); None = the connection's own peer."""

    proxied_peer: tuple[str, int] | None

    def connection_made(self, transport: Any) -> None: ...


class ProxyGates:
    """The gates of one hub: which peers are balancers, how long a header may take, and the
    connections still reading one (closed by close_pending() at shutdown)."""

    def __init__(self, trusted: Sequence[Network], header_timeout: float):
        self.trusted = tuple(trusted)
        self.header_timeout = header_timeout
        self.pending: set[ProxyGate] = set()

    def trusts(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.trusted)

    def factory(
        self, listener: str, inner: Callable[[], Proxied], tls: ssl.SSLContext | None = None
    ) -> Callable[[], "ProxyGate"]:
        """The protocol factory of a listener (smtp, pop3, pop3s, imap, imaps) behind the balancer
        (`tls`: an implicit-TLS one, whose handshake comes after the header)."""
        return lambda: ProxyGate(self, listener, inner, tls)

    def close_pending(self) -> None:
        for gate in list(self.pending):
            gate.abort()


class ProxyGate(asyncio.BufferedProtocol):
    """One connection until its header is read (see the module comment)."""

    def __init__(self, gates: ProxyGates, listener: str, inner: Callable[[], Proxied], tls: ssl.SSLContext | None):
        self._gates = gates
        self._listener = listener
        self._protocol = {"pop3s": "pop3", "imaps": "imap"}.get(listener, listener)  # metric and log label
        self._inner = inner
        self._tls = tls
        self._transport: asyncio.Transport | None = None
        self._peer = "-"
        self._reader = ProxyHeaderReader()
        self._chunk = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a stream server's transport
        self._peer = client_ip(None, transport)
        if not self._gates.trusts(self._peer):
            self._hand_over(None)  # a direct client: its own address, its bytes to the protocol
            return
        self._gates.pending.add(self)
        self._timer = asyncio.get_running_loop().call_later(self._gates.header_timeout, self._expired)

    def get_buffer(self, sizehint: int) -> memoryview:
        self._chunk = bytearray(max(1, self._reader.wanted()))  # never more than the header
        return memoryview(self._chunk)

    def buffer_updated(self, nbytes: int) -> None:
        if self._done:
            return
        try:
            header = self._reader.feed(bytes(self._chunk[:nbytes]))
        except ProxyHeaderError as exc:
            self._refuse(str(exc))
            return
        if header is not None:
            self._hand_over(header.source)

    def eof_received(self) -> bool:
        if not self._done:
            # a plain TCP check (no check-send-proxy) opens and closes without a byte: not worth a warning
            if self._reader.wanted() == 15:
                log.debug("%s connection from balancer %s closed before a PROXY header", self._listener, self._peer)
            else:
                self._refuse("closed in the middle of the PROXY header")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish()

    def abort(self) -> None:
        """Shutdown, or a refusal: the header is not read yet."""
        self._finish()
        if self._transport is not None:
            self._transport.abort()

    def _finish(self) -> None:
        self._done = True
        self._gates.pending.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        self._refuse(f"no complete PROXY header within {self._gates.header_timeout:g}s")

    def _refuse(self, reason: str) -> None:
        log.warning(
            "%s connection from balancer %s closed: %s",
            self._listener,
            self._peer,
            printable(reason),
            extra={"event": "proxy.refused", "protocol": self._protocol, "client": self._peer, "reason": reason},
        )
        metrics.connection_refused(self._protocol, "proxy_header")
        self.abort()

    def _hand_over(self, source: tuple[str, int] | None) -> None:
        """To the listener's protocol, at once (synchronously: the next bytes read from the socket,
        a TLS ClientHello or a command, are already theirs)."""
        assert self._transport is not None
        self._finish()
        inner = self._inner()
        inner.proxied_peer = source
        if self._tls is None:
            self._transport.set_protocol(inner)  # type: ignore[arg-type]
            inner.connection_made(self._transport)
            return
        # What create_server(ssl=...) does, after the header: asyncio's TLS layer over this
        # transport, which calls inner.connection_made() once the handshake is done (a failed or
        # timed-out handshake closes the connection).
        tls = sslproto.SSLProtocol(
            asyncio.get_running_loop(),
            inner,  # type: ignore[arg-type]
            self._tls,
            None,  # type: ignore[arg-type]  # no waiter (typeshed says a Future; None is what asyncio passes too)
            server_side=True,
            call_connection_made=True,
        )
        self._transport.set_protocol(tls)
        tls.connection_made(self._transport)
