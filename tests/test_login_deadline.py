# relay.login_deadline, the login deadline all protocols share, in memory on a real event loop:
# met in time it never fires and the connection stops counting as not logged in; unmet, the
# session's expiry runs once and a close is counted (per protocol); cancelled, nothing runs.
import asyncio

from relay import metrics
from relay.connection_limits import ConnectionCounter, Limits
from relay.login_deadline import LoginDeadline

from conftest import until


def timeouts(protocol: str) -> float:
    return metrics.REGISTRY.get_sample_value("mailhub_login_timeouts_total", {"protocol": protocol}) or 0


def counter() -> ConnectionCounter:
    return ConnectionCounter(Limits(10, 10, 10, 10, ()))


async def past(seconds: float) -> None:
    """Return once a timer set `seconds` from now fired: every timer due before it fired first."""
    fired = asyncio.Event()
    asyncio.get_running_loop().call_later(seconds, fired.set)
    await fired.wait()


def test_an_unmet_deadline_runs_the_expiry_once_and_counts_the_close():
    async def main():
        connections = counter()
        ticket = connections.admit("127.0.0.1")
        expired = []
        before = timeouts("deadline-test")
        deadline = LoginDeadline("deadline-test", 0.02, ticket, lambda: expired.append(1) or True)
        assert deadline.running and connections.unauthenticated == 1
        await until(lambda: expired, interval=0.005, message="the expiry run")
        await past(0.03)  # and not again
        assert expired == [1] and not deadline.running
        assert timeouts("deadline-test") == before + 1
        assert connections.unauthenticated == 1  # still not logged in

    asyncio.run(main())


def test_an_expiry_with_nothing_to_close_is_not_counted():
    async def main():
        expired = []
        before = timeouts("deadline-test-gone")
        LoginDeadline("deadline-test-gone", 0.01, None, lambda: expired.append(1) or False)
        await until(lambda: expired, interval=0.005, message="the expiry run")
        assert timeouts("deadline-test-gone") == before

    asyncio.run(main())


def test_a_met_or_cancelled_deadline_never_fires():
    async def main():
        connections = counter()
        ticket = connections.admit("127.0.0.1")
        expired = []
        met = LoginDeadline("deadline-test-met", 0.02, ticket, lambda: expired.append("met") or True)
        cancelled = LoginDeadline("deadline-test-met", 0.02, None, lambda: expired.append("cancelled") or True)
        met.met()
        cancelled.cancel()
        assert connections.unauthenticated == 0 and not met.running and not cancelled.running
        met.met()  # again (SMTP from a peer network: each MAIL FROM): no harm
        assert connections.unauthenticated == 0
        await past(0.03)  # past both deadlines
        assert expired == [] and timeouts("deadline-test-met") == 0

    asyncio.run(main())
