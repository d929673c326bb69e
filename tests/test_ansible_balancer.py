# The Ansible role mailhub_balancer (ansible/roles/mailhub_balancer): applied to this machine it
# writes an HAProxy configuration that `haproxy -c` accepts, with the two running hub nodes behind
# it (a stopped standby left out) and the PROXY protocol v2 to them; a real HAProxy started with
# that configuration takes the node that does not answer out, passes a gateway's mail to the other
# (an in-process hub), which sees the gateway's own address, and takes that node out while its
# /healthz answers 503 and back in when it answers 200 again.
import grp
import os
import pwd
import shutil
import smtplib
import subprocess
from pathlib import Path

import pytest
import yaml
from clusterutil import haproxy_states
from test_ansible_role import ANSIBLE, BIN, MODULE_PYTHON, ansible_env

from loadtest.ports import free_port

from conftest import ALPHA_BETA, PASSWORD, make_message, queue_id_from, wait_for

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
pytestmark = pytest.mark.skipif(
    not os.path.exists(HAPROXY), reason="needs Debian's haproxy (bench/install-debian-packages.sh)"
)
CLIENT = "127.0.0.2"  # the gateway, as HAProxy sees it (HAProxy itself connects from 127.0.0.1)


def apply_role(hub, work: Path) -> tuple[Path, dict[str, int]]:
    """The role applied to localhost as the balancer of group mailhub (the hub as node1, a second
    running node2 at an address where nothing listens, a stopped standby as node3); returns the
    configuration written and the balancer's ports."""
    binds = {name: free_port() for name in ("smtp", "pop3")}
    node = {
        "ansible_host": "127.0.0.1",
        "mailhub_balancer_node_ports": {
            "smtp": hub.smtp_port,
            "pop3": hub.ports["pop3"],
            "metrics": hub.ports["metrics"],
        },
    }
    second = {"ansible_host": "127.0.0.8"}  # a node that is down: nothing listens there
    standby = {"ansible_host": "127.0.0.9", "mailhub_service_state": "stopped"}
    local = {"ansible_connection": "local", "ansible_python_interpreter": str(MODULE_PYTHON)}
    inventory = work / "inventory.yml"
    inventory.write_text(
        yaml.safe_dump(
            {
                "all": {
                    "children": {
                        "mailhub": {"hosts": {"node1": node, "node2": second, "node3": standby}},
                        "mailhub_balancer": {"hosts": {"localhost": local}},
                    }
                }
            }
        )
    )
    config = work / "haproxy.cfg"
    extra = {
        "mailhub_balancer_packages": [],  # this machine has it; apt is not for a test
        "mailhub_balancer_manage_service": False,
        "mailhub_balancer_config_file": str(config),
        "mailhub_balancer_config_owner": os.getuid(),
        "mailhub_balancer_config_group": grp.getgrgid(os.getgid()).gr_name,
        "mailhub_balancer_protocols": [
            {"name": name, "bind": f"127.0.0.1:{port}", "port": 1} for name, port in binds.items()
        ],
        "mailhub_balancer_check_interval": 0.2,
        "mailhub_balancer_maxconn": 100,  # (HAProxy raises its file limit to twice this: more than a test may)
        "mailhub_balancer_stats_socket": str(work / "admin.sock"),
    }
    playbook = work / "balancer.yml"
    playbook.write_text(
        yaml.safe_dump(
            [{"name": "Balance", "hosts": "mailhub_balancer", "gather_facts": False, "roles": ["mailhub_balancer"]}]
        )
    )
    env = ansible_env(work / "ansible-home")
    env["PATH"] += ":/usr/sbin:/sbin"  # haproxy -c, the template's validation
    env["ANSIBLE_ROLES_PATH"] = str(ANSIBLE / "roles")
    run = subprocess.run(
        [BIN / "ansible-playbook", "-i", inventory, "-e", yaml.safe_dump(extra, default_flow_style=True), playbook],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return config, binds


def greets(port: int) -> bool:
    """Whether a new SMTP connection through the balancer gets the hub's greeting."""
    try:
        with smtplib.SMTP("127.0.0.1", port, source_address=(CLIENT, 0), timeout=5) as client:
            return client.noop()[0] == 250
    except (smtplib.SMTPServerDisconnected, ConnectionError, OSError):
        return False


def test_the_role_puts_haproxy_in_front_of_the_running_node(make_hub, tmp_path):
    settings = tmp_path / "hub.toml"
    settings.write_text("")
    hub = make_hub(sites=ALPHA_BETA, MAILHUB_PROXY_TRUSTED_BALANCERS="127.0.0.1/32")
    hub.config = settings
    hub.start()
    config, binds = apply_role(hub, tmp_path)
    text = config.read_text()
    assert f"server node1 127.0.0.1:{hub.smtp_port} check port {hub.ports['metrics']}" in text, text
    assert "server node2 127.0.0.8:1 check port 9425" in text  # the default check port
    assert "node3" not in text  # the stopped standby
    assert "option redispatch" in text
    assert "default-server send-proxy-v2 inter 200ms" in text and "option httpchk GET /healthz" in text

    haproxy = subprocess.Popen([HAPROXY, "-db", "-f", config], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # node2 is taken out (its checks fail), node1 in: every connection goes to node1 from now on
        admin = tmp_path / "admin.sock"
        wait_for(lambda: admin.exists(), 20, message="haproxy did not start")
        wait_for(
            lambda: (
                haproxy_states(admin)
                == {(name, node): state for name in binds for node, state in (("node1", "UP"), ("node2", "DOWN"))}
            ),
            20,
            message="haproxy did not take node2 out",
        )
        assert greets(binds["smtp"])
        # it faces the gateways: not as root, shut in its chroot (as Debian's own configuration has it)
        assert "user haproxy" in text and "chroot /var/lib/haproxy" in text, text
        if os.geteuid() == 0:
            status = Path(f"/proc/{haproxy.pid}/status").read_text()
            uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
            assert int(uid) == pwd.getpwnam("haproxy").pw_uid, status
            assert os.readlink(f"/proc/{haproxy.pid}/root") == "/var/lib/haproxy"
        with smtplib.SMTP("127.0.0.1", binds["smtp"], source_address=(CLIENT, 0), timeout=30) as client:
            client.ehlo("gateway.test")
            client.login("alpha", PASSWORD)
            client.mail("alpha@hub.test")
            assert client.rcpt("beta@hub.test")[0] == 250
            code, reply = client.data(make_message(1500))
        assert code == 250, reply
        assert hub.stored(queue_id_from(reply)).startswith(b"Received: from gateway.test ([127.0.0.2])")

        # /healthz 503 (a free-space floor no disk meets, live at a reload): the node is taken out
        settings.write_text(f"[metrics]\nhealth_min_free_bytes = {10**18}\n")
        assert hub.cli("reload", check=False).returncode == 0
        wait_for(lambda: not greets(binds["smtp"]), 20, message="haproxy kept the unhealthy node")
        settings.write_text("")
        assert hub.cli("reload", check=False).returncode == 0
        wait_for(lambda: greets(binds["smtp"]), 20, message="haproxy did not take the node back")
    finally:
        haproxy.terminate()
        try:
            haproxy.wait(10)
        except subprocess.TimeoutExpired:
            haproxy.kill()
            haproxy.wait()
        print(haproxy.stdout.read().decode(errors="replace")[-3000:])
        haproxy.stdout.close()
