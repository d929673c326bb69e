# Jinja filters of the mailhub role: render the hub's config file (TOML) from a dict in the file's
# own shape, list the TCP ports the config listens on (for CAP_NET_BIND_SERVICE in the unit), and
# turn a site's limits into `mailhub site set` options and tell from its reply whether they changed.
# Must never write a value TOML cannot read back as the same value: anything else is an error.
import json
import math
import re
from collections.abc import Mapping, Sequence

from ansible.errors import AnsibleFilterError

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def to_toml(document: Mapping) -> str:
    """Top-level keys first, then one [section] per dict; None values are left out."""
    lines: list[str] = []
    _table(lines, [], document)
    return "\n".join(lines).lstrip("\n") + "\n"


def _table(lines: list[str], path: list[str], table: Mapping) -> None:
    scalars = [(k, v) for k, v in table.items() if v is not None and not isinstance(v, Mapping)]
    if path and scalars:
        lines.extend(["", "[" + ".".join(_key(p) for p in path) + "]"])
    lines.extend(f"{_key(k)} = {_value(v)}" for k, v in scalars)
    for k, v in table.items():
        if isinstance(v, Mapping):
            _table(lines, [*path, k], v)


def _key(key) -> str:
    key = str(key)
    return key if _BARE_KEY.match(key) else _string(key)


def _string(text: str) -> str:
    # A JSON string is a TOML basic string, except that TOML wants DEL escaped too.
    return json.dumps(str(text), ensure_ascii=False).replace("\x7f", "\\u007F")


def _value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        if not math.isfinite(value):
            raise AnsibleFilterError(f"mailhub_toml: {value!r} has no place in the hub's config")
        return repr(float(value))
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items() if v is not None) + "}"
    if isinstance(value, Sequence):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise AnsibleFilterError(f"mailhub_toml: cannot write {type(value).__name__} {value!r} as TOML")


def listen_ports(document: Mapping) -> list[int]:
    """Ports of every "listen" or "*_listen" setting that is not empty."""
    ports = []
    for section in document.values():
        if not isinstance(section, Mapping):
            continue
        for key, value in section.items():
            if (key == "listen" or str(key).endswith("_listen")) and isinstance(value, str) and value:
                port = value.rpartition(":")[2]
                if port.isdigit():
                    ports.append(int(port))
    return ports


def limit_options(limits: Mapping) -> list[str]:
    """{"mailbox_bytes": "10G", "max_drain_time": 600} -> ["--mailbox-bytes", "10G", "--max-drain-time", "600"]"""
    options = []
    for name, value in limits.items():
        options += ["--" + str(name).replace("_", "-"), str(value).lower() if isinstance(value, bool) else str(value)]
    return options


def limits_changed(before: Mapping, reply: str) -> bool:
    """Whether `mailhub site set` changed a limit: `reply` is its line "limits of site NAME set:
    name=value, ..." (values normalised: octets, seconds, "unlimited" or "default"), `before` the
    site's "limits" from `mailhub site list --json` ({} for a site just added)."""
    _, found, assignments = reply.strip().partition(" set: ")
    if not found:
        return True
    for assignment in assignments.split(", "):
        name, _, value = assignment.partition("=")
        old = before.get(name) or {}
        if value == "default":
            same = old.get("source") == "config"
        elif value == "unlimited":
            same = old.get("source") == "site" and old.get("limit") is None
        else:
            same = old.get("source") == "site" and old.get("limit") is not None and float(old["limit"]) == float(value)
        if not same:
            return True
    return False


class FilterModule:
    def filters(self):
        return {
            "mailhub_toml": to_toml,
            "mailhub_listen_ports": listen_ports,
            "mailhub_limit_options": limit_options,
            "mailhub_limits_changed": limits_changed,
        }
