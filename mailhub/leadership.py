# Periodic work done once in a cluster of hub nodes (issue 27): the node holding the leader lock
# of its cluster link (storage/postgres/cluster.py) runs it, the others wait. Two ways in:
# - `is_leader()` (`always` for one hub): asked by the periodic loops before each round (directory
#   updates; lifecycle: expiry, quota warnings and notices; liveness notices; the pruning of
#   tracking events and audit records);
# - LeaderTasks: loops that only the leader runs at all (the scrub), started when the node becomes
#   the leader and cancelled when it stops being one (a loop added here must be able to run again).
# One hub on SQLite is its own leader: everything runs as before.
# Must never run leader work on two nodes knowingly: the gate is read at each round, and a node that
# loses its link stops being the leader at once (a round already under way finishes).
import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger("mailhub.server")


def always() -> bool:
    return True


class LeaderTasks:
    """Loops run while this node is the leader: `add(name, start)` (start() returns the running
    task), `set_leader(bool)` from the cluster link, `await stop()` at shutdown."""

    def __init__(self) -> None:
        self._loops: list[tuple[str, Callable[[], asyncio.Task[None]]]] = []
        self._running: dict[str, asyncio.Task[None]] = {}
        self._cancelled: set[asyncio.Task[None]] = set()  # awaited at stop()
        self.leader = False
        self._stopped = False  # the hub shuts down: a leadership won meanwhile starts nothing

    def add(self, name: str, start: Callable[[], asyncio.Task[None]]) -> None:
        self._loops.append((name, start))
        if self.leader:
            self._running[name] = start()

    def set_leader(self, leader: bool) -> None:
        if leader == self.leader or self._stopped:  # (the link outlives stop(): it goes after storage)
            return
        self.leader = leader
        if leader:
            for name, start in self._loops:
                if name not in self._running:
                    self._running[name] = start()
        else:
            for name, task in self._running.items():
                log.info("%s stopped: this node is no longer the cluster's leader", name)
                task.cancel()
                self._cancelled.add(task)
                task.add_done_callback(self._cancelled.discard)
            self._running.clear()

    def running(self) -> list[str]:
        return sorted(name for name, task in self._running.items() if not task.done())

    async def stop(self) -> None:
        self._stopped = True
        tasks = [*self._running.values(), *self._cancelled]
        self._running.clear()
        self.leader = False
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
