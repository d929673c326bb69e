# Load profiles: read a TOML file into validated, immutable dataclasses. Pure: no sockets, no
# clock, no randomness (the seed is carried, not used). Must never silently accept an unknown key:
# a typo in a profile would otherwise run a different load than the operator believes.
from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

PROFILE_DIR = Path(__file__).parent / "profiles"
PROTOCOLS = ("pop3", "imap-idle")
PER_MAIL = ("file", "study")


class ProfileError(ValueError):
    """A profile that cannot be used; the message names the key."""


@dataclass(frozen=True)
class Site:
    name: str
    send: bool = True
    receive: bool = True
    uplink_mbit_s: float = 0.0  # 0 = unlimited (client-side pacing of the sender sockets)
    downlink_mbit_s: float = 0.0  # 0 = unlimited (pacing of the receiver's reads)
    protocol: str = "pop3"
    poll_interval_s: float = 5.0
    first_poll_s: float | None = None  # None: a seeded random phase in [0, poll_interval_s)
    send_weight: float = 1.0
    receive_weight: float = 1.0
    connections: int = 2  # concurrent SMTP sessions of this gateway


@dataclass(frozen=True)
class StudyKind:
    modality: str
    weight: float = 1.0
    images: tuple[int, int] = (1, 1)  # uniform between min and max
    bytes_per_image: int = 65536
    per_mail: str = "file"  # one DICOM file per mail, or the whole study in one mail


@dataclass(frozen=True)
class Burst:
    at_s: float
    studies: int
    within_s: float = 1.0


@dataclass(frozen=True)
class Smtp:
    starttls: bool = False  # use STARTTLS when offered
    chunking: bool = True  # use BDAT when CHUNKING is offered
    pipelining: bool = True
    retry_base_s: float = 1.0  # first retry after a 4xx; doubles each time
    retry_max_s: float = 30.0
    max_attempts: int = 8


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    duration_s: float
    drain_timeout_s: float
    seed: int
    domain: str
    sites: tuple[Site, ...]
    studies: tuple[StudyKind, ...]
    rate_per_s: float
    bursts: tuple[Burst, ...]
    smtp: Smtp
    sha256: str = ""
    accounts: dict = field(default_factory=dict)  # name -> {"login", "password"} for foreign servers

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def senders(self) -> list[Site]:
        return [s for s in self.sites if s.send]

    @property
    def receivers(self) -> list[Site]:
        return [s for s in self.sites if s.receive]


def _take(table: dict, where: str, spec: dict) -> dict:
    """Check the keys of `table` against `spec` {key: type}; return the known values."""
    unknown = set(table) - set(spec)
    if unknown:
        raise ProfileError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    out = {}
    for key, kind in spec.items():
        if key not in table:
            continue
        value = table[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ProfileError(f"{where}.{key}: expected {kind.__name__}, got {value!r}")
        out[key] = value
    return out


_SITE_KEYS = {
    "name": str,
    "send": bool,
    "receive": bool,
    "uplink_mbit_s": float,
    "downlink_mbit_s": float,
    "protocol": str,
    "poll_interval_s": float,
    "first_poll_s": float,
    "send_weight": float,
    "receive_weight": float,
    "connections": int,
}


def _site(values: dict, where: str) -> Site:
    site = Site(**values)
    if site.protocol not in PROTOCOLS:
        raise ProfileError(f"{where}.protocol: expected one of {PROTOCOLS}, got {site.protocol!r}")
    if site.poll_interval_s <= 0 or site.connections < 1:
        raise ProfileError(f"{where}: poll_interval_s must be > 0 and connections >= 1")
    if min(site.send_weight, site.receive_weight) < 0:
        raise ProfileError(f"{where}: send_weight and receive_weight must be >= 0")
    if min(site.uplink_mbit_s, site.downlink_mbit_s) < 0:
        raise ProfileError(f"{where}: bandwidths must be >= 0 (0 = unlimited)")
    return site


def _sites(data: dict) -> tuple[Site, ...]:
    defaults = _take(
        data.get("site_defaults", {}), "site_defaults", {k: v for k, v in _SITE_KEYS.items() if k != "name"}
    )
    sites = []
    for i, table in enumerate(data.get("site_groups", [])):
        where = f"site_groups[{i}]"
        group = _take(
            table, where, {**{k: v for k, v in _SITE_KEYS.items() if k != "name"}, "prefix": str, "count": int}
        )
        prefix, count = group.pop("prefix", None), group.pop("count", None)
        if not prefix or not count or count < 1:
            raise ProfileError(f"{where}: needs prefix and count >= 1")
        width = max(3, len(str(count)))
        sites += [_site({**defaults, **group, "name": f"{prefix}{n:0{width}d}"}, where) for n in range(1, count + 1)]
    for i, table in enumerate(data.get("sites", [])):
        where = f"sites[{i}]"
        values = _take(table, where, _SITE_KEYS)
        if "name" not in values:
            raise ProfileError(f"{where}.name: missing")
        sites.append(_site({**defaults, **values}, where))
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise ProfileError("sites: duplicate site names")
    if not any(s.send and s.send_weight > 0 for s in sites) or not any(
        s.receive and s.receive_weight > 0 for s in sites
    ):
        raise ProfileError("sites: need at least one sending and one receiving site (with weight > 0)")
    return tuple(sites)


def _studies(data: dict) -> tuple[StudyKind, ...]:
    kinds = []
    for i, table in enumerate(data.get("studies", [])):
        where = f"studies[{i}]"
        values = _take(
            table, where, {"modality": str, "weight": float, "images": list, "bytes_per_image": int, "per_mail": str}
        )
        images = values.get("images", [1, 1])
        if len(images) != 2 or not all(isinstance(n, int) for n in images) or not 1 <= images[0] <= images[1]:
            raise ProfileError(f"{where}.images: expected [min, max] with 1 <= min <= max")
        values["images"] = (images[0], images[1])
        kind = StudyKind(**values)
        if kind.per_mail not in PER_MAIL:
            raise ProfileError(f"{where}.per_mail: expected one of {PER_MAIL}")
        if kind.bytes_per_image < 64 or kind.weight <= 0:
            raise ProfileError(f"{where}: bytes_per_image >= 64 and weight > 0 required")
        kinds.append(kind)
    if not kinds:
        raise ProfileError("studies: at least one study kind is required")
    return tuple(kinds)


def parse_profile(text: str, source: str = "<string>") -> Profile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{source}: {exc}") from None
    top = _take(
        data,
        "profile",
        {
            "name": str,
            "description": str,
            "duration_s": float,
            "drain_timeout_s": float,
            "seed": int,
            "domain": str,
            "site_defaults": dict,
            "site_groups": list,
            "sites": list,
            "studies": list,
            "arrival": dict,
            "smtp": dict,
            "accounts": dict,
        },
    )
    arrival = _take(data.get("arrival", {}), "arrival", {"rate_per_s": float, "bursts": list})
    bursts = tuple(
        Burst(**_take(b, f"arrival.bursts[{i}]", {"at_s": float, "studies": int, "within_s": float}))
        for i, b in enumerate(arrival.get("bursts", []))
    )
    smtp = Smtp(
        **_take(
            data.get("smtp", {}),
            "smtp",
            {
                "starttls": bool,
                "chunking": bool,
                "pipelining": bool,
                "retry_base_s": float,
                "retry_max_s": float,
                "max_attempts": int,
            },
        )
    )
    accounts = {}
    for name, acc in top.get("accounts", {}).items():
        accounts[name] = _take(acc, f"accounts.{name}", {"login": str, "password": str})
    profile = Profile(
        name=top.get("name", Path(source).stem),
        description=top.get("description", ""),
        duration_s=top.get("duration_s", 10.0),
        drain_timeout_s=top.get("drain_timeout_s", 30.0),
        seed=top.get("seed", 1),
        domain=top.get("domain", "hub.test"),
        sites=_sites(data),
        studies=_studies(data),
        rate_per_s=arrival.get("rate_per_s", 1.0),
        bursts=bursts,
        smtp=smtp,
        sha256=hashlib.sha256(text.encode()).hexdigest(),
        accounts=accounts,
    )
    if profile.duration_s <= 0 or profile.rate_per_s < 0:
        raise ProfileError("duration_s must be > 0 and arrival.rate_per_s >= 0")
    return profile


def load_profile(name_or_path: str) -> Profile:
    """A path to a TOML file, or the name of a shipped profile (smoke, pilot, ...)."""
    path = Path(name_or_path)
    if not path.exists() and (PROFILE_DIR / f"{name_or_path}.toml").exists():
        path = PROFILE_DIR / f"{name_or_path}.toml"
    try:
        text = path.read_text()
    except OSError as exc:
        raise ProfileError(f"cannot read profile {name_or_path}: {exc}") from None
    return parse_profile(text, str(path))
