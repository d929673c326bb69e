# The control-socket commands about password guessing (mailhub/control.py): `auth.blocks` lists the
# login guard's penalised addresses and blocked (site, address) pairs, `auth.unblock` lifts them.
# The CLI side is `mailhub auth blocks` / `mailhub auth unblock`. Must never: reveal a password.
import ipaddress

from relay.login_guard import client_key
from relay.logins import Logins

from .control import ControlError, ControlServer


def register_auth_commands(control: ControlServer, logins: Logins) -> None:
    guard = logins.guard

    def blocks(_request: dict) -> dict:
        return {"addresses": guard.listing(logins.clock()), "checks_waiting": logins.sites.checks_pending}

    def unblock(request: dict) -> dict:
        address, site = request.get("address"), request.get("site")
        if not isinstance(address, str) or (site is not None and not isinstance(site, str)):
            raise ControlError('auth.unblock needs "address" (and optionally "site") as strings')
        key = _address_key(address)
        return {"address": key, "removed": guard.unblock(key, site)}

    control.register("auth.blocks", blocks)
    control.register("auth.unblock", unblock)


def _address_key(text: str) -> str:
    """The guard's key for an address as an operator types it: 192.0.2.7, 2001:db8::1, or an IPv6
    /64 as `mailhub auth blocks` shows it."""
    text = text.strip()
    try:
        if "/" in text:
            network = ipaddress.ip_network(text, strict=False)
            if network.version == 6 and network.prefixlen == 64:
                return str(network)
            raise ControlError(f"{text}: give an address, or an IPv6 /64 as `mailhub auth blocks` lists it")
        return client_key(str(ipaddress.ip_address(text)))
    except ValueError:
        raise ControlError(f"{text!r} is not an IP address") from None
