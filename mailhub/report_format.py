# Formatting shared by the command-line reports (site show, trace, stats): sizes in binary units
# and UTC timestamps in ISO 8601. Pure functions.
import time


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


def iso_time(seconds: float | None, millis: bool = True) -> str | None:
    """2026-11-28T04:00:00.123Z (or without the milliseconds); None stays None."""
    if seconds is None:
        return None
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{text}.{int(seconds * 1000) % 1000:03d}Z" if millis else text + "Z"


def printable(line: str) -> str:
    """Control characters (from client-supplied addresses and headers) escaped: a report must not
    drive the operator's terminal."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in line)
