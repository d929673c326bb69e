# The state of one SMTP listener that all its connections share (SmtpContext: configuration,
# storage, sites, limits, the live connections and their admission and shutdown drain) and the state
# of one mail transaction (Transaction: aiosmtpd's envelope plus the hub's deliveries, verdicts and
# the message being received). The sessions themselves are relay.smtp.server.
import asyncio
import ipaddress
import ssl
import time
from collections.abc import Callable
from typing import Protocol

from aiosmtpd.smtp import Envelope

from directory import DirectoryMailer, KeyRing
from quotas import Throttle, Verdict
from relay import connection_limits, metrics
from relay.logins import Logins
from relay.outbound.routes import route_for
from relay.policy.encryption import EncryptionPolicy
from relay.sessions import SessionInfo
from relay.smtp import replies as R
from relay.smtp.ingest import IncomingMessage
from relay.smtp.message_scan import DotLineScanner
from relay.smtp.pacing import Pacer
from relay.smtp.postmaster import PostmasterRate
from storage import Delivery, MessageMeta, Site, SiteCache, Storage

_REFUSALS = {
    connection_limits.TOTAL: R.TOO_MANY_CONNECTIONS,
    connection_limits.PER_ADDRESS: R.TOO_MANY_CONNECTIONS_FROM_ADDRESS,
    connection_limits.UNAUTHENTICATED: R.TOO_MANY_UNAUTHENTICATED,
    connection_limits.UNAUTHENTICATED_PER_ADDRESS: R.TOO_MANY_UNAUTHENTICATED_FROM_ADDRESS,
}


class Connection(Protocol):
    """What the listener sees of a connection (relay.smtp.server.HubSMTP)."""

    ticket: connection_limits.Ticket | None

    @property
    def busy(self) -> bool: ...

    def close_now(self, reply: str) -> None: ...

    def session_info(self) -> SessionInfo: ...

    def kick(self) -> None: ...


class Transaction(Envelope):
    """aiosmtpd's envelope plus what the hub needs per transaction."""

    def __init__(self) -> None:
        super().__init__()
        self.deliveries: list[Delivery] = []
        self.receivers: list[Site] = []  # the local sites of the deliveries
        self.verdicts: dict[int, Verdict] = {}  # the throttle's verdict at RCPT per receiving site
        self.remote: list[str] = []  # recipients to relay to other networks
        self.declared_size: int | None = None
        self.bdat: IncomingMessage | None = None  # the message of an open BDAT series
        self.receiving: IncomingMessage | None = None  # the message of a DATA being received
        self.bdat_dots: DotLineScanner | None = None
        self.bdat_failed = False
        self.pacer: Pacer | None = None  # reads DATA/BDAT bytes no faster than allowed
        self.directory_request = False  # directory@<local domain> was a recipient
        self.postmaster = False  # postmaster@<local domain> was a recipient
        self.postmaster_sites: set[int] = set()  # receiving sites reached through postmaster@ only
        self.policy: EncryptionPolicy | None = None

    @property
    def has_recipients(self) -> bool:
        return bool(self.deliveries or self.remote) or self.directory_request


class SmtpContext:
    """What all SMTP connections share: config, storage, sites, limits, live connections."""

    def __init__(
        self,
        cfg,
        storage: Storage,
        sites: SiteCache,
        tls_context: ssl.SSLContext | None,
        throttle: Throttle,
        directory: DirectoryMailer | None = None,
        keyring: KeyRing | None = None,
        logins: Logins | None = None,
    ):
        self.cfg = cfg
        self.storage = storage
        self.sites = sites
        self.throttle = throttle
        self.tls_context = tls_context
        self.directory = directory
        self.keyring = keyring
        self.connections: set[Connection] = set()
        self.connection_counter = connection_limits.ConnectionCounter(connection_limits.limits_from(cfg.smtp))
        self.logins = logins or Logins.from_config(cfg, sites)  # shared by all protocols (server.py)
        self.shutting_down = False
        # called after each commit with (queue ID, meta, sending site): receipts are linked (relay/lifecycle.py)
        self.on_stored: Callable[[str, MessageMeta, Site | None], None] | None = None
        relay = cfg.relay
        self.has_route = lambda address: relay.enabled and route_for(relay.routes, address) is not None
        self.postmaster_rate = PostmasterRate(cfg.smtp.postmaster_max_per_hour)

    def reconfigure(self, cfg) -> None:
        """A reloaded configuration: connection limits at once, the rest as sessions read it
        (new connections, new transactions). The route table and TLS are not changed here."""
        self.cfg = cfg
        self.connection_counter.limits = connection_limits.limits_from(cfg.smtp)
        self.postmaster_rate.max_per_hour = cfg.smtp.postmaster_max_per_hour

    def admit(self, conn: Connection, ip: str) -> str | None:
        """Count the new connection (conn.ticket); the refusal reply if it is over a limit."""
        if self.shutting_down:
            return R.SHUTTING_DOWN
        admitted = self.connection_counter.admit(ip)
        if isinstance(admitted, str):
            metrics.connection_refused("smtp", admitted)
            return _REFUSALS[admitted]
        conn.ticket = admitted
        self.connections.add(conn)
        return None

    def release(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if conn.ticket is not None:
            conn.ticket.release()

    def is_peer(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in net for net in self.cfg.smtp.peer_networks)

    def site_gone(self, site: Site) -> bool:
        """The site was removed (or removed and made anew) since a session learnt of it."""
        current = self.sites.by_name(site.name)
        return current is None or current.id != site.id

    async def drain(self, timeout: float) -> None:
        """Shutdown: close idle sessions now, give busy ones until `timeout` to finish."""
        self.shutting_down = True
        deadline = time.monotonic() + timeout
        while True:
            for conn in list(self.connections):
                if not conn.busy:
                    conn.close_now(R.SHUTTING_DOWN)
            if not self.connections or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.close_now(R.SHUTTING_DOWN)


__all__ = ["Connection", "SmtpContext", "Transaction"]
