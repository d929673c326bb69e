# The outbound route table: which next hop (host:port, TLS policy, credentials, connection limit)
# serves which recipient domain. Parsed once from the config ([[relay.routes]] tables, or the compact
# "DOMAIN=HOST:PORT, ..." form of the environment); pure lookups, no I/O. Must never import the
# network code: the config loader uses it.
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TLS_POLICIES = ("none", "opportunistic", "required")
_KEYS = {
    "domain",
    "host",
    "port",
    "tls",
    "ca_file",
    "auth_user",
    "auth_password",
    "auth_password_file",
    "max_connections",
}


@dataclass(frozen=True)
class Route:
    domain: str  # "example.org" (also serves its subdomains) or "*" (everything else)
    host: str
    port: int = 25
    tls: str = "opportunistic"  # none | opportunistic | required (verified certificate)
    ca_file: Path | None = None  # CA bundle for tls = "required" (default: the system's)
    auth_user: str = ""
    auth_password: str = field(default="", repr=False)  # a secret: never in logs or reprs
    max_connections: int = 10

    @property
    def hop(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def destination(self) -> str:
        """The key that connection limits and back-off are counted under: one per route (two
        routes to one host may differ in TLS policy or credentials)."""
        return str(self)

    def __str__(self) -> str:
        return f"{self.domain}={self.hop}"


def parse_routes(value: Any) -> list[Route]:
    """A list of tables (TOML) or of "DOMAIN=HOST:PORT" strings, or one comma-separated string."""
    if isinstance(value, str):
        value = [v for v in (p.strip() for p in value.split(",")) if v]
    if not isinstance(value, list):
        raise ValueError('expected [[relay.routes]] tables or "DOMAIN=HOST:PORT, ..."')
    routes = [_route(item) for item in value]
    seen = set()
    for route in routes:
        if route.domain in seen:
            raise ValueError(f"two routes for domain {route.domain!r}")
        seen.add(route.domain)
    return routes


def _route(item: Any) -> Route:
    if isinstance(item, str):
        domain, sep, hop = item.partition("=")
        host, colon, port_text = hop.rpartition(":")
        if not sep or not colon:
            raise ValueError(f"expected DOMAIN=HOST:PORT, got {item!r}")
        item = {"domain": domain.strip(), "host": host.strip().strip("[]"), "port": port_text.strip()}
    if not isinstance(item, dict):
        raise ValueError(f"a route must be a table, got {item!r}")
    unknown = set(item) - _KEYS
    if unknown:
        raise ValueError(f"unknown route key(s) {', '.join(sorted(unknown))}")
    domain = _string(item, "domain").lower().strip()
    host = _string(item, "host").strip()
    if not domain or not host:
        raise ValueError("a route needs a domain and a host")
    if domain != "*" and not all(label and label.replace("-", "").isalnum() for label in domain.split(".")):
        raise ValueError(f"invalid route domain {domain!r}")
    port = _integer(item.get("port", 25), "port", 1, 65535)
    tls = item.get("tls", "opportunistic")
    if tls not in TLS_POLICIES:
        raise ValueError(f"route {domain}: tls must be one of {', '.join(TLS_POLICIES)}, got {tls!r}")
    password = _string(item, "auth_password")
    password_file = _string(item, "auth_password_file")
    if password and password_file:
        raise ValueError(f"route {domain}: give auth_password or auth_password_file, not both")
    if password_file:
        try:
            password = Path(password_file).expanduser().read_text().rstrip("\r\n")
        except OSError as exc:
            raise ValueError(f"route {domain}: cannot read auth_password_file: {exc.strerror}") from None
    user = _string(item, "auth_user")
    if bool(user) != bool(password):
        raise ValueError(f"route {domain}: auth_user and a password go together")
    ca_file = _string(item, "ca_file")
    if ca_file and not Path(ca_file).expanduser().is_file():
        raise ValueError(f"route {domain}: no such ca_file {ca_file!r}")
    return Route(
        domain=domain,
        host=host,
        port=port,
        tls=tls,
        ca_file=Path(ca_file).expanduser() if ca_file else None,
        auth_user=user,
        auth_password=password,
        max_connections=_integer(item.get("max_connections", 10), "max_connections", 1, 1000),
    )


def _string(item: dict[str, Any], key: str) -> str:
    value = item.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"route key {key} must be a string")
    return value


def _integer(value: Any, key: str, low: int, high: int) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"route key {key} must be an integer from {low} to {high}, got {value!r}")
    return value


def route_for(routes: list[Route], address: str) -> Route | None:
    """The most specific route for the address's domain (the domain itself, then its parents,
    then "*"), or None (also for an address without a domain)."""
    local, at, domain = address.rpartition("@")
    if not (local and at and domain):
        return None
    domain = domain.lower().rstrip(".")
    by_domain = {r.domain: r for r in routes}
    labels = domain.split(".")
    for i in range(len(labels)):
        route = by_domain.get(".".join(labels[i:]))
        if route is not None:
            return route
    return by_domain.get("*")
