# mailhub/leadership.py LeaderTasks: the leader's loops start when the node becomes the leader, stop
# when it is no longer one, and never start again once the hub is shutting down (the cluster link
# outlives LeaderTasks.stop(): a node that wins the leadership while it stops, because the other
# node stopped first, ran its scrub on closed storage and logged a traceback).
import asyncio

from mailhub.leadership import LeaderTasks


def test_loops_follow_the_leadership_and_none_starts_after_stop():
    async def scenario() -> list[str]:
        started: list[str] = []

        def start() -> asyncio.Task[None]:
            started.append("scrub")
            return asyncio.create_task(asyncio.sleep(3600))

        tasks = LeaderTasks()
        tasks.add("scrub", start)
        assert started == [] and tasks.running() == []
        tasks.set_leader(True)
        await asyncio.sleep(0)  # one turn of the loop: what set_leader scheduled has run
        assert started == ["scrub"] and tasks.running() == ["scrub"]
        tasks.set_leader(False)
        tasks.set_leader(True)  # won back: runs again
        await asyncio.sleep(0)  # one turn of the loop
        assert started == ["scrub", "scrub"]
        await tasks.stop()
        assert tasks.running() == []
        tasks.set_leader(True)  # the link, still up while the hub stops, makes this node the leader
        await asyncio.sleep(0)  # one turn of the loop: nothing may start
        return started

    assert asyncio.run(scenario()) == ["scrub", "scrub"]
