# Two in-process hubs joined by their cluster links (storage/postgres/cluster.py) on a real
# PostgreSQL, as two nodes of a cluster (each its own SQLite index here: what is tested is the
# coordination, the shared index is tests/test_postgres_*'s): one POP3 session per mailbox across
# both, a session closed when its node's link is lost, the periodic work on the leader only and
# taken over when the leader stops.
import json
import poplib
import time
import urllib.error
import urllib.request

import psycopg
import pytest

from conftest import ALPHA, ALPHA_BETA, PASSWORD, wait_for


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
    wait_for(lambda: _running(a) == ["scrub"], message="node a leads")
    b.start()
    assert _running(b) == []  # not the leader: no scrub here

    session = _login(a)
    assert "[IN-USE]" in _refused(b)  # held on node a
    # `mailhub sessions` on a node: its own sessions, named by node
    listed = json.loads(a.cli("sessions", "--json").stdout)
    assert [(r["protocol"], r["site"], r["node"]) for r in listed] == [("pop3", "alpha", "node-a")]
    assert "(node node-a only: `mailhub sessions --all`" in a.cli("sessions").stdout
    wait_for(  # its refused one ended
        lambda: b.cli("sessions").stdout.strip() == "no open sessions on node node-b", message="node b's sessions ended"
    )
    session.quit()
    wait_for(lambda: _try(b), message="node b takes the mailbox once node a let go")

    # node b's session holds it; node b's link is lost: the session is closed, node a may serve
    held = _login(b)
    assert "[IN-USE]" in _refused(a)
    _terminate_link(pg_url, "node-b")
    with pytest.raises((poplib.error_proto, OSError, EOFError)):  # a NOOP fails once the session is closed
        wait_for(lambda: not held.noop(), 20, interval=0.05, message="node b's session closed with its link")
    held.close()
    wait_for(lambda: _try(a), message="node a takes the mailbox of the node whose link went")
    wait_for(lambda: "other nodes' changes may have been missed" in b.log_text(), message="node b catches up")

    # the link's state on /metrics (both hubs share this process's registry: the last one started)
    from mailhub.metrics import CLUSTER

    text = urllib.request.urlopen(f"http://127.0.0.1:{b.ports['metrics']}/metrics", timeout=30).read().decode()
    assert CLUSTER.link is b._hub.cluster
    assert "mailhub_cluster_link_up 1.0" in text and "mailhub_cluster_reconnects_total 1.0" in text
    assert "mailhub_cluster_leader 0.0" in text
    a.stop()  # the leader stops: node b takes the periodic work over
    wait_for(lambda: _running(b) == ["scrub"], timeout=30, message="node b leads")


def _try(hub) -> bool:
    try:
        _login(hub).quit()
        return True
    except poplib.error_proto:
        return False


def test_two_nodes_on_one_postgresql_index_serve_one_network(pg_index, make_hub, tmp_path):
    """The whole of issue 27 on two in-process nodes: one PostgreSQL index, one shared blob folder.
    A mail taken by node A wakes an IMAP IDLE session on node B (the index writer's NOTIFY), node B
    serves it over POP3 while node A says the mailbox is in use, and node A deletes it after."""
    import imaplib

    from conftest import ALPHA_BETA, make_message
    from pop3util import send

    url, reset = pg_index
    reset()
    root = tmp_path / "shared"
    root.mkdir()
    common = {"MAILHUB_STORAGE_INDEX": url, "MAILHUB_STORAGE_BLOBS": str(root)}
    a = make_hub(sites=ALPHA_BETA, MAILHUB_NODE_NAME="node-a", **common).start()
    b = make_hub(MAILHUB_NODE_NAME="node-b", **common).start()
    assert a._hub.cluster is not None and b._hub.cluster is not None
    with psycopg.connect(url) as conn:
        beta = conn.execute("SELECT id FROM sites WHERE name = 'beta'").fetchone()[0]
    ledger_a, ledger_b = a._hub._throttle.ledger, b._hub._throttle.ledger

    watcher = imaplib.IMAP4("127.0.0.1", b.ports["imap"], timeout=30)
    watcher.login("beta", PASSWORD)
    assert watcher.select("INBOX")[0] == "OK"
    watcher.send(b"I1 IDLE\r\n")
    assert watcher.readline() == b"+ idling\r\n"
    mail = make_message(3000, subject="across nodes")
    queue_id = send(a, ["beta@hub.test"], mail)
    delivered = time.monotonic()  # node A's 250 came after its commit
    assert watcher.readline() == b"* 1 EXISTS\r\n"
    pushed = time.monotonic() - delivered
    assert pushed < 5.0, pushed  # milliseconds when measured (docs/cluster.md); generous for a loaded machine
    assert ledger_a.held(beta)[1] == 1
    wait_for(lambda: ledger_b.held(beta)[1] == 1, message="node B's ledger counts node A's mail")
    flagger = imaplib.IMAP4("127.0.0.1", a.ports["imap"], timeout=30)  # flags stored on node A show on B
    flagger.login("beta", PASSWORD)
    assert flagger.select("INBOX")[0] == "OK"
    assert flagger.store("1", "+FLAGS", "(\\Flagged)")[0] == "OK"
    line = watcher.readline()
    assert line.startswith(b"* 1 FETCH (UID ") and line.endswith(b"FLAGS (\\Flagged))\r\n"), line
    flagger.logout()
    watcher.send(b"DONE\r\n")
    assert watcher.readline() == b"I1 OK IDLE terminated\r\n"
    watcher.logout()

    pop = poplib.POP3("127.0.0.1", b.ports["pop3"], timeout=30)
    pop.user("beta")
    pop.pass_(PASSWORD)
    assert (b"\r\n".join(pop.retr(1)[1]) + b"\r\n").endswith(mail)  # node A's blob, from the shared folder
    refused = poplib.POP3("127.0.0.1", a.ports["pop3"], timeout=30)
    refused.user("beta")
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        refused.pass_(PASSWORD)
    refused.close()
    # every node's sessions, asked through PostgreSQL from either node
    idle = imaplib.IMAP4("127.0.0.1", a.ports["imap"], timeout=30)
    idle.login("alpha", PASSWORD)
    answer = json.loads(a.cli("sessions", "--all", "--json").stdout)
    assert answer["nodes"] == ["node-a", "node-b"] and answer["no_answer"] == []
    assert sorted((r["node"], r["protocol"], r["site"]) for r in answer["sessions"]) == [
        ("node-a", "imap", "alpha"),
        ("node-b", "pop3", "beta"),
    ]
    table = b.cli("sessions", "--all").stdout.splitlines()
    assert table[0].split()[:3] == ["NODE", "PROTO", "SITE"] and len(table) == 3
    idle.logout()
    pop.quit()
    # node B's bytes sent count in node A's drain-rate input, as they were sent
    wait_for(lambda: ledger_a.downloaded(beta) >= len(mail), message="node A hears of node B's download")

    def take(hub):
        try:
            client = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=30)
            client.user("beta")
            client.pass_(PASSWORD)
            return client
        except poplib.error_proto:
            return None

    client = wait_for(lambda: take(a), message="node A takes the mailbox once node B let go")
    assert client.stat()[0] == 1
    client.dele(1)
    client.quit()
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM mailbox").fetchone()[0] == 0
    wait_for(lambda: ledger_b.held(beta) == (0, 0), message="node B's ledger hears of node A's deletion")
    # `mailhub trace` on node B reads the shared index: the mail node A took
    traced = json.loads(b.cli("trace", queue_id, "--json").stdout)
    assert [m["queue_id"] for m in traced["mails"]] == [queue_id]


def test_the_scrub_verifies_again_after_leadership_went_and_came_back(make_hub):
    """The scrub is the leader's: cancelled when the node stops leading, run again when it leads
    again, and that second run still reads every byte (a stop flag left set from the first run made
    it pass every mail unread)."""
    from test_verify_serving import flip_byte, send

    hub = make_hub(sites=ALPHA_BETA, MAILHUB_STORAGE_SCRUB_RATE="50M").start()
    (queue_id,) = send(hub, [5_000])
    wait_for(lambda: hub.log_text().count("scrub pass done") >= 1, message="a first pass")
    flip_byte(hub, queue_id)
    leader = hub._hub._leader_tasks
    hub._loop.call_soon_threadsafe(lambda: (leader.set_leader(False), leader.set_leader(True)))
    wait_for(
        lambda: hub.query("SELECT queue_id FROM damaged WHERE found_by = 'scrub'") == [(queue_id,)],
        timeout=30,
        message="the scrub's second run finds the changed byte",
    )
    assert "scrub stopped: this node is no longer the cluster's leader" in hub.log_text()


def test_two_nodes_come_back_after_a_postgresql_restart(pg_index, postgres_server, make_hub, tmp_path):
    """PostgreSQL restarts under two nodes: every link drops and comes back, one node leads again,
    the mailbox lock works across nodes again, and a mail taken by one node after the restart
    wakes an IMAP IDLE session on the other (LISTEN is on again)."""

    from conftest import ALPHA_BETA, make_message
    from pop3util import send

    url, reset = pg_index
    reset()
    root = tmp_path / "shared"
    root.mkdir()
    common = {"MAILHUB_STORAGE_INDEX": url, "MAILHUB_STORAGE_BLOBS": str(root)}
    a = make_hub(sites=ALPHA_BETA, MAILHUB_NODE_NAME="node-a", **common).start()
    b = make_hub(MAILHUB_NODE_NAME="node-b", **common).start()
    links = [a._hub.cluster, b._hub.cluster]
    wait_for(lambda: sum(link.is_leader() for link in links) == 1, message="one leader")

    postgres_server.restart()
    wait_for(lambda: all(link.reconnects >= 1 and link.connected for link in links), timeout=60, message="links back")
    wait_for(lambda: sum(link.is_leader() for link in links) == 1, timeout=30, message="one leader again")

    watcher = wait_for(lambda: _imap_or_none(b), timeout=30, message="node B serves IMAP again")
    assert watcher.select("INBOX")[0] == "OK"
    watcher.send(b"I1 IDLE\r\n")
    assert watcher.readline() == b"+ idling\r\n"
    send(a, ["beta@hub.test"], make_message(2000, subject="after the restart"))
    assert watcher.readline() == b"* 1 EXISTS\r\n"
    watcher.send(b"DONE\r\n")
    assert watcher.readline() == b"I1 OK IDLE terminated\r\n"
    watcher.logout()

    pop = poplib.POP3("127.0.0.1", a.ports["pop3"], timeout=30)
    pop.user("beta")
    pop.pass_(PASSWORD)
    refused = poplib.POP3("127.0.0.1", b.ports["pop3"], timeout=30)
    refused.user("beta")
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        refused.pass_(PASSWORD)
    refused.close()
    pop.quit()
    for hub in (a, b):  # one line each for the loss and the return, no traceback
        assert "Traceback" not in hub.log_text() and "cluster link to" in hub.log_text()


def _imap_or_none(hub):
    import imaplib

    try:
        client = imaplib.IMAP4("127.0.0.1", hub.ports["imap"], timeout=30)
        client.login("beta", PASSWORD)
        return client
    except (imaplib.IMAP4.error, OSError):
        return None


def test_two_nodes_relay_each_queued_recipient_once(pg_index, make_hub, tmp_path):
    """Both nodes' outbound schedulers poll one queue on PostgreSQL: every remote recipient, queued
    through either node, reaches the next hop exactly once (claims with FOR UPDATE SKIP LOCKED)."""
    import collections
    import smtplib

    from test_relay_outbound import CountingHop

    from conftest import ALPHA_BETA, make_message

    hop = CountingHop()
    url, reset = pg_index
    reset()
    root = tmp_path / "shared"
    root.mkdir()
    common = {
        "MAILHUB_STORAGE_INDEX": url,
        "MAILHUB_STORAGE_BLOBS": str(root),
        "MAILHUB_RELAY_ROUTES": f"count.test=127.0.0.1:{hop.port}",
    }
    try:
        a = make_hub(sites=ALPHA_BETA, MAILHUB_NODE_NAME="node-a", **common).start()
        b = make_hub(MAILHUB_NODE_NAME="node-b", **common).start()
        rcpts = [f"r{i}@count.test" for i in range(40)]
        for hub, part in ((a, rcpts[:20]), (b, rcpts[20:])):
            with smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=60) as client:
                client.login("alpha", PASSWORD)
                for i in range(0, 20, 2):
                    client.sendmail("alpha@hub.test", part[i : i + 2], make_message(1500, subject=f"mail {i}"))

        def queue_left() -> int:
            with psycopg.connect(url) as conn:
                return conn.execute("SELECT count(*) FROM outbound").fetchone()[0]

        wait_for(lambda: queue_left() == 0, timeout=60, message="the queue to empty")
        wait_for(lambda: hop.active == 0, timeout=30, message="the nodes' connections to end")
        delivered = collections.Counter(hop.accepted)
        assert sorted(delivered) == sorted(rcpts) and set(delivered.values()) == {1}
    finally:
        hop.shutdown()


class _Partition:
    """A TCP relay between a node's cluster link and PostgreSQL that can cut the network as a
    partition does: PostgreSQL's side is closed (the server ends the backend, its advisory locks are
    freed) while the node's side stays open and silent (the node notices only when a query of its
    own gets no answer)."""

    def __init__(self, port: int):
        import socket
        import threading

        self._upstream_port = port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._cut = threading.Event()
        self._sockets: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._cut.is_set():  # a new connection during the cut: left silent (as a partition does)
                self._sockets.append(client)
                continue
            server = socket.create_connection(("127.0.0.1", self._upstream_port))
            self._sockets += [client, server]
            threading.Thread(target=self._copy, args=(client, server), daemon=True).start()
            threading.Thread(target=self._copy, args=(server, client), daemon=True).start()

    def _copy(self, source, target) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                return
            if not data:
                return
            if not self._cut.is_set():
                try:
                    target.sendall(data)
                except OSError:
                    return

    def cut(self, server_sockets_port: int, node_side_too: bool = False) -> None:
        """PostgreSQL's side closed; the node's side left silent, or closed too (`node_side_too`:
        the node notices at once). New connections are refused until heal()."""
        import socket

        self._cut.set()
        for sock in self._sockets:
            try:
                if node_side_too or sock.getpeername()[1] == server_sockets_port:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # closed already

    def heal(self) -> None:
        self._cut.clear()

    def close(self) -> None:
        self._listener.close()
        for sock in self._sockets:
            sock.close()


def test_a_quit_after_an_unnoticed_loss_of_the_mailbox_lock_deletes_nothing(pg_url, postgres_server, make_hub):
    """A partition between a node and PostgreSQL: the server frees the node's mailbox lock and
    another node takes it, while the node has not noticed yet (its ping is seconds away). A QUIT
    of the node's session then must not delete: the lock is confirmed on the database first, and
    the silent link fails that (without the check the DELE was applied: '+OK ... (0 messages left)')."""
    from storage.postgres.cluster import MAILBOX_SPACE

    from conftest import make_message
    from pop3util import send

    partition = _Partition(postgres_server.port)
    try:
        dsn = psycopg.conninfo.make_conninfo(pg_url, host="127.0.0.1", port=partition.port)
        hub = make_hub(sites=ALPHA_BETA, MAILHUB_NODE_NAME="node-a")
        hub.hub_kwargs = {"cluster_url": dsn}
        hub.start()
        hub._hub.cluster.op_timeout = 1.0  # the check's wait on a silent link (10 s by default)
        hub._hub.cluster.connect_timeout = 1  # (its reconnections meet silence too)
        send(hub, ["beta@hub.test"], make_message(2000, subject="kept"))
        session = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=30)
        session.user("beta")
        session.pass_(PASSWORD)
        assert session.stat()[0] == 1
        session.dele(1)
        with psycopg.connect(pg_url, autocommit=True) as other:
            (site,) = other.execute(
                "SELECT objid::int FROM pg_locks WHERE locktype = 'advisory' AND classid = %s::bigint::oid"
                " AND objsubid = 2 AND granted",
                (MAILBOX_SPACE,),
            ).fetchone()
            partition.cut(postgres_server.port)
            wait_for(
                lambda: other.execute("SELECT pg_try_advisory_lock(%s, %s)", (MAILBOX_SPACE, site)).fetchone()[0],
                timeout=30,
                message="another node takes the mailbox lock the server freed",
            )
            asked = time.monotonic()
            with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\] some deleted messages not removed"):
                session.quit()
            # the query past op_timeout is ended at once: psycopg's cancel request would first wait
            # 5 s on the silent network, then 5 s more for the query (11 s when measured)
            assert time.monotonic() - asked < 8.0
            session.close()
        assert "mailbox lock lost, 1 deletion(s) not applied" in hub.log_text()
        assert hub.query("SELECT COUNT(*) FROM mailbox") == [(1,)]
        # the link's task lived on after the timeout (a TimeoutError's empty text once ended it)
        wait_for(lambda: "the mailbox locks of 1 site(s) are gone" in hub.log_text(), message="locks let go")
    finally:
        partition.close()


def _health(hub) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{hub.ports['metrics']}/healthz", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_healthz_says_503_while_the_cluster_link_is_down(pg_url, postgres_server, make_hub):
    """A balancer takes a node out while its cluster link is down (it refuses POP3 logins then) and
    in again once the link is back."""
    partition = _Partition(postgres_server.port)
    try:
        dsn = psycopg.conninfo.make_conninfo(pg_url, host="127.0.0.1", port=partition.port)
        hub = make_hub(sites=ALPHA, MAILHUB_NODE_NAME="node-a")
        hub.hub_kwargs = {"cluster_url": dsn}
        hub.start()
        hub._hub.cluster.backoff = (0.05, 0.2)
        hub._hub.cluster.connect_timeout = 1
        assert _health(hub) == (200, "ok\n")
        partition.cut(postgres_server.port, node_side_too=True)
        wait_for(lambda: _health(hub)[0] == 503, timeout=30, message="503 while the link is down")
        assert "cluster link to PostgreSQL down (reconnecting)" in _health(hub)[1]
        assert "mailbox lock unavailable, try again later" in _refused(hub)
        partition.heal()
        wait_for(lambda: _health(hub) == (200, "ok\n"), timeout=30, message="200 once the link is back")
        _login(hub).quit()
        hub.stop()  # before the relay goes
    finally:
        partition.close()


def test_sessions_kick_on_one_node_ends_the_sites_sessions_on_every_node(pg_index, make_hub, tmp_path):
    """`mailhub sessions --kick SITE` on a cluster asks every node through PostgreSQL: the nodes
    holding the site's sessions end them (each protocol's goodbye), the answer names node and session;
    another site's sessions stay; a site with none says so (exit 1)."""
    import imaplib

    from conftest import ALPHA_BETA

    url, reset = pg_index
    reset()
    root = tmp_path / "shared"
    root.mkdir()
    common = {"MAILHUB_STORAGE_INDEX": url, "MAILHUB_STORAGE_BLOBS": str(root)}
    a = make_hub(sites=ALPHA_BETA, MAILHUB_NODE_NAME="node-a", **common).start()
    b = make_hub(MAILHUB_NODE_NAME="node-b", **common).start()
    on_a = imaplib.IMAP4("127.0.0.1", a.ports["imap"], timeout=30)
    on_a.login("alpha", PASSWORD)
    on_b = _login(b)  # alpha's POP3 session, on the other node
    kept = imaplib.IMAP4("127.0.0.1", b.ports["imap"], timeout=30)
    kept.login("beta", PASSWORD)

    done = a.cli("sessions", "--kick", "ALPHA")  # from node a; node b's session too
    assert done.returncode == 0 and done.stderr == ""
    lines = done.stdout.splitlines()
    assert lines[0] == "ending 2 session(s) of site ALPHA on node(s) node-a, node-b:"
    assert sorted(line.split()[:3] for line in lines[2:]) == [
        ["node-a", "imap", "alpha"],
        ["node-b", "pop3", "alpha"],
    ]
    with pytest.raises((poplib.error_proto, OSError, EOFError)):
        on_b.stat()  # ended by node b (-ERR, then closed)
    assert on_a.readline().startswith(b"* BYE")
    wait_for(
        lambda: (
            [(r["node"], r["site"]) for r in json.loads(b.cli("sessions", "--all", "--json").stdout)["sessions"]]
            == [("node-b", "beta")]
        ),
        message="only beta's session is left",
    )
    again = json.loads(b.cli("sessions", "--kick", "alpha", "--json", check=False).stdout)
    assert again == {"site": "alpha", "ended": [], "nodes": ["node-a", "node-b"], "no_answer": []}
    none = b.cli("sessions", "--kick", "alpha", check=False)
    assert none.returncode == 1 and none.stdout.strip() == "site alpha has no open session on 2 node(s)"
    kept.logout()
    on_a.shutdown()
