# The POP3 mailbox locks (RFC 1939: one session holds a maildrop at a time), which IMAP also reads
# (an EXPUNGE waits while POP3 holds the mailbox). Two implementations behind one interface:
# - MailboxLocks, in this process: one hub on SQLite, today's behaviour;
# - ClusterMailboxLocks (several nodes on PostgreSQL): the in-process lock first (one session per
#   node), then the cluster link's advisory lock (storage/postgres/cluster.py), which PostgreSQL
#   frees when the node dies. When the link is lost the node can no longer vouch for its locks
#   (PostgreSQL freed them; another node may let a session in): the sessions holding them are
#   closed at once, without UPDATE (nothing deleted; the client polls again), and new logins are
#   refused with a temporary error until the link is back. Before a session's deletions are applied
#   (QUIT) the lock is confirmed on the database (still_holds): a loss not yet noticed - a partition,
#   PostgreSQL freed the lock and the node still waits for its ping - deletes nothing either.
# Must never: let two sessions hold one mailbox, keep a lock for a session that ended, or block.
import logging
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger("mailhub.pop3")


class LocksUnavailable(Exception):
    """No lock can be taken now (the cluster link is down): a temporary refusal."""


class MailboxLocks:
    """In-process mailbox locks: site id -> the session holding the mailbox."""

    def __init__(self) -> None:
        self.holders: dict[int, Any] = {}

    def holder(self, site_id: int) -> Any | None:
        """The session of this node holding the site's mailbox, if any."""
        return self.holders.get(site_id)

    def __contains__(self, site_id: int) -> bool:
        return site_id in self.holders

    async def acquire(self, site_id: int, session: Any) -> bool:
        """Lock the mailbox for `session`; False when another session holds it."""
        if site_id in self.holders:
            return False
        self.holders[site_id] = session
        return True

    def release(self, site_id: int, session: Any) -> None:
        if self.holders.get(site_id) is session:
            del self.holders[site_id]

    async def in_use(self, site_id: int) -> bool:
        """Whether a POP3 session (of any node) holds the mailbox."""
        return site_id in self.holders

    async def still_holds(self, site_id: int, session: Any) -> bool:
        """Whether `session` holds the mailbox now (asked before its deletions are applied)."""
        return self.holders.get(site_id) is session


class LockLink(Protocol):
    """What the cluster locks use of the node's cluster link (storage.postgres.cluster.ClusterLink)."""

    on_locks_lost: Callable[[set[int]], None] | None

    async def try_lock(self, site_id: int) -> bool: ...

    def unlock(self, site_id: int) -> None: ...

    async def locked_elsewhere(self, site_id: int) -> bool: ...

    async def still_held(self, site_id: int) -> bool: ...


class ClusterMailboxLocks(MailboxLocks):
    """The in-process lock, then the cluster's. `abort(session)` closes a session whose lock went."""

    def __init__(self, link: LockLink, abort: Callable[[Any], None]):
        super().__init__()
        self.link = link
        self.abort = abort
        link.on_locks_lost = self._lost

    async def acquire(self, site_id: int, session: Any) -> bool:
        if not await super().acquire(site_id, session):
            return False
        try:
            locked = await self.link.try_lock(site_id)
        except Exception as exc:
            super().release(site_id, session)
            raise LocksUnavailable(str(exc)) from None
        except BaseException:  # cancelled: the link lets a lock taken meanwhile go
            super().release(site_id, session)
            raise
        if locked and self.holders.get(site_id) is not session:  # the lock went meanwhile (_lost):
            return False  # (a release meanwhile queued its unlock after this try_lock: not twice)
        if not locked:
            super().release(site_id, session)
        return locked

    def release(self, site_id: int, session: Any) -> None:
        if self.holders.get(site_id) is session:
            super().release(site_id, session)
            self.link.unlock(site_id)

    async def in_use(self, site_id: int) -> bool:
        if site_id in self.holders:
            return True
        try:
            return await self.link.locked_elsewhere(site_id)
        except Exception:
            return True  # cannot tell: as if held (an EXPUNGE waits)

    async def still_holds(self, site_id: int, session: Any) -> bool:
        """The session holds the in-process lock AND the database confirms, on the connection that
        took it, that this node holds the advisory lock: a link lost and not yet noticed (PostgreSQL
        freed the lock, another node may have let a session in), or lost and back, answers False."""
        if not await super().still_holds(site_id, session):
            return False
        try:
            held = await self.link.still_held(site_id)
        except Exception as exc:
            log.warning("site id %d: the mailbox lock cannot be confirmed: %s", site_id, exc)
            return False
        return held and self.holders.get(site_id) is session

    def _lost(self, sites: set[int]) -> None:
        for site_id in sites:
            session = self.holders.pop(site_id, None)
            if session is not None:
                log.warning("site id %d: POP3 session closed, its mailbox lock went with the cluster link", site_id)
                self.abort(session)
