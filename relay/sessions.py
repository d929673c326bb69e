# Who is connected: the open SMTP, POP3 and IMAP sessions as rows (protocol, site, client address,
# since, bytes in and out, last command) for `mailhub sessions`, and ending a site's sessions
# (`--kick SITE`) with each protocol's goodbye where it has one. The registry is a view over the
# sets each listener keeps of its sessions anyway; a session keeps its own counters (plain integer
# additions on its I/O path), read only when someone lists them.
# Must never: show a command's arguments (passwords, addresses), or cut a session in a way that
# loses acknowledged mail or applies a POP3 deletion the client did not QUIT for.
from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass
from typing import Protocol

KICK_REASON = "closed by the hub's operator"


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One open session as `mailhub sessions` lists it."""

    protocol: str  # smtp, pop3, imap
    site: str | None  # the logged-in site, None before login
    client: str  # the client's IP address
    since: float  # when it connected (Unix time)
    bytes_in: int  # received from the client
    bytes_out: int  # sent to the client (mail sent with sendfile included, once a mail is sent)
    command: str  # the verb of the last command (no arguments), "" before the first

    def as_dict(self) -> dict:
        return asdict(self)


class LiveSession(Protocol):
    """What a protocol's session offers the registry."""

    def session_info(self) -> SessionInfo: ...

    def kick(self) -> None:
        """End the session (at once, or for an SMTP transaction in flight right after it)."""


class SessionRegistry:
    """The open sessions of every listener, as views over their own sets."""

    def __init__(self, groups: Iterable[Collection[LiveSession]]) -> None:
        self._groups = list(groups)

    def sessions(self) -> list[LiveSession]:
        return [session for group in self._groups for session in list(group)]

    def listing(self) -> list[SessionInfo]:
        """Every open session, the oldest first."""
        return sorted((s.session_info() for s in self.sessions()), key=lambda info: info.since)

    def kick(self, site: str) -> list[SessionInfo]:
        """End every session of `site` (by name, any case); the sessions it ended."""
        ended = []
        for session in self.sessions():
            info = session.session_info()
            if info.site is not None and info.site.lower() == site.lower():
                session.kick()
                ended.append(info)
        return ended
