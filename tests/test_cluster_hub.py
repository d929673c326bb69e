# Two in-process hubs joined by their cluster links (storage/postgres/cluster.py) on a real
# PostgreSQL, as two nodes of a cluster (each its own SQLite index here: what is tested is the
# coordination, the shared index is tests/test_postgres_*'s): one POP3 session per mailbox across
# both, a session closed when its node's link is lost, the periodic work on the leader only and
# taken over when the leader stops.
import json
import poplib
import time

import psycopg
import pytest

from conftest import ALPHA, PASSWORD, wait_for


def _login(hub):
    client = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=30)
    client.user("alpha")
    client.pass_(PASSWORD)
    return client


def _refused(hub) -> str:
    client = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=30)
    try:
        client.user("alpha")
        with pytest.raises(poplib.error_proto) as refused:
            client.pass_(PASSWORD)
        return refused.value.args[0].decode()
    finally:
        client.close()


def _running(hub) -> list[str]:
    return hub._hub._leader_tasks.running()


def _terminate_link(url: str, node: str) -> None:
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (f"mailhub cluster link {node}",),
        )


def test_two_nodes_share_the_pop3_mailbox_lock_and_the_leader(pg_url, make_hub):  # the database outlives the hubs
    a = make_hub(sites=ALPHA, MAILHUB_NODE_NAME="node-a")
    b = make_hub(sites=ALPHA, MAILHUB_NODE_NAME="node-b")
    for hub in (a, b):
        hub.hub_kwargs = {"cluster_url": pg_url}
    a.start()
    wait_for(lambda: _running(a) == ["directory updates", "scrub"], message="node a leads")
    b.start()
    assert _running(b) == []  # not the leader: no directory updates, no scrub here

    session = _login(a)
    assert "[IN-USE]" in _refused(b)  # held on node a
    # `mailhub sessions` on a node: its own sessions, named by node
    listed = json.loads(a.cli("sessions", "--json").stdout)
    assert [(r["protocol"], r["site"], r["node"]) for r in listed] == [("pop3", "alpha", "node-a")]
    assert "(node node-a only" in a.cli("sessions").stdout
    wait_for(lambda: b.cli("sessions").stdout.strip() == "no open sessions on node node-b")  # its refused one ended
    session.quit()
    wait_for(lambda: _try(b), message="node b takes the mailbox once node a let go")

    # node b's session holds it; node b's link is lost: the session is closed, node a may serve
    held = _login(b)
    assert "[IN-USE]" in _refused(a)
    _terminate_link(pg_url, "node-b")
    with pytest.raises((poplib.error_proto, OSError, EOFError)):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            held.noop()
            time.sleep(0.05)
    held.close()
    wait_for(lambda: _try(a), message="node a takes the mailbox of the node whose link went")
    assert "cluster link" in b.log_text()

    a.stop()  # the leader stops: node b takes the periodic work over
    wait_for(lambda: _running(b) == ["directory updates", "scrub"], timeout=30, message="node b leads")


def _try(hub) -> bool:
    try:
        _login(hub).quit()
        return True
    except poplib.error_proto:
        return False
