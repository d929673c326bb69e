# Test-only fault injection at named points of the commit path. Inert unless the environment sets
# MAILHUB_FAULT="<process>:<point>:<action>[,...]" (process: hub, writer or launcher; action:
# kill = SIGKILL of the process itself, enospc / eio = raise that OSError). With MAILHUB_FAULT_FILE=<path> a fault
# fires only while that file exists, and firing removes it: a test arms it once, and the restarted
# process (which reads the same environment) runs clean. Unset, `hit()` is one global lookup and
# a falsy test: nothing on the mail path pays for it. Must never be set in production.
import errno
import os
import signal

_ACTIONS = ("kill", "enospc", "eio")


def _parse(text: str) -> dict[tuple[str, str], str]:
    faults = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        process, point, action = item.split(":")
        if action not in _ACTIONS:
            raise ValueError(f"MAILHUB_FAULT: unknown action {action!r} (one of {', '.join(_ACTIONS)})")
        faults[(process, point)] = action
    return faults


ARMED: dict[tuple[str, str], str] = {}
_FILE: str | None = None


def load() -> None:
    """Read the environment's settings (at import; an index writer forked by the launcher, again)."""
    global ARMED, _FILE
    ARMED = _parse(os.environ.get("MAILHUB_FAULT", ""))
    _FILE = os.environ.get("MAILHUB_FAULT_FILE")


load()


def hit(process: str, point: str) -> None:
    """Reached `point` in `process`: act if a fault is armed there."""
    if ARMED:
        _fire(process, point)


def _fire(process: str, point: str) -> None:
    action = ARMED.get((process, point))
    if action is None:
        return
    if _FILE is not None:
        try:
            os.unlink(_FILE)  # only the process that removes it fires: once, however many race
        except FileNotFoundError:
            return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    code = errno.ENOSPC if action == "enospc" else errno.EIO
    raise OSError(code, f"{os.strerror(code)} (injected at {process}:{point})")
