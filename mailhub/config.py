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


def _domains(value: Any) -> list[str]:
    domains = [d.lower() for d in _str_list(value)]
    if not domains:
        raise ValueError("at least one domain is needed")
    return domains


def _networks(value: Any) -> list:
    try:
        return [ipaddress.ip_network(v, strict=False) for v in _str_list(value)]
    except ValueError as exc:
        raise ValueError(f"expected CIDR networks: {exc}") from None


def _int(minimum: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"expected an integer >= {minimum}, got {value!r}")
        return value
    return parse


_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


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


def _zero_or_more(value: Any) -> float:
    """A number >= 0 (0 turns the thing off)."""
    if not isinstance(value, bool) and value in (0, "0", "0.0"):
        return 0.0
    return _number(value)


def _fraction(value: Any) -> float:
    number = _number(value) if value not in (0, "0") else 0.0
    if number > 10:
        raise ValueError(f"expected a fraction between 0 and 10, got {value!r}")
    return number


def _number(value: Any) -> float:
    try:
        number = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or not math.isfinite(number) or number <= 0:
        raise ValueError(f"expected a positive number, got {value!r}")
    return number


def _number_or_zero(value: Any) -> float:
    return 0.0 if value in (0, "0") else _number(value)


def _routes(value: Any) -> list:
    from relay.outbound_routes import parse_routes  # the route table's own parser and checks
    return parse_routes(value)


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.lower() in ("1", "true", "yes", "on")
    raise ValueError(f"expected true or false, got {value!r}")


def _path(value: Any) -> Path:
    if not isinstance(value, str):
        raise ValueError("expected a path string")
    return Path(value).expanduser()


def _optional_path(value: Any) -> Path | None:
    return _path(value) if value != "" else None


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return value
    return parse


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = re.compile(rf"{_ATOM}(\.{_ATOM})*")


def _local_part(value: Any) -> str:
    if not isinstance(value, str) or not _DOT_ATOM.fullmatch(value):
        raise ValueError(f"expected the local part of an address (before the @), got {value!r}")
    return value.lower()


@dataclass(frozen=True)
class Option:
    parse: Callable[[Any], Any]
    default: Any


# (section, key) -> Option; section "" holds the top-level keys. The example file documents each.
SCHEMA: dict[tuple[str, str], Option] = {
    ("", "data_dir"): Option(_path, "mailhub-data"),
    ("", "domain"): Option(_domains, "hub.test"),
    ("", "hostname"): Option(_text, ""),
    ("", "shutdown_timeout"): Option(_number, 30),
    ("smtp", "listen"): Option(_required_listen, "127.0.0.1:2525"),
    ("smtp", "max_message_size"): Option(_int(1), 2 * 1024**3),
    ("smtp", "max_recipients"): Option(_int(1), 1000),
    ("smtp", "max_connections"): Option(_int(1), 1000),
    ("smtp", "max_connections_per_ip"): Option(_int(1), 100),
    ("smtp", "max_unauthenticated"): Option(_int(1), 500),
    ("smtp", "max_unauthenticated_per_ip"): Option(_int(1), 20),
    ("smtp", "login_timeout"): Option(_number, 60),
    ("smtp", "limit_exempt_networks"): Option(_networks, []),
    ("smtp", "max_commands"): Option(_int(10), 100000),
    ("smtp", "max_bad_commands"): Option(_int(1), 20),
    ("smtp", "max_line_length"): Option(_int(512), 2048),
    ("smtp", "idle_timeout"): Option(_number, 300),
    ("smtp", "peer_networks"): Option(_networks, []),
    ("smtp", "memory_budget"): Option(parse_size, "256M"),
    ("pop3", "listen"): Option(_listen, "127.0.0.1:1110"),
    ("pop3", "pop3s_listen"): Option(_listen, ""),
    ("pop3", "max_connections"): Option(_int(1), 1000),
    ("pop3", "max_connections_per_ip"): Option(_int(1), 50),
    ("pop3", "max_unauthenticated"): Option(_int(1), 500),
    ("pop3", "max_unauthenticated_per_ip"): Option(_int(1), 20),
    ("pop3", "login_timeout"): Option(_number, 60),
    ("pop3", "limit_exempt_networks"): Option(_networks, []),
    ("pop3", "idle_timeout"): Option(_number, 600),
    ("imap", "listen"): Option(_listen, "127.0.0.1:1143"),
    ("imap", "imaps_listen"): Option(_listen, ""),
    ("imap", "max_connections"): Option(_int(1), 1000),
    ("imap", "max_connections_per_ip"): Option(_int(1), 50),
    ("imap", "max_unauthenticated"): Option(_int(1), 500),
    ("imap", "max_unauthenticated_per_ip"): Option(_int(1), 20),
    ("imap", "login_timeout"): Option(_number, 60),
    ("imap", "limit_exempt_networks"): Option(_networks, []),
    ("imap", "idle_timeout"): Option(_number, 1860),
    ("quotas", "mailbox_bytes"): Option(parse_size, "50G"),
    ("quotas", "mailbox_messages"): Option(_int(0), 200000),
    ("quotas", "max_message_size"): Option(parse_size, 0),
    ("quotas", "submitted_per_day"): Option(parse_size, 0),
    ("quotas", "submitted_per_month"): Option(parse_size, 0),
    ("quotas", "received_per_day"): Option(parse_size, 0),
    ("quotas", "received_per_month"): Option(parse_size, 0),
    ("quotas", "max_drain_time"): Option(_number, 1800),
    ("quotas", "downlink"): Option(parse_size, "1M"),
    ("throttle", "drain_admission"): Option(_bool, True),
    ("throttle", "floor_bytes"): Option(parse_size, "16M"),
    ("throttle", "set_overshoot"): Option(_fraction, 0.25),
    ("throttle", "min_retry"): Option(_number, 60),
    ("throttle", "offline_retry"): Option(_number, 600),
    ("throttle", "drain_window"): Option(_number, 60),
    ("throttle", "drain_tau"): Option(_number, 300),
    ("throttle", "offline_grace"): Option(_number, 900),
    ("throttle", "pacing"): Option(_bool, True),
    ("throttle", "pacing_engage_at"): Option(_fraction, 1.0),
    ("throttle", "pacing_min_rate"): Option(parse_size, "64K"),
    ("throttle", "interval"): Option(_number, 1),
    ("metrics", "listen"): Option(_listen, "127.0.0.1:9425"),
    ("metrics", "health_min_free_bytes"): Option(_int(0), 1024**3),
    ("tls", "cert_file"): Option(_optional_path, ""),
    ("tls", "key_file"): Option(_optional_path, ""),
    ("auth", "allow_plaintext"): Option(_bool, False),
    ("auth", "failure_delay"): Option(_number, 0.5),
    ("auth", "max_failure_delay"): Option(_number, 15),
    ("auth", "penalty_half_life"): Option(_number, 600),
    ("auth", "max_failures"): Option(_int(1), 10),
    ("auth", "failure_window"): Option(_number, 3600),
    ("auth", "block_time"): Option(_number, 900),
    ("auth", "max_penalty_wait"): Option(_number, 30),
    ("auth", "hash_threads"): Option(_int(1), 2),
    ("auth", "max_queued_checks"): Option(_int(1), 256),
    ("events", "retention_days"): Option(_number, 90),
    ("storage", "release_freed_after"): Option(_zero_or_more, 3600),
    ("storage", "reserve_bytes"): Option(parse_size, "64M"),
    ("storage", "min_free_bytes"): Option(parse_size, "0"),
    ("storage", "scrub_rate"): Option(parse_size, "16M"),
    ("log", "level"): Option(_choice("debug", "info", "warning", "error"), "info"),
    ("log", "format"): Option(_choice("text", "json"), "text"),
    ("log", "stall_threshold"): Option(_zero_or_more, 0.25),
    ("directory", "address"): Option(_local_part, "directory"),
    ("directory", "notify_on_change"): Option(_bool, True),
    ("directory", "key_grace_days"): Option(_zero_or_more, 14),
    ("directory", "min_request_interval"): Option(_zero_or_more, 60),
    ("directory", "hub_key_grace_days"): Option(_zero_or_more, 30),
    ("encryption", "required"): Option(_bool, True),
    ("encryption", "allow_hidden_recipients"): Option(_bool, False),
    ("relay", "enabled"): Option(_bool, True),
    ("relay", "hostname"): Option(_text, ""),
    ("relay", "routes"): Option(_routes, []),
    ("relay", "max_active"): Option(_int(1), 100),
    ("relay", "connect_timeout"): Option(_number, 30),
    ("relay", "command_timeout"): Option(_number, 300),
    ("relay", "min_backoff"): Option(_number, 300),
    ("relay", "max_backoff"): Option(_number, 3600),
    ("relay", "max_lifetime"): Option(_number, 5 * 86400),
    ("relay", "delay_warning"): Option(_number_or_zero, 4 * 3600),
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
