# Connection limits of one protocol's listeners (as Postfix's anvil and Dovecot's per-IP limits):
# open connections per client address and in total, and, counted apart, those that have not
# logged in yet (what an idle or slow client can hold without credentials). Pure counting: the
# servers ask admit() when a connection arrives, tell the ticket when it logs in and when it ends.
# Addresses of exempt networks (e.g. a load generator, smtp.peer_networks) are held only to the
# totals. Must never: do I/O, count a connection twice, or forget one (release is idempotent).
import ipaddress
from dataclasses import dataclass

from relay.login_guard import client_key

# refusal reasons (metric labels)
TOTAL = "total"
PER_ADDRESS = "per_address"
UNAUTHENTICATED = "unauthenticated"
UNAUTHENTICATED_PER_ADDRESS = "unauthenticated_per_address"


@dataclass(frozen=True)
class Limits:
    total: int
    per_address: int
    unauthenticated: int
    unauthenticated_per_address: int
    exempt_networks: tuple = ()


def limits_from(section) -> Limits:
    """The limits of a protocol's config section ([smtp], [pop3], [imap])."""
    return Limits(
        section.max_connections,
        section.max_connections_per_ip,
        section.max_unauthenticated,
        section.max_unauthenticated_per_ip,
        tuple(section.limit_exempt_networks),
    )


class Ticket:
    """One admitted connection: logged_in() once it has authenticated, release() when it ends."""

    __slots__ = ("_counter", "address", "exempt", "authenticated", "released")

    def __init__(self, counter: "ConnectionCounter", address: str, exempt: bool) -> None:
        self._counter = counter
        self.address = address
        self.exempt = exempt
        self.authenticated = False
        self.released = False

    def logged_in(self) -> None:
        if not self.authenticated and not self.released:
            self.authenticated = True
            self._counter._count_login(self)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._counter._count_release(self)


class ConnectionCounter:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.open = 0
        self.unauthenticated = 0
        self._per_address: dict[str, int] = {}
        self._unauthenticated_per_address: dict[str, int] = {}

    def admit(self, ip: str) -> Ticket | str:
        """A ticket for the new connection from `ip`, or the reason it is refused."""
        limits = self.limits
        address = client_key(ip)
        exempt = _in_networks(ip, limits.exempt_networks)
        if self.open >= limits.total:
            return TOTAL
        if self.unauthenticated >= limits.unauthenticated:
            return UNAUTHENTICATED
        if not exempt:
            if self._per_address.get(address, 0) >= limits.per_address:
                return PER_ADDRESS
            if self._unauthenticated_per_address.get(address, 0) >= limits.unauthenticated_per_address:
                return UNAUTHENTICATED_PER_ADDRESS
        self.open += 1
        self.unauthenticated += 1
        _add(self._per_address, address, 1)
        _add(self._unauthenticated_per_address, address, 1)
        return Ticket(self, address, exempt)

    def from_address(self, ip: str) -> tuple[int, int]:
        """(open, not logged in) connections of the address of `ip`."""
        address = client_key(ip)
        return self._per_address.get(address, 0), self._unauthenticated_per_address.get(address, 0)

    def _count_login(self, ticket: Ticket) -> None:
        self.unauthenticated -= 1
        _add(self._unauthenticated_per_address, ticket.address, -1)

    def _count_release(self, ticket: Ticket) -> None:
        self.open -= 1
        _add(self._per_address, ticket.address, -1)
        if not ticket.authenticated:
            self.unauthenticated -= 1
            _add(self._unauthenticated_per_address, ticket.address, -1)


def _add(table: dict[str, int], key: str, delta: int) -> None:
    value = table.get(key, 0) + delta
    if value > 0:
        table[key] = value
    else:
        table.pop(key, None)


def _in_networks(ip: str, networks) -> bool:
    if not networks:
        return False
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address.version == net.version and address in net for net in networks)


__all__ = [
    "ConnectionCounter",
    "Limits",
    "Ticket",
    "limits_from",
    "PER_ADDRESS",
    "TOTAL",
    "UNAUTHENTICATED",
    "UNAUTHENTICATED_PER_ADDRESS",
]
