# `mailhub config show`: the effective configuration, one line per key of the schema, with where its
# value came from (default, the file, or the environment variable that set it), as text columns or
# JSON. Values are written as they would be in the TOML file. Must never: print a secret (a field
# its dataclass keeps out of reprs, such as a relay route's auth_password or s3.secret_key: shown as "********").
import dataclasses
import ipaddress
import json
import math
from pathlib import Path
from typing import Any

from storage.index_url import redacted

from .config import SCHEMA, SECTIONS, Config

MASK = "********"
_FIELDS = {
    (section, f.name): f
    for section, cls in SECTIONS.items()
    for f in dataclasses.fields(cls)
    if (section, f.name) in SCHEMA
}


def rows(cfg: Config) -> list[dict[str, Any]]:
    """{"key", "value" (JSON-able, as in TOML), "source"} per key, in the order of the schema."""
    given = dict(cfg.sources)
    found = []
    for section, key in SCHEMA:
        holder = getattr(cfg, section) if section else cfg
        value = getattr(holder, key)
        if section == "storage" and key == "index" and value:
            value = redacted(value)  # a password in the URL is never shown
        elif value and not _FIELDS[(section, key)].repr:
            value = MASK  # a secret (s3.secret_key)
        source = given.get((section, key), (None, None))[1]
        if source is None:
            where = "default"
        elif source.startswith("MAILHUB_"):
            where = f"environment {source}"
        elif cfg.config_file is not None and source == str(cfg.config_file):
            where = f"file {source}"
        else:
            where = source  # Config.with_overrides() names its own source
        found.append({"key": f"{section}.{key}" if section else key, "value": plain(value), "source": where})
    return found


def plain(value: Any) -> Any:
    """A parsed value as TOML would write it: listeners as "HOST:PORT", networks and paths as
    strings, numbers without a needless ".0", secrets masked."""
    if value is None:
        return ""
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int):
        host, port = value
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(value, tuple | list):
        return [plain(item) for item in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: (MASK if getattr(value, f.name) else "") if not f.repr else plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
        }
    return str(value)


def render(cfg: Config) -> str:
    """Aligned text: KEY, VALUE (JSON notation, which TOML shares for these values), SOURCE."""
    found = rows(cfg)
    values = [json.dumps(row["value"]) for row in found]
    width_key = max(len(row["key"]) for row in found)
    width_value = min(40, max(len(v) for v in values))
    lines = [f"{'KEY':<{width_key}}  {'VALUE':<{width_value}}  SOURCE"]
    for row, value in zip(found, values):
        lines.append(f"{row['key']:<{width_key}}  {value:<{width_value}}  {row['source']}")
    return "\n".join(lines)
