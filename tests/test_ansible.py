# Tests of the Ansible deployment (ansible/): the playbook applied to this machine (connection
# local) into a throw-away prefix installs a hub that starts the way its systemd unit says, takes a
# mail over SMTP with STARTTLS and serves it over POP3S; a second node (another prefix on this
# machine) on the same PostgreSQL index (its password only in the nodes' 0600 password files), blob
# folder and hub key serves the mail the first took; a second run changes nothing, a third with a
# new password and certificate changes exactly those. (The role's static checks, ansible-lint and
# --syntax-check: tests/test_ansible_role.py, a file of its own so that another worker runs them.)
# The tests on the one deployment (the module fixture) are the steps of one scenario: they run in
# the order of this file also when the suite is shuffled (IN_FILE_ORDER, tests/conftest.py).
import getpass
import grp
import json
import os
import poplib
import re
import resource
import shlex
import shutil
import signal
import smtplib
import ssl
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import pytest
import yaml
from test_ansible_role import (
    ANSIBLE,
    BIN,
    DASHBOARD,
    MODULE_PYTHON,
    REPO,
    VAULT_PASSWORD,
    ansible_env,
    dashboard_metric_names,
)

from loadtest.ports import free_port
from mailhub.config import SCHEMA

from conftest import session_signing_key, wait_for
from gpgutil import Gpg, pgp_mime
from pgutil import PASSWORD_ROLE
from pop3util import make_cert

ROLE_FILES = ANSIBLE / "roles" / "mailhub" / "files"
IN_FILE_ORDER = True  # first deployment, reruns, rotation, upgrade from a checkout: in this order

EXAMPLE_VARS = ANSIBLE / "inventory" / "group_vars" / "mailhub" / "main.yml"
EXAMPLE_VAULT = ANSIBLE / "inventory" / "group_vars" / "mailhub" / "vault.yml"
EXAMPLE_CLUSTER = ANSIBLE / "inventory" / "group_vars" / "mailhub" / "cluster.yml"
EXAMPLE_INDEX_VAULT = ANSIBLE / "inventory" / "group_vars" / "all" / "vault.yml"
SITE_PASSWORDS = {"clinic-a": "clinic-a example password", "practice-b": "practice-b example password"}
INDEX_PASSWORD = "index example password"  # vault_mailhub_index_password of the example vault
# Metrics the dashboard may use before the hub exports them (issues 5, 7 and the relay, in progress).
PENDING_METRICS = {
    "mailhub_smtp_deferrals_total",
    "mailhub_site_deferrals_total",
    "mailhub_imap_served_bytes_total",
    "mailhub_imap_messages_served_total",
    "mailhub_site_drain_rate_bytes_per_second",
    "mailhub_site_drain_time_seconds",
    "mailhub_site_quota_usage_ratio",
    "mailhub_imap_sessions_total",
    "mailhub_outbound_queue_messages",
    "mailhub_outbound_queue_oldest_age_seconds",
}
_RECAP_RE = re.compile(r"^localhost\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


# ---- the playbook applied to this machine -------------------------------------------------------


def _certificate(folder: Path) -> tuple[Path, Path]:
    folder.mkdir()
    return make_cert(folder)


def _build_wheel(work: Path) -> Path:
    """A wheel of this checkout, built from a copy so that nothing is written into the repository."""
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", work / "dist", source],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (work / "dist").glob("dicom_mail_hub-*.whl")
    return wheel


class Deployment:
    """The example inventory's settings and vaults, applied to localhost under a throw-away prefix:
    two nodes ("localhost" and "node2", another prefix sharing the first one's installation) on one
    PostgreSQL index (a role that must give its password), one blob folder and one hub key."""

    def __init__(self, work: Path, postgres):
        self.work = work
        self.prefix = work / "root"
        self.prefix2 = work / "root2"
        self.database = f"ansible_{os.getpid()}"
        postgres.admin(f"CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD '{INDEX_PASSWORD}'")
        postgres.admin(f'CREATE DATABASE "{self.database}" OWNER {PASSWORD_ROLE}')
        self.index_url = f"postgresql://{PASSWORD_ROLE}@127.0.0.1:{postgres.port}/{self.database}"
        self.blobs = work / "shared-blobs"
        self.blobs.mkdir()
        self.env = ansible_env(work / "ansible-home")
        self.vault_password_file = work / "vault-password"
        self.vault_password_file.write_text(VAULT_PASSWORD + "\n")
        self.cert, self.key = _certificate(work / "tls")
        self.gpg = Gpg()  # practice-b's OpenPGP key, imported by the role from key_file
        self.gpg.new_key("practice-b@hub.example.net")
        sites = yaml.safe_load(EXAMPLE_VARS.read_text())["mailhub_sites"]
        for site in sites:  # only practice-b has a key here; clinic-a only sends
            site.pop("key_file")
            if site["name"] == "practice-b":
                site["key_file"] = str(self.gpg.export("practice-b@hub.example.net", work / "practice-b.asc"))
        self.ports = {name: free_port() for name in ("smtp", "pop3", "pop3s", "imap", "metrics")}
        self.ports2 = {name: free_port() for name in ("smtp", "pop3", "pop3s", "imap", "metrics")}
        self.inventory = work / "inventory.yml"
        local = {
            "ansible_connection": "local",
            "ansible_python_interpreter": str(MODULE_PYTHON),
            "ansible_become": False,
        }
        # what differs between the nodes is in the inventory (test_prefix, test_ports)
        host = local | self._node_vars(self.prefix, self.ports)
        node2 = (
            local | self._node_vars(self.prefix2, self.ports2) | {"mailhub_install_dir": str(self.path("/opt/mailhub"))}
        )
        self.inventory.write_text(
            yaml.safe_dump(
                {
                    "all": {
                        "children": {
                            "mailhub": {"hosts": {"localhost": host, "node2": node2}},
                            "mailhub_monitoring": {"hosts": {"localhost": host}},
                        }
                    }
                }
            )
        )
        self.vars = {
            "mailhub_root_dir": "{{ test_prefix }}",
            "mailhub_smtp_listen": "127.0.0.1:{{ test_ports.smtp }}",
            "mailhub_pop3_listen": "127.0.0.1:{{ test_ports.pop3 }}",
            "mailhub_pop3_pop3s_listen": "127.0.0.1:{{ test_ports.pop3s }}",
            "mailhub_imap_listen": "127.0.0.1:{{ test_ports.imap }}",
            "mailhub_metrics_listen": "127.0.0.1:{{ test_ports.metrics }}",
            "mailhub_service_log_file": "{{ test_prefix }}/var/log/mailhub/mailhub.log",
            "mailhub_create_user": False,
            "mailhub_user": getpass.getuser(),
            "mailhub_group": grp.getgrgid(os.getgid()).gr_name,
            "mailhub_manage_service": False,
            "mailhub_apply_kernel_tuning": False,
            "mailhub_system_packages": [],  # this machine has them; apt is not for a test
            "mailhub_wheel_source": str(_build_wheel(work)),
            # pip leaves the .py files of the hub and its dependencies uncompiled (imports compile
            # what they use): half the time of the first install, the longest task of the suite
            "mailhub_pip_extra_args": ["--no-compile"],
            "mailhub_tls_cert_source": str(self.cert),
            "mailhub_tls_key_source": str(self.key),
            "mailhub_metrics_health_min_free_bytes": 0,
            # the example's cluster.yml names the index, its password (vault) and the blob folder:
            # here this machine's test PostgreSQL, a folder, the session's hub key
            "mailhub_storage_index": self.index_url,
            "mailhub_storage_blobs": str(self.blobs),
            "mailhub_hub_key_source": str(session_signing_key()),
            "mailhub_service_environment": {"MAILHUB_SHUTDOWN_TIMEOUT": "5"},
            "mailhub_grafana_dashboards_dir": "{{ test_prefix }}/var/lib/grafana/dashboards",
            "mailhub_config_extra": {"smtp": {"max_recipients": 50}},
            "mailhub_hostname": None,  # left out of the file: the hub's default applies
            "mailhub_sites": sites,
        }

    @staticmethod
    def _node_vars(prefix: Path, ports: dict[str, int]) -> dict:
        """A node's own prefix and ports, which the extra vars below take (the example's group_vars,
        passed as extra vars too, would override host vars)."""
        return {"test_prefix": str(prefix), "test_ports": ports}

    def path(self, absolute: str, node: int = 1) -> Path:
        return (self.prefix if node == 1 else self.prefix2) / absolute.lstrip("/")

    @property
    def cli_env(self) -> dict:
        """The environment of a `mailhub` command run by hand on the first node (the unit's PGPASSFILE)."""
        return os.environ | {"PGPASSFILE": str(self.path("/etc/mailhub/pgpass"))}

    def play(self, *options: str, limit: str = "localhost", **overrides) -> tuple[int, int, str]:
        """Runs site.yml on `limit` (the first node unless said); returns ok and changed of the
        recap, and the output."""
        variables = self.work / "test-vars.json"
        variables.write_text(json.dumps(self.vars | overrides))
        result = subprocess.run(
            [
                BIN / "ansible-playbook",
                "-i",
                self.inventory,
                "--vault-password-file",
                self.vault_password_file,
                "-e",
                f"@{EXAMPLE_VARS}",
                "-e",
                f"@{EXAMPLE_VAULT}",
                "-e",
                f"@{EXAMPLE_CLUSTER}",
                "-e",
                f"@{EXAMPLE_INDEX_VAULT}",
                "-e",
                f"@{variables}",
                "--limit",
                limit,
                *options,
                "site.yml",
            ],
            cwd=ANSIBLE,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        output = result.stdout + result.stderr
        (self.work / "last-play.log").write_text(output)
        assert result.returncode == 0, output[-6000:]
        recap = re.search(_RECAP_RE.pattern.replace("localhost", re.escape(limit), 1), output, re.M)
        assert recap, output[-3000:]
        ok, changed, unreachable, failed = map(int, recap.groups())
        assert (unreachable, failed) == (0, 0), output[-3000:]
        return ok, changed, output


def _unit_service_section(unit: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    section = None
    for line in unit.read_text().splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == "Service" and "=" in line and not line.startswith("#"):
            name, _, value = line.partition("=")
            settings.setdefault(name, []).append(value)
    return settings


class UnitProcess:
    """Starts the hub as the rendered systemd unit would: ExecStartPre, then ExecStart with the
    unit's Environment=, WorkingDirectory=, LimitNOFILE= and StandardOutput=append: file."""

    def __init__(self, unit: Path):
        self.service = _unit_service_section(unit)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MAILHUB_")}
        for assignment in self.service.get("Environment", []):
            name, _, value = shlex.split(assignment)[0].partition("=")
            self.env[name] = value
        self.cwd = self.service["WorkingDirectory"][0]
        self.log_path = Path(self.service["StandardOutput"][0].removeprefix("append:"))
        self.proc = None

    def _limits(self) -> None:
        # LimitNOFILE= up to the hard limit this process has (a container may forbid raising it).
        limit = int(self.service["LimitNOFILE"][0])
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))

    def start(self, wait: float = 30.0) -> None:
        pre = subprocess.run(
            shlex.split(self.service["ExecStartPre"][0]),
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert pre.returncode == 0, pre.stderr
        mark = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                shlex.split(self.service["ExecStart"][0]),
                env=self.env,
                cwd=self.cwd,
                stdout=log,
                stderr=log,
                preexec_fn=self._limits,
            )

        def ready() -> bool:
            text = self.log_path.read_text()[mark:]
            assert self.proc.poll() is None or "hub ready" in text, (
                f"hub exited with {self.proc.returncode}:\n{text[-3000:]}"
            )
            return "hub ready" in text

        wait_for(
            ready,
            timeout=wait,
            interval=0.1,
            message=lambda: "'hub ready' in the log\n" + self.log_path.read_text()[-3000:],
        )

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, postgres_server):
    deployment = Deployment(tmp_path_factory.mktemp("ansible"), postgres_server)
    try:
        deployment.first = deployment.play()
        yield deployment
    finally:
        deployment.gpg.close()
        postgres_server.drop_database(deployment.database)
        postgres_server.admin(f"DROP ROLE IF EXISTS {PASSWORD_ROLE}")


def _metric_names(exposition: str) -> set[str]:
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    return names


def test_playbook_deploys_a_hub_that_takes_and_serves_mail(deployment):
    ok, changed, output = deployment.first
    assert changed > 5, output[-3000:]
    config_file = deployment.path("/etc/mailhub/mailhub.toml")
    config = tomllib.loads(config_file.read_text())
    for section, key in SCHEMA:
        if (section, key) != ("", "hostname"):
            assert key in (config.get(section, {}) if section else config), f"{section}.{key} not in the config file"
    assert "hostname" not in config and config["smtp"]["max_recipients"] == 50
    data_dir = deployment.path("/var/lib/mailhub")
    assert config["data_dir"] == str(data_dir) and not (data_dir / "spool").exists()  # the hub links it
    assert config["domain"] == ["hub.example.net"] and config["log"]["format"] == "json"
    assert Path(config["tls"]["cert_file"]).read_bytes() == deployment.cert.read_bytes()
    assert oct(Path(config["tls"]["key_file"]).stat().st_mode & 0o777) == "0o640"
    shown = subprocess.run(
        [
            deployment.path("/opt/mailhub/venv/bin/mailhub"),
            "site",
            "show",
            "clinic-a",
            "--json",
            "--config",
            config_file,
        ],
        env=deployment.cli_env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    keys = json.loads(
        subprocess.run(
            [
                deployment.path("/opt/mailhub/venv/bin/mailhub"),
                "site",
                "key",
                "show",
                "practice-b",
                "--json",
                "--config",
                config_file,
            ],
            env=deployment.cli_env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )["keys"]
    assert [k["state"] for k in keys] == ["current"]
    assert keys[0]["fingerprint"] == deployment.gpg.fingerprints("practice-b@hub.example.net")[0]
    limits = json.loads(shown)["limits"]
    assert limits["mailbox_bytes"] == {"limit": 200 * 1024**3, "source": "site", "used": 0}
    assert (limits["max_drain_time"]["limit"], limits["submitted_per_day"]["limit"]) == (3600, None)

    unit = deployment.path("/etc/systemd/system/mailhub.service")
    service = _unit_service_section(unit)
    for setting in (
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        f"ReadWritePaths={data_dir} {deployment.blobs}",
        "LimitNOFILE=65536",
        "CapabilityBoundingSet=",
    ):
        name, _, value = setting.partition("=")
        assert service.get(name) == [value], (setting, service.get(name))
    assert "AmbientCapabilities" not in service  # every port of this test is above 1023
    verify = subprocess.run(["systemd-analyze", "verify", unit], capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=30", unit],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert security.returncode == 0, security.stdout[-2000:]  # exposure 3.0 or less ("OK")
    sysctl = deployment.path("/etc/sysctl.d/60-mailhub.conf").read_text()
    assert "net.core.somaxconn = 4096" in sysctl and "net.ipv4.tcp_rmem = 4096 131072 67108864" in sysctl
    assert "copytruncate" in deployment.path("/etc/logrotate.d/mailhub").read_text()

    hub = UnitProcess(unit)
    hub.start()
    try:
        context = ssl.create_default_context(cafile=deployment.cert)
        encrypted = deployment.gpg.encrypt(b"DICM part 1 of 1", "practice-b@hub.example.net")
        message = pgp_mime(
            "clinic-a@hub.example.net",
            "practice-b@hub.example.net",
            encrypted,
            extra_headers="X-TELEMEDICINE-SETID: 1.2.3\r\n",
        )
        with smtplib.SMTP("127.0.0.1", deployment.ports["smtp"], timeout=30) as smtp:
            smtp.starttls(context=context)
            smtp.login("clinic-a", SITE_PASSWORDS["clinic-a"])
            smtp.sendmail("clinic-a@hub.example.net", ["practice-b@hub.example.net"], message)
        pop = poplib.POP3_SSL("127.0.0.1", deployment.ports["pop3s"], context=context, timeout=30)
        try:
            pop.user("practice-b")
            pop.pass_(SITE_PASSWORDS["practice-b"])
            assert pop.stat()[0] == 1
            lines = pop.retr(1)[1]
            assert b"X-TELEMEDICINE-SETID: 1.2.3" in lines and b"-----BEGIN PGP MESSAGE-----" in lines
            pop.dele(1)
        finally:
            pop.quit()
        url = f"http://127.0.0.1:{deployment.ports['metrics']}/metrics"
        exposition = urllib.request.urlopen(url, timeout=30).read().decode()
        # systemctl reload runs ExecReload: the running hub reads its configuration and certificate again
        assert hub.service["ExecReload"] == [hub.service["ExecStart"][0].replace(" serve ", " reload ", 1)]
        reload = subprocess.run(
            shlex.split(hub.service["ExecReload"][0]), env=hub.env, cwd=hub.cwd, capture_output=True, text=True
        )
        assert (reload.returncode, reload.stderr) == (0, ""), reload
        assert reload.stdout.startswith("reloaded: no live setting changed\nserving certificate "), reload.stdout
    finally:
        assert hub.stop() == 0
    exported = _metric_names(exposition)
    assert "mailhub_pop3_messages_served_total" in exported
    assert dashboard_metric_names() - exported - PENDING_METRICS - {"up"} == set()


def _send_to_practice_b(deployment, port: int, setid: str) -> None:
    context = ssl.create_default_context(cafile=deployment.cert)
    encrypted = deployment.gpg.encrypt(b"DICM part 1 of 1", "practice-b@hub.example.net")
    message = pgp_mime(
        "clinic-a@hub.example.net",
        "practice-b@hub.example.net",
        encrypted,
        extra_headers=f"X-TELEMEDICINE-SETID: {setid}\r\n",
    )
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.starttls(context=context)
        smtp.login("clinic-a", SITE_PASSWORDS["clinic-a"])
        smtp.sendmail("clinic-a@hub.example.net", ["practice-b@hub.example.net"], message)


def test_a_second_node_on_the_same_index_blobs_and_hub_key_serves_the_first_ones_mail(deployment):
    ok, changed, output = deployment.play("--tags", "mailhub_config,mailhub_service", limit="node2")
    assert changed >= 5, output[-4000:]  # folders, password file, hub key, config file, unit
    nodes = {"localhost": 1, "node2": 2}
    for name, node in nodes.items():
        config_text = deployment.path("/etc/mailhub/mailhub.toml", node).read_text()
        config = tomllib.loads(config_text)
        assert config["storage"]["index"] == deployment.index_url  # no password in it
        assert config["storage"]["blobs"] == str(deployment.blobs)
        assert config["node"]["name"] == config["metrics"]["node"] == name
        unit_text = deployment.path("/etc/systemd/system/mailhub.service", node).read_text()
        assert INDEX_PASSWORD not in config_text + unit_text
        passfile = deployment.path("/etc/mailhub/pgpass", node)
        service = _unit_service_section(deployment.path("/etc/systemd/system/mailhub.service", node))
        assert service["Environment"] == ['"MAILHUB_SHUTDOWN_TIMEOUT=5"', f'"PGPASSFILE={passfile}"']
        assert oct(passfile.stat().st_mode & 0o777) == "0o600"
        assert passfile.read_text().splitlines()[-1] == f"*:*:*:*:{INDEX_PASSWORD}"
        key = deployment.path("/var/lib/mailhub/hub-signing-key.asc", node)
        assert key.read_bytes() == session_signing_key().read_bytes()

    first = UnitProcess(deployment.path("/etc/systemd/system/mailhub.service"))
    second = UnitProcess(deployment.path("/etc/systemd/system/mailhub.service", 2))
    first.start()
    try:
        second.start()
        try:
            _send_to_practice_b(deployment, deployment.ports["smtp"], "1.2.4")  # to the first node
            context = ssl.create_default_context(cafile=deployment.cert)
            pop = poplib.POP3_SSL("127.0.0.1", deployment.ports2["pop3s"], context=context, timeout=30)
            try:  # from the second: the index and the blob folder are shared
                pop.user("practice-b")
                pop.pass_(SITE_PASSWORDS["practice-b"])
                assert pop.stat()[0] == 1
                lines = pop.retr(1)[1]
                assert b"X-TELEMEDICINE-SETID: 1.2.4" in lines and b"-----BEGIN PGP MESSAGE-----" in lines
                pop.dele(1)
            finally:
                pop.quit()
        finally:
            assert second.stop() == 0
    finally:
        assert first.stop() == 0
    assert (deployment.blobs / "localhost").is_dir() and (deployment.blobs / "node2").is_dir()


def test_second_run_changes_nothing_and_third_changes_only_what_changed(deployment):
    ok, changed, output = deployment.play()
    assert changed == 0, output[-4000:]
    new_cert, new_key = _certificate(deployment.work / "tls-rotated")
    vault = yaml.safe_load(
        subprocess.run(
            [BIN / "ansible-vault", "view", "--vault-password-file", deployment.vault_password_file, EXAMPLE_VAULT],
            env=deployment.env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    passwords = vault["vault_mailhub_site_passwords"] | {"practice-b": "a new password"}
    ok, changed, output = deployment.play(
        "--tags",
        "mailhub_tls,mailhub_sites",
        mailhub_tls_cert_source=str(new_cert),
        mailhub_tls_key_source=str(new_key),
        vault_mailhub_site_passwords=passwords,
    )
    assert changed == 2, output[-4000:]  # the certificate with its key (one task) and one password
    assert "RUNNING HANDLER [mailhub : Check the hub's configuration]" in output
    assert deployment.path("/etc/mailhub/tls/cert.pem").read_bytes() == new_cert.read_bytes()
    verify = subprocess.run(
        [
            deployment.path("/opt/mailhub/venv/bin/mailhub"),
            "site",
            "verify",
            "practice-b",
            "--password-stdin",
            "--config",
            deployment.path("/etc/mailhub/mailhub.toml"),
        ],
        env=deployment.cli_env,
        input="a new password\n",
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_listener_below_1024_gets_cap_net_bind_service_and_nothing_else(deployment):
    unit = deployment.path("/etc/systemd/system/mailhub.service")
    before = unit.read_text()
    ok, changed, output = deployment.play(
        "--check", "--diff", "--tags", "mailhub_service", mailhub_smtp_listen="127.0.0.1:25"
    )
    assert changed == 1, output[-4000:]  # check mode: the unit would change, nothing is written
    assert "+AmbientCapabilities=CAP_NET_BIND_SERVICE\n" in output.replace("\r", "")
    assert "-CapabilityBoundingSet=\n+CapabilityBoundingSet=CAP_NET_BIND_SERVICE\n" in output
    assert unit.read_text() == before


def test_install_from_a_git_checkout_over_the_wheel(deployment):
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    from_git = {"mailhub_install_from": "git", "mailhub_git_repo": str(REPO), "mailhub_git_version": head}
    ok, changed, output = deployment.play("--tags", "mailhub_install", **from_git)
    assert changed == 2, output[-4000:]  # the checkout, and pip installing it
    assert "RUNNING HANDLER [mailhub : Check the hub's configuration]" in output
    source = deployment.path("/opt/mailhub/src")
    assert (
        subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, check=True
        ).stdout.strip()
        == head
    )
    (origin,) = deployment.path("/opt/mailhub/venv/lib").glob(
        "python3*/site-packages/dicom_mail_hub-*.dist-info/direct_url.json"
    )
    assert json.loads(origin.read_text())["url"] == source.as_uri()
    ok, changed, output = deployment.play("--tags", "mailhub_install", **from_git)
    assert changed == 0, output[-4000:]


def test_monitoring_targets_and_dashboard(deployment, tmp_path):
    targets_file = deployment.path("/etc/prometheus/file_sd/mailhub.yml")
    targets = yaml.safe_load(targets_file.read_text())
    assert targets == [
        {
            "targets": [f"127.0.0.1:{deployment.ports['metrics']}"],
            "labels": {"hub": "localhost", "hub_role": "primary"},
        },
        {"targets": [f"127.0.0.1:{deployment.ports2['metrics']}"], "labels": {"hub": "node2", "hub_role": "primary"}},
    ]
    rules = deployment.path("/etc/prometheus/rules/mailhub-alerts.yml")
    assert rules.read_bytes() == (ROLE_FILES / "prometheus-alerts.yml").read_bytes()
    prometheus_config = tmp_path / "prometheus.yml"
    prometheus_config.write_text(
        yaml.safe_dump(
            {
                "rule_files": [str(rules.parent / "*.yml")],  # checked with the config
                "scrape_configs": [{"job_name": "mailhub", "file_sd_configs": [{"files": [str(targets_file)]}]}],
            }
        )
    )
    check = subprocess.run(["promtool", "check", "config", prometheus_config], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    installed = deployment.path("/var/lib/grafana/dashboards/mailhub.json")
    assert installed.read_bytes() == DASHBOARD.read_bytes()
