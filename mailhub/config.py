# Configuration: one typed, immutable object (a frozen dataclass per section) loaded once from the
# built-in defaults, an optional TOML file and MAILHUB_<SECTION>_<KEY> environment variables, and
# validated as a whole. Each field declares its key's parser, default and documentation (setting()),
# so the loader, the environment names and docs/configuration.md all read the same schema. A changed
# configuration (tests, a reload) is a new object: Config.with_overrides() or dataclasses.replace().
# Must never let an invalid value through: errors are one line naming the key and the source.
import dataclasses
import difflib
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from relay.outbound.routes import Route
    from storage.index import IndexLocation

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Parser = Callable[[Any], Any]
P = TypeVar("P", bound=Callable[..., Any])

ENV_PREFIX = "MAILHUB_"


class ConfigError(Exception):
    """Invalid configuration; the message names the key and is one line."""


def _kind(text: str) -> Callable[[P], P]:
    """Marks a parser with its value's type in words (shown in docs/configuration.md)."""

    def mark(parse: P) -> P:
        parse.kind = text  # type: ignore[attr-defined]
        return parse

    return mark


@_kind("HOST:PORT, or empty to disable")
def _listen(value: Any) -> tuple[str, int] | None:
    """ "HOST:PORT" (IPv6 as "[::1]:PORT"); an empty string disables the listener."""
    if not isinstance(value, str):
        raise ValueError("expected a string HOST:PORT")
    if value == "":
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


@_kind("HOST:PORT")
def _required_listen(value: Any) -> tuple[str, int]:
    address = _listen(value)
    if address is None:
        raise ValueError("this listener cannot be disabled; give HOST:PORT")
    return address


def _str_list(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [v for v in (p.strip() for p in value.split(",")) if v]
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of strings (or a comma-separated string)")
    return value


@_kind("list of domains")
def _domains(value: Any) -> tuple[str, ...]:
    domains = tuple(d.lower() for d in _str_list(value))
    if not domains:
        raise ValueError("at least one domain is needed")
    return domains


@_kind("list of CIDR networks")
def _networks(value: Any) -> tuple[Network, ...]:
    try:
        return tuple(ipaddress.ip_network(v, strict=False) for v in _str_list(value))
    except ValueError as exc:
        raise ValueError(f"expected CIDR networks: {exc}") from None


def _int(minimum: int) -> Callable[[Any], int]:
    @_kind(f"integer >= {minimum}")
    def parse(value: Any) -> int:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"expected an integer >= {minimum}, got {value!r}")
        return value

    return parse


_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
MAX_SIZE = 2**63 - 1  # what SQLite's INTEGER holds (a larger size ended in a traceback at the index)


@_kind("size: octets, or with a unit K, M, G, T")
def parse_size(value: Any) -> int:
    """Octets as an integer or a string with a binary unit: 500M, 2G, 64K (0 is allowed)."""
    octets = value
    if isinstance(value, str):
        text = value.strip().upper().removesuffix("B").removesuffix("I")
        number, unit = (text[:-1], text[-1]) if text[-1:] in ("K", "M", "G", "T") else (text, "")
        try:
            factor = _SIZE_UNITS[unit]
            octets = int(number) * factor if number.isdigit() else int(float(number) * factor)
        except (ValueError, OverflowError):
            octets = None
    if isinstance(octets, bool) or not isinstance(octets, int) or not 0 <= octets <= MAX_SIZE:
        raise ValueError(f"expected a size in octets (e.g. 1048576, 500M, 2G), got {value!r}")
    return octets


@_kind("number >= 0 (0: off)")
def _zero_or_more(value: Any) -> float:
    """A number >= 0 (0 turns the thing off)."""
    if not isinstance(value, bool) and value in (0, "0", "0.0"):
        return 0.0
    return _number(value)


@_kind("number from 0 to 10")
def _fraction(value: Any) -> float:
    number = _number(value) if value not in (0, "0") else 0.0
    if number > 10:
        raise ValueError(f"expected a fraction between 0 and 10, got {value!r}")
    return number


@_kind("number > 0")
def _number(value: Any) -> float:
    try:
        number = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or not math.isfinite(number) or number <= 0:
        raise ValueError(f"expected a positive number, got {value!r}")
    return number


@_kind("list of route tables")
def _routes(value: Any) -> tuple["Route", ...]:
    from relay.outbound.routes import parse_routes  # the route table's own parser and checks

    return tuple(parse_routes(value))


@_kind("true or false")
def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.lower() in ("1", "true", "yes", "on")
    raise ValueError(f"expected true or false, got {value!r}")


@_kind("path")
def _path(value: Any) -> Path:
    if not isinstance(value, str):
        raise ValueError("expected a path string")
    return Path(value).expanduser()


@_kind("path, or empty for none")
def _optional_path(value: Any) -> Path | None:
    return _path(value) if value != "" else None


def _choice(*choices: str) -> Callable[[Any], str]:
    @_kind(" | ".join(choices))
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return str(value)

    return parse


@_kind("string")
def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = re.compile(rf"{_ATOM}(\.{_ATOM})*")


@_kind("local part of an address")
def _local_part(value: Any) -> str:
    if not isinstance(value, str) or not _DOT_ATOM.fullmatch(value):
        raise ValueError(f"expected the local part of an address (before the @), got {value!r}")
    return value.lower()


@dataclass(frozen=True)
class Option:
    """One key of the schema: how its value is parsed and checked, its default as written in TOML,
    and what it does (for docs/configuration.md and example.toml)."""

    parse: Parser
    default: Any
    doc: str

    @property
    def kind(self) -> str:
        """The value's type in words (set on each parser by @_kind)."""
        return str(self.parse.kind)  # type: ignore[attr-defined]


def setting(parse: Parser, default: Any, doc: str, secret: bool = False) -> Any:
    """A dataclass field for one key: its typed default is the parsed TOML default. A `secret` key
    is kept out of reprs and masked by `mailhub config show`."""
    return field(default=parse(default), repr=not secret, metadata={"option": Option(parse, default, doc)})


# One frozen dataclass per section, one field per key (in the order of docs/configuration.md).
# `python -m mailhub.config_reference` writes docs/configuration.md and mailhub/example.toml from
# these fields (never edit those by hand). A new key: add a setting() here with its doc, then run
# that and `python3 scripts/ansible_role_settings.py` (tests fail until both outputs match).


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    """The [smtp] section (SECTION_DOCS["smtp"])."""

    listen: tuple[str, int] = setting(
        _required_listen,
        "127.0.0.1:2525",
        'Address of the SMTP listener, HOST:PORT ("[::1]:25" for IPv6). Port 0 picks a free port.',
    )
    max_message_size: int = setting(
        _int(1),
        2 * 1024**3,
        "Largest message accepted, in bytes (announced as SIZE; SIZE= over it is refused with 552 5.3.4).",
    )
    max_recipients: int = setting(_int(1), 1000, "Recipients per transaction; more get 452 4.5.3.")
    postmaster_max_message_size: int = setting(
        parse_size,
        "2M",
        "Largest mail to postmaster@ (which reaches lifecycle.operator_address, RFC 5321 4.5.1) from a "
        "client that is not a logged-in site; over it: 552 5.3.4.",
    )
    postmaster_max_per_hour: int = setting(
        _int(1),
        10,
        "Mails to postmaster@ per client (IPv4 address, IPv6 /64) and hour from clients that are not "
        "logged-in sites, and 20 times that from all of them together; more get 450 4.7.1.",
    )
    max_connections: int = setting(_int(1), 1000, "Simultaneous SMTP connections in all; more get 421 4.7.0.")
    max_connections_per_ip: int = setting(
        _int(1), 100, "Simultaneous SMTP connections from one client address; more get 421 4.7.0."
    )
    max_unauthenticated: int = setting(
        _int(1),
        500,
        "Of those, connections that have not logged in yet (from smtp.peer_networks: not started "
        "a transaction), in all; more get 421 4.7.0.",
    )
    max_unauthenticated_per_ip: int = setting(
        _int(1),
        20,
        "Connections not logged in yet (from smtp.peer_networks: not started a transaction) from "
        "one client address; more get 421 4.7.0.",
    )
    login_timeout: float = setting(
        _number,
        60,
        "Seconds a connection may take to authenticate (from smtp.peer_networks, which need no "
        "AUTH: to start a transaction with MAIL FROM), however many bytes it sends meanwhile; "
        "then 421 4.4.2.",
    )
    limit_exempt_networks: tuple[Network, ...] = setting(
        _networks,
        [],
        "Client networks (CIDR) held only to the totals above, not to the per-address limits "
        "(e.g. a load generator on 127.0.0.0/8); smtp.peer_networks are not exempt unless listed "
        "here too. docs/hostile-clients.md explains all the limits.",
    )
    max_commands: int = setting(
        _int(10),
        100000,
        "Commands of one kind one connection may send before it is closed with 421 (guards against loops).",
    )
    max_bad_commands: int = setting(
        _int(1),
        20,
        "Malformed or unknown commands (replies 500, 501, 504, 555) one connection may send "
        "before it is closed with 421 4.7.0.",
    )
    max_line_length: int = setting(
        _int(512), 2048, "Longest command line in bytes (RFC 5321 asks for at least 512); longer lines get 500 5.5.6."
    )
    idle_timeout: float = setting(
        _number,
        300,
        "Seconds without a command (or without data during DATA/BDAT) before the connection is closed with 421.",
    )
    peer_networks: tuple[Network, ...] = setting(
        _networks, [], "Client networks (CIDR) that may deliver to local sites without authenticating (never relay)."
    )
    memory_budget: int = setting(
        parse_size,
        "256M",
        "Memory held for all mails in flight (received bytes queued for the disk, small mails "
        "waiting to be packed). Past it, mails go to their spool files at once and senders are "
        "read no faster than the disk takes their data. Each connection may hold about 256 KB "
        "more in its socket buffer.",
    )


@dataclass(frozen=True, slots=True)
class Pop3Config:
    """The [pop3] section (SECTION_DOCS["pop3"])."""

    listen: tuple[str, int] | None = setting(_listen, "127.0.0.1:1110", "Address of the POP3 listener.")
    pop3s_listen: tuple[str, int] | None = setting(
        _listen, "", "Address of the POP3S listener (implicit TLS); empty disables it. Needs [tls]."
    )
    max_connections: int = setting(
        _int(1), 1000, 'Simultaneous POP3 and POP3S connections in all; more get "-ERR [SYS/TEMP]" and are closed.'
    )
    max_connections_per_ip: int = setting(
        _int(1),
        50,
        'Simultaneous POP3 and POP3S connections from one client address; more get "-ERR [IN-USE]" and are closed.',
    )
    max_unauthenticated: int = setting(
        _int(1),
        500,
        "Of those, connections that have not logged in yet, in all (what clients can hold without "
        'credentials); more get "-ERR [SYS/TEMP]".',
    )
    max_unauthenticated_per_ip: int = setting(
        _int(1), 20, 'Connections not logged in yet from one client address; more get "-ERR [IN-USE]".'
    )
    login_timeout: float = setting(
        _number,
        60,
        "Seconds a connection may take to log in, however many bytes it sends meanwhile; then it is closed.",
    )
    limit_exempt_networks: tuple[Network, ...] = setting(
        _networks,
        [],
        "Client networks (CIDR) held only to the totals above, not to the per-address limits "
        "(e.g. a load generator on 127.0.0.0/8). docs/hostile-clients.md explains all the limits.",
    )
    idle_timeout: float = setting(
        _number,
        600,
        "Seconds without a command (or without progress while sending a message) before the "
        "connection is closed without a reply and without deleting anything (RFC 1939 asks for at "
        "least 600).",
    )


@dataclass(frozen=True, slots=True)
class ImapConfig:
    """The [imap] section (SECTION_DOCS["imap"])."""

    listen: tuple[str, int] | None = setting(
        _listen, "127.0.0.1:1143", "Address of the IMAP listener; empty disables it."
    )
    imaps_listen: tuple[str, int] | None = setting(
        _listen, "", "Address of the IMAPS listener (implicit TLS); empty disables it. Needs [tls]."
    )
    max_connections: int = setting(
        _int(1),
        1000,
        'Simultaneous IMAP and IMAPS connections in all; more get "* BYE [UNAVAILABLE] ..." and are closed.',
    )
    max_connections_per_ip: int = setting(
        _int(1),
        50,
        'Simultaneous IMAP and IMAPS connections from one client address; more get "* BYE '
        '[UNAVAILABLE] ..." and are closed.',
    )
    max_unauthenticated: int = setting(
        _int(1),
        500,
        "Of those, connections that have not logged in yet, in all (what clients can hold without "
        'credentials); more get "* BYE [UNAVAILABLE]".',
    )
    max_unauthenticated_per_ip: int = setting(
        _int(1), 20, 'Connections not logged in yet from one client address; more get "* BYE [UNAVAILABLE]".'
    )
    login_timeout: float = setting(
        _number,
        60,
        "Seconds a connection may take to log in, however many bytes it sends meanwhile; then it is closed.",
    )
    limit_exempt_networks: tuple[Network, ...] = setting(
        _networks,
        [],
        "Client networks (CIDR) held only to the totals above, not to the per-address limits "
        "(e.g. a load generator on 127.0.0.0/8). docs/hostile-clients.md explains all the limits.",
    )
    idle_timeout: float = setting(
        _number,
        1860,
        "Seconds without a command (also while idling in IDLE, or without progress while sending) "
        'before the server says "* BYE" and closes (RFC 3501 asks for at least 30 minutes; '
        "clients renew IDLE every 29 minutes).",
    )


@dataclass(frozen=True, slots=True)
class QuotasConfig:
    """The [quotas] section (SECTION_DOCS["quotas"])."""

    mailbox_bytes: int = setting(
        parse_size, "50G", "Mailbox of a receiving site: octets held (downloaded or not). Over it: 452 4.2.2."
    )
    mailbox_messages: int = setting(
        _int(0), 200000, "Mailbox of a receiving site: mails held (downloaded or not). Over it: 452 4.2.2."
    )
    max_message_size: int = setting(
        parse_size, 0, "Largest message a site may send or receive (0: only smtp.max_message_size). Over it: 552 5.3.4."
    )
    submitted_per_day: int = setting(
        parse_size, 0, "Octets a site may submit per UTC day. Over it: 451 4.7.1, with the time to retry in the reply."
    )
    submitted_per_month: int = setting(
        parse_size,
        0,
        "Octets a site may submit per UTC month. Over it: 451 4.7.1, with the time to retry in the reply.",
    )
    received_per_day: int = setting(
        parse_size, 0, "Octets a site may receive per UTC day. Over it: 452 4.2.1, with the time to retry in the reply."
    )
    received_per_month: int = setting(
        parse_size,
        0,
        "Octets a site may receive per UTC month. Over it: 452 4.2.1, with the time to retry in the reply.",
    )
    max_drain_time: float = setting(
        _number,
        1800,
        "Seconds a receiving site may need to download what waits for it (backlog / drain rate). "
        "New mail that would push it over is deferred with 451 4.7.0 saying why and when to "
        "retry.",
    )
    downlink: int = setting(
        parse_size, "1M", "Drain rate (octets/s) assumed for a site before its downloads have been measured."
    )


@dataclass(frozen=True, slots=True)
class ThrottleConfig:
    """The [throttle] section (SECTION_DOCS["throttle"])."""

    drain_admission: bool = setting(_bool, True, "Defer mail by the receiver's drain time (false: static quotas only).")
    floor_bytes: int = setting(
        parse_size,
        "16M",
        "A receiver whose backlog with the new mail stays within this always receives (new, quiet sites).",
    )
    set_overshoot: float = setting(
        _fraction, 0.25, "A sender may finish a study set it started beyond the drain limit by this fraction of it."
    )
    min_retry: float = setting(_number, 60, "Shortest retry time (seconds) a deferral suggests.")
    offline_retry: float = setting(
        _number, 600, "Retry time (seconds) a deferral suggests when the receiver is not polling."
    )
    drain_window: float = setting(_number, 60, "Drain-rate estimate: seconds of waiting time per sample.")
    drain_tau: float = setting(_number, 300, "Drain-rate estimate: time constant (seconds) of the moving estimate.")
    offline_grace: float = setting(
        _number, 900, "Seconds without a poll after which a site counts as draining nothing."
    )
    pacing: bool = setting(
        _bool,
        True,
        "Read a sender's data no faster than its lagging receivers drain (never below "
        "pacing_min_rate octets/s); engaged once a receiver's drain time (counting sizes declared "
        "by transactions in flight) passes pacing_engage_at times its limit: by default only when "
        "the hub is over capacity for that receiver, e.g. a whole-study mail bigger than the "
        "receiver can drain in time.",
    )
    pacing_engage_at: float = setting(
        _fraction,
        1.0,
        "Pacing engages once a receiver's drain time passes this many times its limit (quotas.max_drain_time).",
    )
    pacing_min_rate: int = setting(
        parse_size, "64K", "Pacing never reads a sender slower than this many octets a second."
    )
    interval: float = setting(
        _number, 1, "Seconds between drain-rate readings (and refreshes of the usage figures from the index)."
    )


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """The [metrics] section (SECTION_DOCS["metrics"])."""

    listen: tuple[str, int] | None = setting(
        _listen,
        "127.0.0.1:9425",
        "Address of the Prometheus metrics endpoint (/metrics and /healthz); empty disables it.",
    )
    health_min_free_bytes: int = setting(
        _int(0),
        1024**3,
        "/healthz answers 503 when the data folder's file system has less free space than this (bytes).",
    )
    node: str = setting(
        _text,
        "",
        'Name of this hub node, added as the label node="..." to every metric it exports, so that the '
        "nodes of a cluster scraped into one Prometheus are told apart; empty: no node label (one hub).",
    )


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """The [tls] section (SECTION_DOCS["tls"])."""

    cert_file: Path | None = setting(
        _optional_path,
        "",
        "PEM certificate chain; with tls.key_file set, SMTP offers STARTTLS, POP3 STLS and IMAP STARTTLS.",
    )
    key_file: Path | None = setting(_optional_path, "", "PEM private key of tls.cert_file (both or neither).")


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """The [auth] section (SECTION_DOCS["auth"])."""

    allow_plaintext: bool = setting(
        _bool, False, "Allow password logins on unencrypted connections from non-loopback clients (not recommended)."
    )
    failure_delay: float = setting(
        _number,
        0.5,
        "A failed login slows its client address down: its logins take turns, this many seconds "
        "apart after one recent failure, doubling with each further one up to "
        "auth.max_failure_delay.",
    )
    max_failure_delay: float = setting(
        _number, 15, "Longest spacing (seconds) between the login turns of an address that keeps failing."
    )
    penalty_half_life: float = setting(
        _number, 600, "Seconds after which an address's failed logins count half as much."
    )
    max_failures: int = setting(
        _int(1),
        10,
        "This many failed logins for one site from one address (none more than "
        "auth.failure_window seconds after the previous one) block that site from that address "
        "for auth.block_time seconds, even with the right password: it gets a temporary failure "
        "(SMTP 454 4.7.0, POP3 -ERR [SYS/TEMP], IMAP NO [UNAVAILABLE]). Other addresses of the "
        "site are not affected. `mailhub auth blocks` lists blocks and penalties; `mailhub auth "
        "unblock ADDRESS [--site NAME]` lifts them.",
    )
    failure_window: float = setting(
        _number,
        3600,
        "Seconds between two failed logins beyond which they no longer count towards auth.max_failures together.",
    )
    block_time: float = setting(
        _number, 900, "Seconds a site stays blocked from an address after auth.max_failures failed logins."
    )
    max_penalty_wait: float = setting(
        _number, 30, "A login whose turn is more than this many seconds away is refused at once."
    )
    hash_threads: int = setting(
        _int(1), 2, "Password checks (scrypt) run in this many threads at a lower CPU priority."
    )
    max_queued_checks: int = setting(
        _int(1),
        256,
        "At most this many password checks wait for a thread; further logins get a temporary failure at once.",
    )


@dataclass(frozen=True, slots=True)
class EventsConfig:
    """The [events] section (SECTION_DOCS["events"])."""

    retention_days: float = setting(
        _number,
        90,
        "Days the tracking record (mailhub trace, mailhub stats) keeps each event: accepted, "
        "delivered, downloaded, deleted, refused/deferred. Older events are pruned at start and "
        "every hour.",
    )
    audit_retention_days: float = setting(
        _number,
        3650,
        "Days the audit trail (mailhub audit) keeps each record of a mailbox event: accepted, fetched, "
        "deleted by the site, expired, deleted, exported or returned by an operator. Records outlive "
        "the mail and its site; older ones are pruned at start and every hour. Default: 10 years.",
    )


@_kind('"" or postgresql://USER@HOST:PORT/DATABASE')
def _index_url(value: Any) -> str:
    from storage.index_url import index_url

    if not isinstance(value, str):
        raise ValueError("expected a string")
    url = index_url(value)
    if url:
        try:
            import psycopg  # noqa: F401  (the optional extra the PostgreSQL index needs)
        except ImportError:
            raise ValueError(
                "a PostgreSQL index needs psycopg, which is not installed: pip install 'dicom-mail-hub[postgresql]'"
            ) from None
    return url


@_kind('path, "s3://BUCKET/PREFIX", or empty')
def _blobs(value: Any) -> Path | str | None:
    """A shared folder (a Path), an object store (the s3:// URL, a str), or None (data_dir)."""
    if isinstance(value, str) and value.startswith("s3://"):
        if not re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9._-]+)*/?", value):
            raise ValueError(f"expected s3://BUCKET/PREFIX (bucket: 3-63 of a-z 0-9 . -), got {value!r}")
        return value
    return _optional_path(value)


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """The [storage] section (SECTION_DOCS["storage"])."""

    index: str = setting(
        _index_url,
        "",
        "Where the index is: empty for SQLite (index.sqlite3 in data_dir), or a PostgreSQL database "
        "as postgresql://USER@HOST:PORT/DATABASE (docs/postgresql.md). Give the password through "
        "PGPASSWORD or ~/.pgpass rather than in the URL; it is never logged nor shown. The schema is "
        "migrated when the hub starts. data_dir stays this node's own (spool, ledger, sockets).",
        secret=True,  # kept out of reprs (a password in the URL); `config show` shows it without one
    )
    release_freed_after: float = setting(
        _zero_or_more,
        3600,
        "Seconds after a small message stored in a shared pack file is freed (its last mailbox "
        "entry or queue entry gone) before its bytes are released (a hole punched in the pack): a "
        "session or the relay still sending it meanwhile gets its bytes. With a shared blob folder "
        "(storage.blobs, several nodes) a freed mail's file of its own also waits this long before it "
        "is removed, since a session on another node may still be sending it. 0 releases them at once.",
    )
    reserve_bytes: int = setting(
        parse_size,
        "64M",
        "Space set aside in the data folder (file reserve.space) while the disk has room, given "
        "back when it is full, so that the hub can start and gateways can delete mail on a full "
        "disk (docs/storage.md). Made again once twice this much is free; 0 for none. Running, "
        "the reserve is also given back when a gateway's deletion (POP3 DELE + QUIT, IMAP "
        "EXPUNGE) finds the disk full: deleting is what frees space (docs/integrity.md).",
    )
    min_free_bytes: int = setting(
        parse_size,
        "0",
        "New mail is refused at MAIL FROM with 452 4.3.1 while the data folder's file system has "
        "less than this much free, plus 1.5 times the size a client declares (SIZE=). A write "
        "that still runs out of space answers 452 4.3.1 too and leaves nothing half-written "
        "(docs/integrity.md). 0 (the default) leaves only the SIZE= check; a busy hub wants e.g. "
        '"1G".',
    )
    scrub_rate: int = setting(
        parse_size,
        "16M",
        "The background scrub reads every stored mail at this many bytes a second and checks it "
        "against the SHA-256 recorded at ingest; a damaged one is refused to POP3/IMAP, copied to "
        "the quarantine and listed by `mailhub storage damaged` (docs/integrity.md). A pass over "
        '1 TB takes 18 h at "16M"; 0 is off.',
    )
    blobs: Path | str | None = setting(
        _blobs,
        "",
        "Empty (the default): the message blobs are kept in data_dir (blobs/, spool/, ledger/). Else "
        "the path of a SHARED POSIX folder (NFS v4, CephFS) holding the blobs of all the nodes of a "
        "cluster that share one index (storage.index): each node writes only under <blobs>/<node.name>/ "
        "and serves any node's mail; the folder must exist (docs/storage.md, a shared blob folder). "
        'Or "s3://BUCKET/PREFIX": an S3-compatible object store set in [s3] holds every mail, one '
        "object each, uploaded before the 250; data_dir's blobs/ is then a node-local cache "
        "(storage.cache_bytes; docs/storage.md, Mail on object storage).",
    )
    verify_while_serving: bool = setting(
        _bool,
        False,
        "Check the CRC-32 recorded at ingest while a whole mail is sent (POP3 RETR, an IMAP literal "
        "of the whole mail): a mail whose bytes changed on disk is cut off before the end of the "
        "reply, so no client takes it as whole, and marked damaged (docs/integrity.md). It reads "
        "each mail through the hub instead of sendfile: measured, POP3 downloads of large mails "
        "fell from about 2.3x Dovecot's speed to about 1.2x (2-4x the hub's CPU per GB sent), so it "
        "is off by default; changed bytes are then found by the scrub and `mailhub storage verify`. "
        "A mail cut short is refused or cut off either way.",
    )
    cache_bytes: int = setting(
        parse_size,
        "0",
        'With storage.blobs = "s3://...": the most bytes of mail kept in the node-local cache '
        "(blobs/ in data_dir); least recently used mails are evicted past it (never one being sent "
        "or used in the last 10 minutes) and downloaded again when served. 0: no bound.",
    )
    delete_orphan_objects: bool = setting(
        _bool,
        False,
        'With storage.blobs = "s3://...": delete at start-up the objects no index row names that the '
        "store took over an hour ago (by its clock). Off: they are only reported in the log (one may "
        "be acknowledged mail: another node's commit held up, another hub's index on the same "
        "bucket and prefix, an index restored from an older backup). A node's own uncommitted "
        "uploads (their files quarantined by recovery) are deleted either way.",
    )

    @property
    def shared_folder(self) -> Path | None:
        """storage.blobs when it names a shared folder, else None."""
        return self.blobs if isinstance(self.blobs, Path) else None

    @property
    def object_store(self) -> str:
        """storage.blobs when it names an object store (s3://BUCKET/PREFIX), else ""."""
        return self.blobs if isinstance(self.blobs, str) else ""


@_kind("node name: letters, digits, '.', '_', '-'; up to 63")
def _node_name(value: Any) -> str:
    from storage.blob_layout import node_name_problem

    if not isinstance(value, str):
        raise ValueError("expected a string")
    problem = node_name_problem(value) if value else None
    if problem is not None:
        raise ValueError(problem)
    return value


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """The [node] section (SECTION_DOCS["node"])."""

    name: str = setting(
        _node_name,
        "",
        "This node's name, unique in the cluster (empty: the host name's first label). With a shared "
        "blob folder (storage.blobs) the node writes under <blobs>/<name>/ and its queue IDs carry a "
        "node number the index records for this name.",
    )

    @property
    def resolved_name(self) -> str:
        """The name in use: `name`, or the host name's first label."""
        from storage.blob_layout import default_node_name

        return self.name or default_node_name()


@dataclass(frozen=True, slots=True)
class LogConfig:
    """The [log] section (SECTION_DOCS["log"])."""

    level: str = setting(_choice("debug", "info", "warning", "error"), "info", "debug, info, warning or error.")
    format: str = setting(
        _choice("text", "json"), "text", "text (readable lines) or json (one object per line, for log shippers)."
    )
    stall_threshold: float = setting(
        _zero_or_more,
        0.25,
        "Seconds the event loop may be blocked before a warning names what it was doing (the "
        "innermost functions of the hub's code); 0 turns the warning off. The lag is measured "
        "either way (mailhub_event_loop_lag_seconds).",
    )


@dataclass(frozen=True, slots=True)
class DirectoryConfig:
    """The [directory] section (SECTION_DOCS["directory"])."""

    address: str = setting(
        _local_part,
        "directory",
        "Local part of the participant directory's address: a site that mails directory@<each "
        "local domain> gets the signed participant list back in its own mailbox.",
    )
    notify_on_change: bool = setting(
        _bool,
        True,
        "Send every site the signed participant list whenever a site is added or removed, or "
        "changes its addresses or key.",
    )
    update_delay: float = setting(
        _zero_or_more,
        10,
        "Seconds the hub waits after it sees a change of the directory before it sends the update: "
        "changes made meanwhile (sites added in a row) go out as one update, which carries only "
        "what changed since the version sent before (docs/gateway-guide.md).",
    )
    key_grace_days: float = setting(
        _zero_or_more,
        14,
        "Days a site's previous key stays valid for encryption after `mailhub site key import` "
        "replaced it (0: not at all).",
    )
    min_request_interval: float = setting(
        _zero_or_more,
        60,
        "Seconds before a site that asked for the directory is answered again (0: no limit); a "
        "request sooner gets 450 4.7.1 at RCPT, so its gateway asks again later.",
    )
    hub_key_grace_days: float = setting(
        _zero_or_more,
        30,
        "Days the hub's previous signing key keeps co-signing every directory mail after `mailhub "
        "directory rotate-key` (0: only the announcement of the rotation); then it is retired, "
        "kept in DATA_DIR/hub-keys/ but no longer used.",
    )


@dataclass(frozen=True, slots=True)
class EncryptionConfig:
    """The [encryption] section (SECTION_DOCS["encryption"])."""

    required: bool = setting(
        _bool,
        True,
        "Refuse DICOM in the clear and PGP/MIME mails not encrypted to each recipient site's "
        "current (or grace-period) key. Sites can be set apart with `mailhub site policy NAME "
        "--encryption on|off`.",
    )
    allow_hidden_recipients: bool = setting(
        _bool,
        False,
        "Accept PGP/MIME mails whose public-key packets hide the recipient (key ID 0, gpg --throw-keyids).",
    )


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """The [relay] section (SECTION_DOCS["relay"])."""

    enabled: bool = setting(
        _bool,
        True,
        "Forward mail to non-local addresses along relay.routes. Off: such recipients get 550 "
        "5.1.2 at RCPT, and mail already queued waits (`mailhub queue list`) until the relay is "
        "on again.",
    )
    hostname: str = setting(_text, "", "Name sent in EHLO to next hops (default: the hub's hostname).")
    routes: tuple["Route", ...] = setting(
        _routes,
        [],
        'Next hops by recipient domain, most specific first: "example.org" also serves its '
        'subdomains, "*" serves every other non-local domain. Without a matching route a '
        "recipient gets 550 5.1.2. Each route is a [[relay.routes]] table with domain, host, port "
        "(25), tls (none | opportunistic: STARTTLS when offered, any certificate | required: "
        "STARTTLS with a verified certificate, else defer; default opportunistic), ca_file (CA "
        'bundle for tls = "required"; default: the system\'s), auth_user and auth_password or '
        'auth_password_file (AUTH PLAIN, only over TLS unless tls = "none"), max_connections (10: '
        "simultaneous connections to this next hop, reused for bursts). In the environment: "
        'MAILHUB_RELAY_ROUTES="example.org=mx.example.org:25, *=smarthost:587" (defaults for the '
        "other route keys).",
    )
    max_active: int = setting(
        _int(1),
        100,
        "Deliveries (recipients) in progress at once, over all next hops. Deferred mail gets at most half.",
    )
    connect_timeout: float = setting(_number, 30, "Seconds to connect to a next hop (and finish a TLS handshake).")
    command_timeout: float = setting(
        _number,
        300,
        "Seconds to wait for each reply of a next hop (twice as long for the reply to the end of "
        "the data, while the next hop stores the mail).",
    )
    min_backoff: float = setting(
        _number,
        300,
        "Seconds before the first retry after a temporary failure, doubling per attempt up to "
        "relay.max_backoff. A next hop that cannot be reached is backed off as a whole in the "
        "same way.",
    )
    max_backoff: float = setting(_number, 3600, "Longest wait (seconds) between retries.")
    max_lifetime: float = setting(
        _number,
        5 * 86400,
        "Seconds after which undelivered mail is returned to its sender (a DSN in the sender's mailbox).",
    )
    delay_warning: float = setting(
        _zero_or_more,
        4 * 3600,
        "Seconds after which the sender is told once that the mail is still being retried (0: never).",
    )


@_kind("list of percentages (1-100), or empty for none")
def _levels(value: Any) -> tuple[int, ...]:
    if isinstance(value, str):
        value = [v for v in (p.strip() for p in value.split(",")) if v]
    if not isinstance(value, (list, tuple)):
        raise ValueError("expected a list of percentages, e.g. [80, 95]")
    levels = []
    for item in value:
        text = str(item).strip().removesuffix("%")
        if isinstance(item, bool) or not text.isdigit() or not 1 <= int(text) <= 100:
            raise ValueError(f"expected percentages from 1 to 100, got {item!r}")
        levels.append(int(text))
    return tuple(sorted(set(levels)))


@dataclass(frozen=True, slots=True)
class LifecycleConfig:
    """The [lifecycle] section (SECTION_DOCS["lifecycle"])."""

    retention_days: float = setting(
        _zero_or_more,
        14,
        "Days mail may wait unfetched in a site's mailbox; then it is removed (the tracking record keeps "
        "its IDs, sizes and times) and its sender gets one delivery status notification per study. "
        "0 keeps mail until it is fetched. `mailhub site set NAME --retention-days N|default` overrides one site.",
    )
    warn_before_days: float = setting(
        _zero_or_more,
        2,
        "Days before the expiry that the receiving site is warned (one notice per site and check, "
        "once per mail); 0: no warning.",
    )
    check_interval: float = setting(
        _number,
        300,
        "Seconds between two expiry checks of the running hub (also the update interval of the study metrics).",
    )
    quota_warning_levels: tuple[int, ...] = setting(
        _levels,
        [80, 95],
        "Fill levels (percent of a site's mailbox quota, bytes or mails, whichever is fuller) at which the site "
        "and the operator get one notice each; again only after the mailbox fell 5 points below the level. "
        "Empty: none.",
    )
    operator_address: str = setting(
        _text,
        "",
        "Where notices for the operator (quota warnings) and mail to postmaster@ of every local domain "
        "(RFC 5321 4.5.1) go: a site's address or, with the relay, a remote one. Empty: notices are only "
        "logged and postmaster@ is refused with 550 5.1.1.",
    )
    study_alert_hours: float = setting(
        _number,
        24,
        "Hours after which a complete study still unfetched, or fetched without a receipt, counts in "
        "mailhub_studies_unfetched / mailhub_studies_unacknowledged.",
    )


@dataclass(frozen=True, slots=True)
class LivenessConfig:
    """The [liveness] section (SECTION_DOCS["liveness"])."""

    stale_after: float = setting(
        _number,
        21600,
        "Seconds a site may leave mail waiting without fetching any before it counts as stale (the "
        "clock starts at its last fetch or at the delivery of its oldest waiting mail, whichever is later).",
    )
    check_interval: float = setting(
        _number, 60, "Seconds between two looks at every site's liveness (stale and recovered notices)."
    )
    notify_sites: bool = setting(
        _bool,
        False,
        "Send a notice to a site's contact address (`mailhub site modify NAME --contact ADDRESS`) when it "
        "goes stale and when it recovers.",
    )
    notify_operator: bool = setting(
        _bool,
        True,
        "Send a notice to lifecycle.operator_address (the operator's one address) when a site goes stale "
        "and when it recovers.",
    )


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """The [proxy] section (SECTION_DOCS["proxy"])."""

    trusted_balancers: tuple[Network, ...] = setting(
        _networks,
        [],
        "Addresses (CIDR) of the TCP balancers (HAProxy with send-proxy-v2) in front of the hub. A "
        "connection from one of them must start with a PROXY protocol header (v2 or v1; before the TLS "
        "handshake on pop3s/imaps) and the client address in it counts for everything (peer networks, "
        "limits, login penalties, logs, Received:); without a valid header it is closed. Connections "
        "from other addresses are served as they are, a PROXY header from them is never believed. "
        "Empty: no balancer (needs a restart).",
    )
    header_timeout: float = setting(
        _number, 5, "Seconds a balancer's connection may take to send its PROXY header before it is closed."
    )


@_kind("http(s)://HOST[:PORT], or empty")
def _endpoint(value: Any) -> str:
    if not isinstance(value, str) or not (value == "" or re.fullmatch(r"https?://[^/\s?#]+(/[^\s?#]*)?", value)):
        raise ValueError(f"expected http://HOST[:PORT] or https://HOST[:PORT], got {value!r}")
    return value.rstrip("/")


@_kind("size: octets, or with a unit K, M, G, T; at least 5M")
def _part_size(value: Any) -> int:
    size = parse_size(value)
    if size < 5 * 1024**2:
        raise ValueError(f"S3 parts are at least 5M (5242880 octets), got {value!r}")
    return size


@dataclass(frozen=True, slots=True)
class S3Config:
    """The [s3] section (SECTION_DOCS["s3"])."""

    endpoint: str = setting(
        _endpoint,
        "",
        "URL of the S3-compatible object store that `mailhub storage backup s3://BUCKET/PREFIX` and "
        "`mailhub storage restore` use, e.g. https://s3.eu-central-1.amazonaws.com, "
        "http://127.0.0.1:8333 (SeaweedFS), https://rgw.example (Ceph RGW). Empty: none.",
    )
    region: str = setting(_text, "us-east-1", "The store's region, part of every request's signature (SigV4).")
    addressing: str = setting(
        _choice("path", "virtual"),
        "path",
        'How a bucket is named in requests: "path" (ENDPOINT/BUCKET/KEY: SeaweedFS, Ceph RGW, MinIO) '
        'or "virtual" (BUCKET.HOST/KEY: AWS S3).',
    )
    access_key: str = setting(_text, "", "Access key ID; empty: the environment's AWS_ACCESS_KEY_ID.")
    secret_key: str = setting(
        _text,
        "",
        "Secret access key; better kept in s3.secret_key_file. Empty: read from s3.secret_key_file, else "
        "the environment's AWS_SECRET_ACCESS_KEY. Never printed (`mailhub config show` masks it).",
        secret=True,
    )
    secret_key_file: Path | None = setting(
        _optional_path, "", "File holding the secret access key (its first line; mode 0600)."
    )
    part_size: int = setting(
        _part_size,
        "8M",
        "Files larger than this are uploaded in parts of this size (multipart upload); an upload holds "
        "at most two parts in memory. At least 5M (S3's minimum); 10000 parts at most per file.",
    )
    timeout: float = setting(
        _number,
        30,
        "Seconds any one step of a request to the store (connect, a write, a read) may take before the "
        "request fails with a message naming it.",
    )


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration: the top-level keys, one object per section, and the file it came
    from. Built by load() (or with_overrides()), which validate it; never changed afterwards."""

    data_dir: Path = setting(
        _path,
        "mailhub-data",
        "Folder for the index (index.sqlite3), the spool and the message blobs. Relative to the working folder.",
    )
    domain: tuple[str, ...] = setting(
        _domains,
        ["hub.test"],
        "The local mail domains: mail to these is delivered to site mailboxes (the first is the default).",
    )
    hostname: str = setting(
        _text, "", "Name the hub gives itself in greetings and Received: headers (default: the first domain)."
    )
    shutdown_timeout: float = setting(
        _number, 30, "Seconds that transactions in flight get to finish after SIGTERM/SIGINT before they are cut off."
    )
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    pop3: Pop3Config = field(default_factory=Pop3Config)
    imap: ImapConfig = field(default_factory=ImapConfig)
    quotas: QuotasConfig = field(default_factory=QuotasConfig)
    throttle: ThrottleConfig = field(default_factory=ThrottleConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    node: NodeConfig = field(default_factory=NodeConfig)
    log: LogConfig = field(default_factory=LogConfig)
    directory: DirectoryConfig = field(default_factory=DirectoryConfig)
    encryption: EncryptionConfig = field(default_factory=EncryptionConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)
    liveness: LivenessConfig = field(default_factory=LivenessConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    s3: S3Config = field(default_factory=S3Config)
    config_file: Path | None = None
    # ((section, key), (value as given, where from)) for each key set by the file or the environment
    # (later ones win), for with_overrides(); may hold secrets, so never in a repr.
    sources: tuple[tuple[tuple[str, str], tuple[Any, str]], ...] = field(default=(), repr=False, compare=False)

    @property
    def index_location(self) -> "IndexLocation":
        """Where the index is (storage.index: SQLite in data_dir, or PostgreSQL), to open it."""
        from storage.index import IndexLocation

        return IndexLocation(self.data_dir, self.storage.index)

    def with_overrides(self, values: Mapping[str, Any], source: str = "override") -> "Config":
        """A new Config as if the dotted keys in `values` ("smtp.max_recipients", "domain") had
        been set after the file and the environment, as written there (TOML values or strings);
        validated like load(). This object is left as it is."""
        given = dict(self.sources)
        for dotted, value in values.items():
            section, _, key = dotted.rpartition(".")
            if (section, key) not in SCHEMA:
                raise ConfigError(f"{dotted}: unknown key (in {source})")
            given[(section, key)] = (value, source)
        return build(given, self.config_file)


# What each section is for (the heading text of docs/configuration.md and example.toml).
SECTION_DOCS: dict[str, str] = {
    "": "Top-level settings: where the data lives and which mail domains are local.",
    "smtp": ("The SMTP listener gateways submit mail to (docs/hostile-clients.md explains the connection limits)."),
    "pop3": "The POP3 listener (and POP3S) gateways fetch mail from.",
    "imap": "The IMAP listener (and IMAPS) gateways fetch mail from.",
    "quotas": (
        "Defaults for every site; `mailhub site set NAME --<limit> VALUE|unlimited|default` "
        "overrides one site. Sizes take K, M, G, T (binary) units. 0 means unlimited for the size "
        "and volume limits."
    ),
    "throttle": "Admission by the receiver's drain time, and pacing of senders.",
    "metrics": "The Prometheus endpoint.",
    "tls": "Certificate and key for STARTTLS/STLS and the implicit-TLS listeners.",
    "auth": "Logins, and the guard against password guessing (all protocols; docs/hostile-clients.md).",
    "events": "The tracking record behind `mailhub trace` and `mailhub stats`.",
    "storage": ("The blob store, its disk-space guards and the background scrub (docs/storage.md, docs/integrity.md)."),
    "node": "This hub node's identity in a cluster (docs/storage.md, a shared blob folder).",
    "log": "Logging.",
    "directory": "The participant directory and the hub's signing key (docs/hub-key.md).",
    "encryption": "The encryption policy applied at the end of the data.",
    "relay": (
        "Outbound relay: mail from authenticated sites to addresses outside the local domains is "
        "queued durably and forwarded along the routes."
    ),
    "lifecycle": (
        "Mailbox lifecycle: expiry of mail not fetched in time (with a warning to the receiving site and one "
        "notice per study to the sender), quota warnings, and the study metrics (docs/operator-runbook.md)."
    ),
    "liveness": (
        "Stale sites: mail waiting that its site has not fetched for too long (metrics, "
        "`mailhub stats`, `mailhub site show`, notices)."
    ),
    "proxy": "Running behind a TCP balancer with the PROXY protocol (docs/operator-guide.md, behind HAProxy).",
    "s3": "S3-compatible object storage for offsite backups (docs/storage.md, backup to object storage).",
}


def _section_classes() -> dict[str, type]:
    found: dict[str, type] = {"": Config}
    for config_field in dataclasses.fields(Config):
        section_class = config_field.default_factory
        if isinstance(section_class, type):
            found[config_field.name] = section_class
    return found


# Section name ("" for the top level) -> its dataclass, in the order of docs/configuration.md.
SECTIONS = _section_classes()

# (section, key) -> Option, read from the fields above: the one schema the loader, the environment
# names, docs/configuration.md, example.toml and the Ansible role all use.
SCHEMA: dict[tuple[str, str], Option] = {
    (section, f.name): f.metadata["option"]
    for section, cls in SECTIONS.items()
    for f in dataclasses.fields(cls)
    if "option" in f.metadata
}


def env_name(section: str, key: str) -> str:
    return ENV_PREFIX + (f"{section}_{key}" if section else key).upper()


def load(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Defaults, then the TOML file, then the environment; a validated Config."""
    environ = os.environ if environ is None else environ
    given: dict[tuple[str, str], tuple[Any, str]] = {}
    if path is not None:
        for section_key, value in _read_toml(Path(path)).items():
            given[section_key] = (value, str(path))
    for section, key in SCHEMA:
        name = env_name(section, key)
        if name in environ:
            given[(section, key)] = (environ[name], name)
    return build(given, Path(path) if path is not None else None)


def build(given: Mapping[tuple[str, str], tuple[Any, str]], config_file: Path | None = None) -> Config:
    """A validated Config from (section, key) -> (value as written, where it came from); keys not
    given keep their defaults."""
    values: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for (section, key), (value, source) in given.items():
        try:
            values[section][key] = SCHEMA[(section, key)].parse(value)
        except ValueError as exc:
            raise ConfigError(f"{_dotted(section, key)}: {exc} (from {source})") from None
    top = values.pop("")
    if not top.get("hostname"):
        top["hostname"] = top.get("domain", _default("", "domain"))[0]
    sections = {name: SECTIONS[name](**keys) for name, keys in values.items()}
    cfg = Config(**top, **sections, config_file=config_file, sources=tuple(given.items()))
    _check_combinations(cfg)
    return cfg


def _default(section: str, key: str) -> Any:
    option = SCHEMA[(section, key)]
    return option.parse(option.default)


def _read_toml(path: Path) -> dict[tuple[str, str], Any]:
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    found: dict[tuple[str, str], Any] = {}
    sections = {section for section, _ in SCHEMA if section}
    for name, value in document.items():
        if isinstance(value, dict) and not value and name not in sections:
            raise ConfigError(f"{name}: unknown section (in {path})")  # keys of one are named below
        if isinstance(value, dict):
            for key, inner in value.items():
                found[(name, key)] = inner
        else:
            found[("", name)] = value
    for section, key in found:
        if (section, key) not in SCHEMA:
            raise ConfigError(f"{_dotted(section, key)}: unknown key{_did_you_mean(section, key)} (in {path})")
    return found


def nearest_key(dotted: str) -> str | None:
    """The schema's key closest to a misspelt dotted name ("smtp.max_recipient"), if any is close."""
    names = [_dotted(section, key) for section, key in SCHEMA]
    close = difflib.get_close_matches(dotted, names, n=1, cutoff=0.75)
    return close[0] if close else None


def _did_you_mean(section: str, key: str) -> str:
    nearest = nearest_key(_dotted(section, key))
    return f"; did you mean {nearest}?" if nearest else ""


def _check_combinations(cfg: Config) -> None:
    if (cfg.tls.cert_file is None) != (cfg.tls.key_file is None):
        raise ConfigError("tls.cert_file: cert_file and key_file must be set together")
    for key, value in (("cert_file", cfg.tls.cert_file), ("key_file", cfg.tls.key_file)):
        if value is not None and not value.is_file():
            raise ConfigError(f"tls.{key}: no such file {str(value)!r}")
    if cfg.pop3.pop3s_listen and cfg.tls.cert_file is None:
        raise ConfigError("pop3.pop3s_listen: needs tls.cert_file and tls.key_file")
    if cfg.imap.imaps_listen and cfg.tls.cert_file is None:
        raise ConfigError("imap.imaps_listen: needs tls.cert_file and tls.key_file")
    if cfg.relay.max_backoff < cfg.relay.min_backoff:
        raise ConfigError("relay.max_backoff: must not be less than relay.min_backoff")


def _dotted(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key
