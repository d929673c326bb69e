# The time a new connection has to log in, for every protocol (SMTP, POP3, IMAP): started when the
# connection is admitted, met at login (SMTP from a peer network: at its first MAIL FROM), cancelled
# when the connection ends. When it passes, the session's own `expire` closes the connection (with
# its protocol's reply) and says so; such a close is counted (metric login_timeouts).
import asyncio
from collections.abc import Callable

from relay import metrics
from relay.connection_limits import Ticket


class LoginDeadline:
    def __init__(self, protocol: str, seconds: float, ticket: Ticket | None, expire: Callable[[], bool]):
        """`expire()` runs once the deadline passed unmet: it closes the connection and returns
        True, or returns False when there was nothing left to close."""
        self._protocol = protocol
        self._ticket = ticket
        self._expire = expire
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(seconds, self._expired)

    @property
    def running(self) -> bool:
        return self._timer is not None

    def met(self) -> None:
        """Logged in: no longer counted as not logged in (the ticket), and no deadline."""
        if self._ticket is not None:
            self._ticket.logged_in()
        self.cancel()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self._expire():
            metrics.login_timeout(self._protocol)


__all__ = ["LoginDeadline"]
