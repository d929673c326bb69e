# postmaster@ of every local domain (and the bare <Postmaster>, RFC 5321 4.1.1.3) reaches the
# operator (RFC 5321 4.5.1): whoever sends it, logged in or not, without TLS, and not under the
# encryption policy. What bounds it: the receiving mailbox's quotas as for any mail, and for
# senders that are not logged-in sites smtp.postmaster_max_message_size per mail and
# smtp.postmaster_max_per_hour mails per client address. Pure decisions with the clock passed in
# (no I/O); the SMTP verbs in relay/smtp/server.py ask. Must never: hold an unbounded number of
# client addresses (the oldest are forgotten first).
from collections import OrderedDict, deque
from collections.abc import Sequence

MAX_CLIENTS = 10_000  # client addresses whose recent mails to postmaster are remembered
WINDOW = 3600.0  # seconds over which smtp.postmaster_max_per_hour counts


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
        """0 and the mail counted when the client may send one more now, else the seconds until
        it may."""
        times = self._sent.get(client)
        if times is None:
            times = self._sent[client] = deque()
            if len(self._sent) > MAX_CLIENTS:
                self._sent.popitem(last=False)
        while times and times[0] <= now - WINDOW:
            times.popleft()
        if len(times) >= self.max_per_hour:
            return times[0] + WINDOW - now
        times.append(now)
        self._sent.move_to_end(client)
        return 0.0
