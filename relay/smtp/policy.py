# Relay control of the SMTP ingress: who may use which envelope sender and recipient.
# Pure decisions on the facts given (no I/O); the server turns the reply constants into replies.
from collections.abc import Callable
from dataclasses import dataclass

from relay.smtp import replies as R
from storage import Site


@dataclass(frozen=True, slots=True)
class Client:
    site: Site | None  # the authenticated site, if any
    from_peer_network: bool


def sender_verdict(client: Client, address: str) -> str | None:
    """None when the envelope sender is acceptable, else the reply."""
    if client.site is None or address == "":
        return None
    if address.lower() not in (a.lower() for a in client.site.addresses):
        return R.SENDER_NOT_OWNED
    return None


def recipient_verdict(
    client: Client,
    address: str,
    local_domains: list[str],
    lookup: Callable[[str], Site | None],
    has_route: Callable[[str], bool],
) -> tuple[str | None, Site | None]:
    """(None, site) when the recipient is a local site's address, (None, None) when it is a remote
    address to relay (authenticated sites only, along a configured route), else (reply, None)."""
    domain = address.rpartition("@")[2].lower()
    if domain not in local_domains:
        if client.site is None:
            return R.RELAY_DENIED, None
        if not has_route(address):
            return R.NO_ROUTE, None
        return None, None
    if client.site is None and not client.from_peer_network:
        return R.AUTH_REQUIRED, None
    site = lookup(address)
    if site is None:
        return R.UNKNOWN_USER, None
    return None, site
