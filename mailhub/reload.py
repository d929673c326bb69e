# Reloading the configuration of a running hub (SIGHUP, `mailhub reload`, systemd's ExecReload): which
# keys a running hub can take over live and which need a restart (plan()), and the TLS context whose
# certificate can be swapped under listening sockets (LiveTls). The hub (mailhub/hub.py) reads the
# new configuration, asks plan() and hands the effective configuration to its parts.
# Must never: apply half of a reload (a new configuration or certificate that fails to load changes
# nothing), touch an open session's TLS, or report a key as changed when the running hub still
# uses the old value.
import dataclasses
import ssl
from dataclasses import dataclass
from typing import Any

from storage.usage import LIMIT_NAMES

from .config import SCHEMA, Config

# Keys a running hub takes over at a reload, listed one by one (a key added to the schema later
# needs a restart until it is wired here). Everything else needs a restart; the reload then keeps
# the running value and says so. How each changes live:
#  - the protocol contexts get the new Config (relay/*: reconfigure): limits, timeouts, sizes and
#    policies are read per connection or per transaction, connection limits at once;
#  - throttle and quotas: Throttle.reconfigure; the login guard: its settings;
#  - log.level: the "mailhub" logger; metrics.health_min_free_bytes: the /healthz check;
#    metrics.node: the label of the next scrape;
#  - the directory mailer's request interval and update notices: its Config;
#  - tls.cert_file and tls.key_file: re-read at every reload (a renewed certificate at the same
#    path too), used by new handshakes (LiveTls), as long as TLS stays on.
LIVE: frozenset[tuple[str, str]] = frozenset(
    [("", "shutdown_timeout")]
    + [
        ("smtp", key)
        for key in (
            "max_message_size",
            "max_recipients",
            "max_connections",
            "max_connections_per_ip",
            "max_unauthenticated",
            "max_unauthenticated_per_ip",
            "login_timeout",
            "limit_exempt_networks",
            "max_commands",
            "max_bad_commands",
            "max_line_length",
            "idle_timeout",
            "peer_networks",
        )
    ]
    + [
        (section, key)
        for section in ("pop3", "imap")
        for key in (
            "max_connections_per_ip",
            "max_unauthenticated",
            "max_unauthenticated_per_ip",
            "login_timeout",
            "limit_exempt_networks",
            "idle_timeout",
        )
    ]
    + [("quotas", key) for key in LIMIT_NAMES]  # every [quotas] key is a per-site limit
    + [
        ("throttle", key)
        for key in (
            "drain_admission",
            "floor_bytes",
            "set_overshoot",
            "min_retry",
            "offline_retry",
            "drain_window",
            "drain_tau",
            "offline_grace",
            "pacing",
            "pacing_engage_at",
            "pacing_min_rate",
            "interval",
        )
    ]
    + [("encryption", "required"), ("encryption", "allow_hidden_recipients")]
    + [key for key in SCHEMA if key[0] == "lifecycle"]  # Lifecycle.reconfigure (relay/lifecycle.py)
    + [key for key in SCHEMA if key[0] == "liveness"]  # the monitor's Config, the metrics' stale_after
    + [
        ("auth", key)
        for key in (
            "allow_plaintext",
            "failure_delay",
            "max_failure_delay",
            "penalty_half_life",
            "max_failures",
            "failure_window",
            "block_time",
            "max_penalty_wait",
        )
    ]
    + [
        ("log", "level"),
        ("metrics", "health_min_free_bytes"),
        ("metrics", "node"),
        ("directory", "key_grace_days"),
        ("directory", "min_request_interval"),
        ("directory", "notify_on_change"),
        ("storage", "verify_while_serving"),
        ("tls", "cert_file"),
        ("tls", "key_file"),
    ]
)


@dataclass(frozen=True)
class Plan:
    """What a reload does: `effective` is the new Config with the running values kept for the
    keys in `restart` (what the hub runs with after the reload); `changed` the live keys whose
    value differs (dotted names, in schema order)."""

    effective: Config
    changed: tuple[str, ...]
    restart: tuple[str, ...]


def dotted(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def value_of(cfg: Config, section: str, key: str) -> Any:
    return getattr(getattr(cfg, section) if section else cfg, key)


def plan(running: Config, new: Config) -> Plan:
    """Compare the running configuration with a newly loaded one (both validated)."""
    changed: list[tuple[str, str]] = []
    restart: list[tuple[str, str]] = []
    tls_stays_on = (running.tls.cert_file is None) == (new.tls.cert_file is None)
    for section, key in SCHEMA:
        if value_of(running, section, key) == value_of(new, section, key):
            continue
        live = (section, key) in LIVE and (section != "tls" or tls_stays_on)
        (changed if live else restart).append((section, key))
    if not tls_stays_on:  # TLS on or off: listeners and STARTTLS offers are set up at start
        restart += [key for key in (("tls", "cert_file"), ("tls", "key_file")) if key not in restart]
    effective = new
    for section, key in restart:  # keep what the running hub cannot change
        effective = _replace(effective, section, key, value_of(running, section, key))
    return Plan(effective, tuple(dotted(*k) for k in changed), tuple(dotted(*k) for k in restart))


def _replace(cfg: Config, section: str, key: str, value: Any) -> Config:
    if not section:
        return dataclasses.replace(cfg, **{key: value})
    part = dataclasses.replace(getattr(cfg, section), **{key: value})
    return dataclasses.replace(cfg, **{section: part})


class LiveTls:
    """The one SSLContext every TLS listener and every STARTTLS of the hub is given (`front`), and
    the context loaded last (`current`). The front context's SNI callback, which OpenSSL calls
    for each new handshake whether or not the client names a server, hands the handshake the
    current context: a reload swaps certificates without reopening a listening socket, and
    sessions already encrypted keep theirs."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.front = context
        self.current = context
        context.sni_callback = self._pick

    def replace(self, context: ssl.SSLContext) -> None:
        self.current = context

    def _pick(self, ssl_object: Any, _server_name: str | None, _context: ssl.SSLContext) -> None:
        current = self.current
        if current is not self.front:
            ssl_object.context = current
