# postmaster@ of every local domain (and the bare <Postmaster>, RFC 5321 4.1.1.3) reaches the
# operator (RFC 5321 4.5.1): whoever sends it, logged in or not, without TLS, and not under the
# encryption policy. What bounds it: the receiving mailbox's quotas as for any mail, and for
# senders that are not logged-in sites smtp.postmaster_max_message_size per mail and
# smtp.postmaster_max_per_hour mails per client (an IPv4 address, an IPv6 /64: one host has a whole
# /64 to rotate through), and GLOBAL_FACTOR times that from all of them together, so that a flood
# from many addresses cannot fill the operator's mailbox either. Pure decisions with the clock
# passed in (no I/O); the SMTP verbs in relay/smtp/server.py ask. Must never: hold an unbounded
# number of client addresses (the oldest are forgotten first).
import ipaddress
from collections import OrderedDict, deque
from collections.abc import Sequence

MAX_CLIENTS = 10_000  # clients whose recent mails to postmaster are remembered
WINDOW = 3600.0  # seconds over which smtp.postmaster_max_per_hour counts
GLOBAL_FACTOR = 20  # mails per hour from all outside clients together: this times the per-client limit
ALL_CLIENTS = "*"


def client_key(address: str) -> str:
    """What one client is for the count: the IPv4 address, or the /64 of an IPv6 address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


def is_postmaster(address: str, local_domains: Sequence[str]) -> bool:
    """postmaster@<a local domain>, or the bare "Postmaster", in any case."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address.lower() == "postmaster"
    return local.lower() == "postmaster" and domain.lower() in local_domains


class PostmasterRate:
    """Mails to postmaster per client address over the last hour (a sliding window)."""

    def __init__(self, max_per_hour: int) -> None:
        self.max_per_hour = max_per_hour
        self._sent: OrderedDict[str, deque[float]] = OrderedDict()

    def take(self, client: str, now: float) -> float:
        """0 and the mail counted when the client (its address) may send one more now, else the
        seconds until it may."""
        everyone = self._recent(ALL_CLIENTS, now)
        if len(everyone) >= self.max_per_hour * GLOBAL_FACTOR:
            return everyone[0] + WINDOW - now
        key = client_key(client)
        times = self._recent(key, now)
        if len(times) >= self.max_per_hour:
            return times[0] + WINDOW - now
        times.append(now)
        everyone.append(now)
        self._sent.move_to_end(key)
        return 0.0

    def _recent(self, key: str, now: float) -> deque[float]:
        """The times of the key's mails within the window (a new entry forgets the oldest client
        past MAX_CLIENTS; the all-clients entry is never the oldest for long: it moves on each use)."""
        times = self._sent.get(key)
        if times is None:
            times = self._sent[key] = deque()
            if len(self._sent) > MAX_CLIENTS:
                oldest = next(iter(self._sent))
                if oldest == ALL_CLIENTS:
                    self._sent.move_to_end(ALL_CLIENTS)
                    oldest = next(iter(self._sent))
                del self._sent[oldest]
        while times and times[0] <= now - WINDOW:
            times.popleft()
        if key == ALL_CLIENTS:
            self._sent.move_to_end(ALL_CLIENTS)
        return times
