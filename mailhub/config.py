# Configuration: one schema of every key with its type and default, loaded once from an optional
# TOML file and from MAILHUB_<SECTION>_<KEY> environment variables, validated, then read-only.
# Must never let an invalid value through: errors name the key and the source.
import ipaddress
import math
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

ENV_PREFIX = "MAILHUB_"


class ConfigError(Exception):
    """Invalid configuration; the message names the key and is one line."""


def _kind(text: str) -> Callable:
    """Marks a parser with its value's type in words (shown in docs/configuration.md)."""
    def mark(parse: Callable) -> Callable:
        parse.kind = text  # type: ignore[attr-defined]
        return parse
    return mark


@_kind("HOST:PORT, or empty to disable")
def _listen(value: Any) -> tuple[str, int] | None:
    """"HOST:PORT" (IPv6 as "[::1]:PORT"); an empty string disables the listener."""
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
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of strings (or a comma-separated string)")
    return value


@_kind("list of domains")
def _domains(value: Any) -> list[str]:
    domains = [d.lower() for d in _str_list(value)]
    if not domains:
        raise ValueError("at least one domain is needed")
    return domains


@_kind("list of CIDR networks")
def _networks(value: Any) -> list:
    try:
        return [ipaddress.ip_network(v, strict=False) for v in _str_list(value)]
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


@_kind("size: octets, or with a unit K, M, G, T")
def parse_size(value: Any) -> int:
    """Octets as an integer or a string with a binary unit: 500M, 2G, 64K (0 is allowed)."""
    octets = value
    if isinstance(value, str):
        text = value.strip().upper().removesuffix("B").removesuffix("I")
        number, unit = (text[:-1], text[-1]) if text[-1:] in ("K", "M", "G", "T") else (text, "")
        try:
            octets = int(float(number) * _SIZE_UNITS[unit])
        except (ValueError, OverflowError):
            octets = None
    if isinstance(octets, bool) or not isinstance(octets, int) or octets < 0:
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
def _routes(value: Any) -> list:
    from relay.outbound.routes import parse_routes  # the route table's own parser and checks
    return parse_routes(value)


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
        return value
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
    parse: Callable[[Any], Any]
    default: Any
    doc: str  # what the key does, for docs/configuration.md and example.toml

    @property
    def kind(self) -> str:
        """The value's type in words (set on each parser by @_kind)."""
        return self.parse.kind  # type: ignore[attr-defined]


# (section, key) -> Option; section "" holds the top-level keys. `python -m mailhub.config_reference`
# writes docs/configuration.md and mailhub/example.toml from it (never edit those by hand). A new key:
# add it here with its doc, then run that and `python3 scripts/ansible_role_settings.py` (tests fail
# until both outputs match the schema).
SCHEMA: dict[tuple[str, str], Option] = {
    ("", "data_dir"): Option(_path, "mailhub-data",
        "Folder for the index (index.sqlite3), the spool and the message blobs. Relative to the "
        "working folder."),
    ("", "domain"): Option(_domains, ["hub.test"],
        "The local mail domains: mail to these is delivered to site mailboxes (the first is the "
        "default)."),
    ("", "hostname"): Option(_text, "",
        "Name the hub gives itself in greetings and Received: headers (default: the first "
        "domain)."),
    ("", "shutdown_timeout"): Option(_number, 30,
        "Seconds that transactions in flight get to finish after SIGTERM/SIGINT before they are "
        "cut off."),
    ("smtp", "listen"): Option(_required_listen, "127.0.0.1:2525",
        "Address of the SMTP listener, HOST:PORT (\"[::1]:25\" for IPv6). Port 0 picks a free port."),
    ("smtp", "max_message_size"): Option(_int(1), 2 * 1024**3,
        "Largest message accepted, in bytes (announced as SIZE; SIZE= over it is refused with 552 "
        "5.3.4)."),
    ("smtp", "max_recipients"): Option(_int(1), 1000,
        "Recipients per transaction; more get 452 4.5.3."),
    ("smtp", "max_connections"): Option(_int(1), 1000,
        "Simultaneous SMTP connections in all; more get 421 4.7.0."),
    ("smtp", "max_connections_per_ip"): Option(_int(1), 100,
        "Simultaneous SMTP connections from one client address; more get 421 4.7.0."),
    ("smtp", "max_unauthenticated"): Option(_int(1), 500,
        "Of those, connections that have not logged in yet (from smtp.peer_networks: not started "
        "a transaction), in all; more get 421 4.7.0."),
    ("smtp", "max_unauthenticated_per_ip"): Option(_int(1), 20,
        "Connections not logged in yet (from smtp.peer_networks: not started a transaction) from "
        "one client address; more get 421 4.7.0."),
    ("smtp", "login_timeout"): Option(_number, 60,
        "Seconds a connection may take to authenticate (from smtp.peer_networks, which need no "
        "AUTH: to start a transaction with MAIL FROM), however many bytes it sends meanwhile; "
        "then 421 4.4.2."),
    ("smtp", "limit_exempt_networks"): Option(_networks, [],
        "Client networks (CIDR) held only to the totals above, not to the per-address limits "
        "(e.g. a load generator on 127.0.0.0/8); smtp.peer_networks are not exempt unless listed "
        "here too. docs/hostile-clients.md explains all the limits."),
    ("smtp", "max_commands"): Option(_int(10), 100000,
        "Commands of one kind one connection may send before it is closed with 421 (guards "
        "against loops)."),
    ("smtp", "max_bad_commands"): Option(_int(1), 20,
        "Malformed or unknown commands (replies 500, 501, 504, 555) one connection may send "
        "before it is closed with 421 4.7.0."),
    ("smtp", "max_line_length"): Option(_int(512), 2048,
        "Longest command line in bytes (RFC 5321 asks for at least 512); longer lines get 500 "
        "5.5.6."),
    ("smtp", "idle_timeout"): Option(_number, 300,
        "Seconds without a command (or without data during DATA/BDAT) before the connection is "
        "closed with 421."),
    ("smtp", "peer_networks"): Option(_networks, [],
        "Client networks (CIDR) that may deliver to local sites without authenticating (never "
        "relay)."),
    ("smtp", "memory_budget"): Option(parse_size, "256M",
        "Memory held for all mails in flight (received bytes queued for the disk, small mails "
        "waiting to be packed). Past it, mails go to their spool files at once and senders are "
        "read no faster than the disk takes their data. Each connection may hold about 256 KB "
        "more in its socket buffer."),
    ("pop3", "listen"): Option(_listen, "127.0.0.1:1110",
        "Address of the POP3 listener."),
    ("pop3", "pop3s_listen"): Option(_listen, "",
        "Address of the POP3S listener (implicit TLS); empty disables it. Needs [tls]."),
    ("pop3", "max_connections"): Option(_int(1), 1000,
        "Simultaneous POP3 and POP3S connections in all; more get \"-ERR [SYS/TEMP]\" and are "
        "closed."),
    ("pop3", "max_connections_per_ip"): Option(_int(1), 50,
        "Simultaneous POP3 and POP3S connections from one client address; more get \"-ERR "
        "[IN-USE]\" and are closed."),
    ("pop3", "max_unauthenticated"): Option(_int(1), 500,
        "Of those, connections that have not logged in yet, in all (what clients can hold without "
        "credentials); more get \"-ERR [SYS/TEMP]\"."),
    ("pop3", "max_unauthenticated_per_ip"): Option(_int(1), 20,
        "Connections not logged in yet from one client address; more get \"-ERR [IN-USE]\"."),
    ("pop3", "login_timeout"): Option(_number, 60,
        "Seconds a connection may take to log in, however many bytes it sends meanwhile; then it "
        "is closed."),
    ("pop3", "limit_exempt_networks"): Option(_networks, [],
        "Client networks (CIDR) held only to the totals above, not to the per-address limits "
        "(e.g. a load generator on 127.0.0.0/8). docs/hostile-clients.md explains all the limits."),
    ("pop3", "idle_timeout"): Option(_number, 600,
        "Seconds without a command (or without progress while sending a message) before the "
        "connection is closed without a reply and without deleting anything (RFC 1939 asks for at "
        "least 600)."),
    ("imap", "listen"): Option(_listen, "127.0.0.1:1143",
        "Address of the IMAP listener; empty disables it."),
    ("imap", "imaps_listen"): Option(_listen, "",
        "Address of the IMAPS listener (implicit TLS); empty disables it. Needs [tls]."),
    ("imap", "max_connections"): Option(_int(1), 1000,
        "Simultaneous IMAP and IMAPS connections in all; more get \"* BYE [UNAVAILABLE] ...\" and "
        "are closed."),
    ("imap", "max_connections_per_ip"): Option(_int(1), 50,
        "Simultaneous IMAP and IMAPS connections from one client address; more get \"* BYE "
        "[UNAVAILABLE] ...\" and are closed."),
    ("imap", "max_unauthenticated"): Option(_int(1), 500,
        "Of those, connections that have not logged in yet, in all (what clients can hold without "
        "credentials); more get \"* BYE [UNAVAILABLE]\"."),
    ("imap", "max_unauthenticated_per_ip"): Option(_int(1), 20,
        "Connections not logged in yet from one client address; more get \"* BYE [UNAVAILABLE]\"."),
    ("imap", "login_timeout"): Option(_number, 60,
        "Seconds a connection may take to log in, however many bytes it sends meanwhile; then it "
        "is closed."),
    ("imap", "limit_exempt_networks"): Option(_networks, [],
        "Client networks (CIDR) held only to the totals above, not to the per-address limits "
        "(e.g. a load generator on 127.0.0.0/8). docs/hostile-clients.md explains all the limits."),
    ("imap", "idle_timeout"): Option(_number, 1860,
        "Seconds without a command (also while idling in IDLE, or without progress while sending) "
        "before the server says \"* BYE\" and closes (RFC 3501 asks for at least 30 minutes; "
        "clients renew IDLE every 29 minutes)."),
    ("quotas", "mailbox_bytes"): Option(parse_size, "50G",
        "Mailbox of a receiving site: octets held (downloaded or not). Over it: 452 4.2.2."),
    ("quotas", "mailbox_messages"): Option(_int(0), 200000,
        "Mailbox of a receiving site: mails held (downloaded or not). Over it: 452 4.2.2."),
    ("quotas", "max_message_size"): Option(parse_size, 0,
        "Largest message a site may send or receive (0: only smtp.max_message_size). Over it: 552 "
        "5.3.4."),
    ("quotas", "submitted_per_day"): Option(parse_size, 0,
        "Octets a site may submit per UTC day. Over it: 451 4.7.1, with the time to retry in the "
        "reply."),
    ("quotas", "submitted_per_month"): Option(parse_size, 0,
        "Octets a site may submit per UTC month. Over it: 451 4.7.1, with the time to retry in "
        "the reply."),
    ("quotas", "received_per_day"): Option(parse_size, 0,
        "Octets a site may receive per UTC day. Over it: 452 4.2.1, with the time to retry in the "
        "reply."),
    ("quotas", "received_per_month"): Option(parse_size, 0,
        "Octets a site may receive per UTC month. Over it: 452 4.2.1, with the time to retry in "
        "the reply."),
    ("quotas", "max_drain_time"): Option(_number, 1800,
        "Seconds a receiving site may need to download what waits for it (backlog / drain rate). "
        "New mail that would push it over is deferred with 451 4.7.0 saying why and when to "
        "retry."),
    ("quotas", "downlink"): Option(parse_size, "1M",
        "Drain rate (octets/s) assumed for a site before its downloads have been measured."),
    ("throttle", "drain_admission"): Option(_bool, True,
        "Defer mail by the receiver's drain time (false: static quotas only)."),
    ("throttle", "floor_bytes"): Option(parse_size, "16M",
        "A receiver whose backlog with the new mail stays within this always receives (new, quiet "
        "sites)."),
    ("throttle", "set_overshoot"): Option(_fraction, 0.25,
        "A sender may finish a study set it started beyond the drain limit by this fraction of "
        "it."),
    ("throttle", "min_retry"): Option(_number, 60,
        "Shortest retry time (seconds) a deferral suggests."),
    ("throttle", "offline_retry"): Option(_number, 600,
        "Retry time (seconds) a deferral suggests when the receiver is not polling."),
    ("throttle", "drain_window"): Option(_number, 60,
        "Drain-rate estimate: seconds of waiting time per sample."),
    ("throttle", "drain_tau"): Option(_number, 300,
        "Drain-rate estimate: time constant (seconds) of the moving estimate."),
    ("throttle", "offline_grace"): Option(_number, 900,
        "Seconds without a poll after which a site counts as draining nothing."),
    ("throttle", "pacing"): Option(_bool, True,
        "Read a sender's data no faster than its lagging receivers drain (never below "
        "pacing_min_rate octets/s); engaged once a receiver's drain time (counting sizes declared "
        "by transactions in flight) passes pacing_engage_at times its limit: by default only when "
        "the hub is over capacity for that receiver, e.g. a whole-study mail bigger than the "
        "receiver can drain in time."),
    ("throttle", "pacing_engage_at"): Option(_fraction, 1.0,
        "Pacing engages once a receiver's drain time passes this many times its limit "
        "(quotas.max_drain_time)."),
    ("throttle", "pacing_min_rate"): Option(parse_size, "64K",
        "Pacing never reads a sender slower than this many octets a second."),
    ("throttle", "interval"): Option(_number, 1,
        "Seconds between drain-rate readings (and refreshes of the usage figures from the index)."),
    ("metrics", "listen"): Option(_listen, "127.0.0.1:9425",
        "Address of the Prometheus metrics endpoint (/metrics and /healthz); empty disables it."),
    ("metrics", "health_min_free_bytes"): Option(_int(0), 1024**3,
        "/healthz answers 503 when the data folder's file system has less free space than this "
        "(bytes)."),
    ("tls", "cert_file"): Option(_optional_path, "",
        "PEM certificate chain; with tls.key_file set, SMTP offers STARTTLS, POP3 STLS and IMAP "
        "STARTTLS."),
    ("tls", "key_file"): Option(_optional_path, "",
        "PEM private key of tls.cert_file (both or neither)."),
    ("auth", "allow_plaintext"): Option(_bool, False,
        "Allow password logins on unencrypted connections from non-loopback clients (not "
        "recommended)."),
    ("auth", "failure_delay"): Option(_number, 0.5,
        "A failed login slows its client address down: its logins take turns, this many seconds "
        "apart after one recent failure, doubling with each further one up to "
        "auth.max_failure_delay."),
    ("auth", "max_failure_delay"): Option(_number, 15,
        "Longest spacing (seconds) between the login turns of an address that keeps failing."),
    ("auth", "penalty_half_life"): Option(_number, 600,
        "Seconds after which an address's failed logins count half as much."),
    ("auth", "max_failures"): Option(_int(1), 10,
        "This many failed logins for one site from one address (none more than "
        "auth.failure_window seconds after the previous one) block that site from that address "
        "for auth.block_time seconds, even with the right password: it gets a temporary failure "
        "(SMTP 454 4.7.0, POP3 -ERR [SYS/TEMP], IMAP NO [UNAVAILABLE]). Other addresses of the "
        "site are not affected. `mailhub auth blocks` lists blocks and penalties; `mailhub auth "
        "unblock ADDRESS [--site NAME]` lifts them."),
    ("auth", "failure_window"): Option(_number, 3600,
        "Seconds between two failed logins beyond which they no longer count towards "
        "auth.max_failures together."),
    ("auth", "block_time"): Option(_number, 900,
        "Seconds a site stays blocked from an address after auth.max_failures failed logins."),
    ("auth", "max_penalty_wait"): Option(_number, 30,
        "A login whose turn is more than this many seconds away is refused at once."),
    ("auth", "hash_threads"): Option(_int(1), 2,
        "Password checks (scrypt) run in this many threads at a lower CPU priority."),
    ("auth", "max_queued_checks"): Option(_int(1), 256,
        "At most this many password checks wait for a thread; further logins get a temporary "
        "failure at once."),
    ("events", "retention_days"): Option(_number, 90,
        "Days the tracking record (mailhub trace, mailhub stats) keeps each event: accepted, "
        "delivered, downloaded, deleted, refused/deferred. Older events are pruned at start and "
        "every hour."),
    ("storage", "release_freed_after"): Option(_zero_or_more, 3600,
        "Seconds after a small message stored in a shared pack file is freed (its last mailbox "
        "entry or queue entry gone) before its bytes are released (a hole punched in the pack): a "
        "session or the relay still sending it meanwhile gets its bytes. 0 releases them at once."),
    ("storage", "reserve_bytes"): Option(parse_size, "64M",
        "Space set aside in the data folder (file reserve.space) while the disk has room, given "
        "back when it is full, so that the hub can start and gateways can delete mail on a full "
        "disk (docs/storage.md). Made again once twice this much is free; 0 for none. Running, "
        "the reserve is also given back when a gateway's deletion (POP3 DELE + QUIT, IMAP "
        "EXPUNGE) finds the disk full: deleting is what frees space (docs/integrity.md)."),
    ("storage", "min_free_bytes"): Option(parse_size, "0",
        "New mail is refused at MAIL FROM with 452 4.3.1 while the data folder's file system has "
        "less than this much free, plus 1.5 times the size a client declares (SIZE=). A write "
        "that still runs out of space answers 452 4.3.1 too and leaves nothing half-written "
        "(docs/integrity.md). 0 (the default) leaves only the SIZE= check; a busy hub wants e.g. "
        "\"1G\"."),
    ("storage", "scrub_rate"): Option(parse_size, "16M",
        "The background scrub reads every stored mail at this many bytes a second and checks it "
        "against the SHA-256 recorded at ingest; a damaged one is refused to POP3/IMAP, copied to "
        "the quarantine and listed by `mailhub storage damaged` (docs/integrity.md). A pass over "
        "1 TB takes 18 h at \"16M\"; 0 is off."),
    ("storage", "verify_while_serving"): Option(_bool, False,
        "Check the CRC-32 recorded at ingest while a whole mail is sent (POP3 RETR, an IMAP literal "
        "of the whole mail): a mail whose bytes changed on disk is cut off before the end of the "
        "reply, so no client takes it as whole, and marked damaged (docs/integrity.md). It reads "
        "each mail through the hub instead of sendfile: measured, POP3 downloads of large mails "
        "fell from about 2.3x Dovecot's speed to about 1.2x (2-4x the hub's CPU per GB sent), so it "
        "is off by default; changed bytes are then found by the scrub and `mailhub storage verify`. "
        "A mail cut short is refused or cut off either way."),
    ("log", "level"): Option(_choice("debug", "info", "warning", "error"), "info",
        "debug, info, warning or error."),
    ("log", "format"): Option(_choice("text", "json"), "text",
        "text (readable lines) or json (one object per line, for log shippers)."),
    ("log", "stall_threshold"): Option(_zero_or_more, 0.25,
        "Seconds the event loop may be blocked before a warning names what it was doing (the "
        "innermost functions of the hub's code); 0 turns the warning off. The lag is measured "
        "either way (mailhub_event_loop_lag_seconds)."),
    ("directory", "address"): Option(_local_part, "directory",
        "Local part of the participant directory's address: a site that mails directory@<each "
        "local domain> gets the signed participant list back in its own mailbox."),
    ("directory", "notify_on_change"): Option(_bool, True,
        "Send every site the signed participant list whenever a site is added or removed, or "
        "changes its addresses or key."),
    ("directory", "key_grace_days"): Option(_zero_or_more, 14,
        "Days a site's previous key stays valid for encryption after `mailhub site key import` "
        "replaced it (0: not at all)."),
    ("directory", "min_request_interval"): Option(_zero_or_more, 60,
        "Seconds before a site that asked for the directory is answered again (0: no limit); a "
        "request sooner gets 450 4.7.1 at RCPT, so its gateway asks again later."),
    ("directory", "hub_key_grace_days"): Option(_zero_or_more, 30,
        "Days the hub's previous signing key keeps co-signing every directory mail after `mailhub "
        "directory rotate-key` (0: only the announcement of the rotation); then it is retired, "
        "kept in DATA_DIR/hub-keys/ but no longer used."),
    ("encryption", "required"): Option(_bool, True,
        "Refuse DICOM in the clear and PGP/MIME mails not encrypted to each recipient site's "
        "current (or grace-period) key. Sites can be set apart with `mailhub site policy NAME "
        "--encryption on|off`."),
    ("encryption", "allow_hidden_recipients"): Option(_bool, False,
        "Accept PGP/MIME mails whose public-key packets hide the recipient (key ID 0, gpg "
        "--throw-keyids)."),
    ("relay", "enabled"): Option(_bool, True,
        "Forward mail to non-local addresses along relay.routes. Off: such recipients get 550 "
        "5.1.2 at RCPT, and mail already queued waits (`mailhub queue list`) until the relay is "
        "on again."),
    ("relay", "hostname"): Option(_text, "",
        "Name sent in EHLO to next hops (default: the hub's hostname)."),
    ("relay", "routes"): Option(_routes, [],
        "Next hops by recipient domain, most specific first: \"example.org\" also serves its "
        "subdomains, \"*\" serves every other non-local domain. Without a matching route a "
        "recipient gets 550 5.1.2. Each route is a [[relay.routes]] table with domain, host, port "
        "(25), tls (none | opportunistic: STARTTLS when offered, any certificate | required: "
        "STARTTLS with a verified certificate, else defer; default opportunistic), ca_file (CA "
        "bundle for tls = \"required\"; default: the system's), auth_user and auth_password or "
        "auth_password_file (AUTH PLAIN, only over TLS unless tls = \"none\"), max_connections (10: "
        "simultaneous connections to this next hop, reused for bursts). In the environment: "
        "MAILHUB_RELAY_ROUTES=\"example.org=mx.example.org:25, *=smarthost:587\" (defaults for the "
        "other route keys)."),
    ("relay", "max_active"): Option(_int(1), 100,
        "Deliveries (recipients) in progress at once, over all next hops. Deferred mail gets at "
        "most half."),
    ("relay", "connect_timeout"): Option(_number, 30,
        "Seconds to connect to a next hop (and finish a TLS handshake)."),
    ("relay", "command_timeout"): Option(_number, 300,
        "Seconds to wait for each reply of a next hop (twice as long for the reply to the end of "
        "the data, while the next hop stores the mail)."),
    ("relay", "min_backoff"): Option(_number, 300,
        "Seconds before the first retry after a temporary failure, doubling per attempt up to "
        "relay.max_backoff. A next hop that cannot be reached is backed off as a whole in the "
        "same way."),
    ("relay", "max_backoff"): Option(_number, 3600,
        "Longest wait (seconds) between retries."),
    ("relay", "max_lifetime"): Option(_number, 5 * 86400,
        "Seconds after which undelivered mail is returned to its sender (a DSN in the sender's "
        "mailbox)."),
    ("relay", "delay_warning"): Option(_zero_or_more, 4 * 3600,
        "Seconds after which the sender is told once that the mail is still being retried (0: "
        "never)."),
}


# What each section is for (the heading text of docs/configuration.md and example.toml).
SECTION_DOCS: dict[str, str] = {
    "": "Top-level settings: where the data lives and which mail domains are local.",
    "smtp": (
        "The SMTP listener gateways submit mail to (docs/hostile-clients.md explains the connection "
        "limits)."),
    "pop3": "The POP3 listener (and POP3S) gateways fetch mail from.",
    "imap": "The IMAP listener (and IMAPS) gateways fetch mail from.",
    "quotas": (
        "Defaults for every site; `mailhub site set NAME --<limit> VALUE|unlimited|default` "
        "overrides one site. Sizes take K, M, G, T (binary) units. 0 means unlimited for the size "
        "and volume limits."),
    "throttle": "Admission by the receiver's drain time, and pacing of senders.",
    "metrics": "The Prometheus endpoint.",
    "tls": "Certificate and key for STARTTLS/STLS and the implicit-TLS listeners.",
    "auth": "Logins, and the guard against password guessing (all protocols; docs/hostile-clients.md).",
    "events": "The tracking record behind `mailhub trace` and `mailhub stats`.",
    "storage": (
        "The blob store, its disk-space guards and the background scrub (docs/storage.md, "
        "docs/integrity.md)."),
    "log": "Logging.",
    "directory": "The participant directory and the hub's signing key (docs/hub-key.md).",
    "encryption": "The encryption policy applied at the end of the data.",
    "relay": (
        "Outbound relay: mail from authenticated sites to addresses outside the local domains is "
        "queued durably and forwarded along the routes."),
}

def env_name(section: str, key: str) -> str:
    return ENV_PREFIX + (f"{section}_{key}" if section else key).upper()


def load(path: str | os.PathLike | None = None, environ: dict[str, str] | None = None) -> SimpleNamespace:
    """Defaults, then the TOML file, then the environment; returns cfg with cfg.<section>.<key>."""
    environ = os.environ if environ is None else environ
    raw: dict[tuple[str, str], tuple[Any, str]] = {k: (o.default, "default") for k, o in SCHEMA.items()}
    if path is not None:
        for name, value in _read_toml(Path(path)).items():
            raw[name] = (value, str(path))
    for (section, key) in SCHEMA:
        name = env_name(section, key)
        if name in environ:
            raw[(section, key)] = (environ[name], name)
    cfg = SimpleNamespace(**{s: SimpleNamespace() for s, _ in SCHEMA if s})
    for (section, key), (value, source) in raw.items():
        try:
            parsed = SCHEMA[(section, key)].parse(value)
        except ValueError as exc:
            raise ConfigError(f"{_dotted(section, key)}: {exc} (from {source})") from None
        setattr(getattr(cfg, section) if section else cfg, key, parsed)
    _check_combinations(cfg)
    cfg.config_file = Path(path) if path is not None else None
    return cfg


def _read_toml(path: Path) -> dict[tuple[str, str], Any]:
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    found = {}
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
            raise ConfigError(f"{_dotted(section, key)}: unknown key (in {path})")
    return found


def _check_combinations(cfg: SimpleNamespace) -> None:
    if (cfg.tls.cert_file is None) != (cfg.tls.key_file is None):
        raise ConfigError("tls.cert_file: cert_file and key_file must be set together")
    for key in ("cert_file", "key_file"):
        value = getattr(cfg.tls, key)
        if value is not None and not value.is_file():
            raise ConfigError(f"tls.{key}: no such file {str(value)!r}")
    if cfg.pop3.pop3s_listen and cfg.tls.cert_file is None:
        raise ConfigError("pop3.pop3s_listen: needs tls.cert_file and tls.key_file")
    if cfg.imap.imaps_listen and cfg.tls.cert_file is None:
        raise ConfigError("imap.imaps_listen: needs tls.cert_file and tls.key_file")
    if not cfg.hostname:
        cfg.hostname = cfg.domain[0]
    if cfg.relay.max_backoff < cfg.relay.min_backoff:
        raise ConfigError("relay.max_backoff: must not be less than relay.min_backoff")


def _dotted(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key
