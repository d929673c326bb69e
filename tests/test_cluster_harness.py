# The two-node harness (tests/clusterutil.py) itself, on what a cluster shares: one PostgreSQL
# index and one blob folder, HAProxy in front. A gateway's mail through the balancer reaches a
# node with the gateway's own address (PROXY v2) and both nodes serve it over POP3; the node that
# took it, killed with SIGKILL, is taken out by the balancer and the other serves its mail from the
# shared folder and takes the next one; restarted on its data folder the killed node comes back
# healthy, the balancer takes it in again and it serves both mails.
import os
import smtplib

import pytest
from clusterutil import GATEWAY, HAPROXY, Cluster, pop3_login

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


def beta_mailbox(port: int) -> list[bytes]:
    """beta's mails as a POP3 session on `port` retrieves them (nothing deleted)."""
    pop = pop3_login(port, "beta", PASSWORD)
    try:
        count = pop.stat()[0]
        return [b"\r\n".join(pop.retr(n)[1]) + b"\r\n" for n in range(1, count + 1)]
    finally:
        pop.quit()


def test_two_nodes_on_one_index_and_blob_folder_kill_one_and_restart_it(make_hub, pg_index, tmp_path):
    url, reset = pg_index
    reset()
    shared = tmp_path / "shared-blobs"
    shared.mkdir()
    with Cluster(make_hub, tmp_path, index_url=url, blobs=shared, sites=ALPHA_BETA) as cluster:
        first, body = send(cluster.front("smtp"))
        ((blob,),) = cluster.nodes["node1"].query("SELECT blob FROM messages WHERE queue_id = ?", first)
        writer = blob.split("/")[0]  # '<node>/<hour>/<queue ID>': the node that took it
        other = next(name for name in cluster.NODES if name != writer)
        assert cluster.nodes[other].stored(first).startswith(b"Received: from gateway.test ([127.0.0.2])")
        for name in cluster.NODES:  # straight to each node (from 127.0.0.1: no PROXY header)
            (served,) = beta_mailbox(cluster.node_port(name, "pop3"))
            assert served.endswith(body), name

        assert cluster.kill(writer) == -9
        cluster.wait_balanced(writer, up=False)
        (served,) = beta_mailbox(cluster.front("pop3"))  # the other node, from the shared folder
        assert served.endswith(body)
        second, body2 = send(cluster.front("smtp"))  # taken by the other node
        ((blob,),) = cluster.nodes[other].query("SELECT blob FROM messages WHERE queue_id = ?", second)
        assert blob.startswith(f"{other}/")

        cluster.restart(writer)
        cluster.wait_balanced(writer, up=True)
        served = beta_mailbox(cluster.node_port(writer, "pop3"))
        assert len(served) == 2 and served[0].endswith(body) and served[1].endswith(body2)
