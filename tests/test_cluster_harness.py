# The two-node harness (tests/clusterutil.py) itself: HAProxy in front of two `mailhub serve`
# processes passes a gateway's mail to a node with the gateway's own address (PROXY v2); a node
# killed with SIGKILL is taken out by the balancer and the other takes the next mail; the killed
# node restarted on its data folder comes back with the mail it had acknowledged, and the
# balancer takes it in again. Here each node has its own SQLite index (the harness's own test);
# the shared-index scenario (PostgreSQL, shared blobs) builds on the same Cluster.
import os
import smtplib

import pytest
from clusterutil import GATEWAY, HAPROXY, Cluster

from conftest import ALPHA_BETA, PASSWORD, make_message, queue_id_from

pytestmark = pytest.mark.skipif(
    not os.path.exists(HAPROXY), reason="needs Debian's haproxy (bench/install-debian-packages.sh)"
)


def send(port: int, size: int = 3000) -> tuple[str, bytes]:
    """A mail from alpha to beta through the balancer, from the gateway's address: its queue ID
    and the bytes sent."""
    message = make_message(size)
    with smtplib.SMTP("127.0.0.1", port, source_address=(GATEWAY, 0), timeout=30) as client:
        client.ehlo("gateway.test")
        client.login("alpha", PASSWORD)
        client.mail("alpha@hub.test")
        assert client.rcpt("beta@hub.test")[0] == 250
        code, reply = client.data(message)
    assert code == 250, reply
    return queue_id_from(reply), message


def holder(cluster: Cluster, queue_id: str) -> str:
    """The node whose index holds the mail."""
    (node,) = [
        name for name, hub in cluster.nodes.items() if hub.query("SELECT 1 FROM messages WHERE queue_id = ?", queue_id)
    ]
    return node


def test_two_nodes_behind_haproxy_kill_one_and_restart_it(make_hub, tmp_path):
    with Cluster(make_hub, tmp_path, sites=ALPHA_BETA) as cluster:
        first, body = send(cluster.front("smtp"))
        node = holder(cluster, first)
        assert cluster.nodes[node].stored(first).startswith(b"Received: from gateway.test ([127.0.0.2])")
        other = next(name for name in cluster.NODES if name != node)

        assert cluster.kill(node) == -9
        cluster.wait_balanced(node, up=False)
        second, _ = send(cluster.front("smtp"))
        assert holder(cluster, second) == other

        cluster.restart(node)
        cluster.wait_balanced(node, up=True)
        assert holder(cluster, first) == node  # acknowledged before the kill, still there
        assert cluster.nodes[node].stored(first).endswith(body)
