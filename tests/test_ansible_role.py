# Static tests of the Ansible role (ansible/): the role reaches every config key of the hub, its
# TOML writer reads back as written, ansible-lint and --syntax-check pass, the Grafana dashboard
# has its variable and panels, and the role mailhub_postgresql's SCRAM verifiers let the hub's role
# log in to a real PostgreSQL with the password (and only with it). The playbook applied to this
# machine: tests/test_ansible.py (a file of its own, the longest of the suite: these tests run
# beside it on another worker).
import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from mailhub.config import SCHEMA

REPO = Path(__file__).resolve().parent.parent
ANSIBLE = REPO / "ansible"
ROLE = ANSIBLE / "roles" / "mailhub"
BIN = Path(sys.executable).parent
VAULT_PASSWORD = "mailhub-example-vault"  # the example vault's documented password
DASHBOARD = ROLE / "files" / "grafana-dashboard.json"
# ansible_python_interpreter of the tests' runs: this venv's Python with a bytecode cache for the
# modules Ansible sends (tests/ansible_modules/sitecustomize.py), set up by ansible_env
MODULE_PYTHON = Path(__file__).resolve().parent / "ansible_modules" / "python"


def _filters(role: Path = ROLE, name: str = "mailhub_filters"):
    spec = importlib.util.spec_from_file_location(name, role / "filter_plugins" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _variable(section: str, key: str) -> str:
    return f"mailhub_{section}_{key}" if section else f"mailhub_{key}"


def ansible_env(home: Path) -> dict:
    """Ansible's own state (temp files, caches) under `home`; our venv's tools first on PATH; what
    MODULE_PYTHON needs (the session's bytecode folder, see tests/conftest.py, else one in `home`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "MAILHUB_"))}
    env.update(
        PATH=f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}",
        ANSIBLE_HOME=str(home),
        ANSIBLE_LOCAL_TEMP=str(home / "tmp"),
        ANSIBLE_REMOTE_TEMP=str(home / "tmp"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_RETRY_FILES_ENABLED="0",
        XDG_CACHE_HOME=str(home / "cache"),
        TEST_ANSIBLE_PYTHON=sys.executable,
        TEST_ANSIBALLZ_CACHE=os.environ.get("PYTHONPYCACHEPREFIX") or str(home / "cache"),
    )
    return env


def dashboard_metric_names() -> set[str]:
    """Metric names in the dashboard's PromQL: identifiers that are not functions, keywords,
    label names in by()/without() or matchers, range durations or template variables."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    names = set()
    for expr in exprs:
        stripped = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
        stripped = re.sub(r"\{[^}]*\}", "", stripped)  # label matchers
        stripped = re.sub(r"\[[^\]]*\]", "", stripped)  # ranges
        stripped = re.sub(r"\$\w+", "", stripped)  # template variables ($top in topk)
        stripped = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", stripped)
        for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*(?=\s*(\()?)", stripped):
            if match.group(1) is None and match.group(0) not in {"and", "or", "unless", "bool", "offset"}:
                names.add(match.group(0))
    return names


def test_role_reaches_every_config_key():
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    layout = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())["mailhub_config_settings"]
    missing = []
    for section, key in SCHEMA:
        entry = layout.get(section, {}).get(key) if section else layout.get(key)
        if _variable(section, key) not in defaults or entry != f"{{{{ {_variable(section, key)} }}}}":
            missing.append(f"{section}.{key}" if section else key)
    assert not missing, f"settings the role does not reach: {missing}; run scripts/ansible_role_settings.py"
    check = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "ansible_role_settings.py"), "--check"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout


def test_toml_filter_reads_back_as_written():
    filters = _filters()
    document = {
        "data_dir": "/var/lib/mail hub",
        "domain": ["a.test", "b.test"],
        "hostname": None,
        "shutdown_timeout": 2.5,
        "smtp": {"listen": "[::1]:25", "max_message_size": 2147483648, "peer_networks": []},
        "auth": {"allow_plaintext": False},
        "odd": {'quote"back\\slash': "tab\tnew\nline\x7f\x01 ünï", "emoji": "\U0001f600"},
        "relay": {
            "routes": [{"domain": "x.test", "host": "mx.x.test", "port": 25, "tls": None}],
            "nested": {"deep": True},
        },
        "empty": {"unset": None},
    }
    text = filters.to_toml(document)
    expected = json.loads(json.dumps(document))
    expected.pop("hostname")
    expected.pop("empty")
    del expected["relay"]["routes"][0]["tls"]
    assert tomllib.loads(text) == expected
    assert filters.limit_options({"mailbox_bytes": "10G", "max_drain_time": 600}) == [
        "--mailbox-bytes",
        "10G",
        "--max-drain-time",
        "600",
    ]
    before = {
        "mailbox_bytes": {"limit": 10737418240, "source": "site"},
        "max_drain_time": {"limit": 1800.0, "source": "config"},
        "downlink": {"limit": None, "source": "site"},
    }
    reply = "limits of site a set: mailbox_bytes=10737418240, max_drain_time=default, downlink=unlimited\n"
    assert not filters.limits_changed(before, reply)
    assert filters.limits_changed(before, reply.replace("=10737418240", "=1024"))
    assert filters.limits_changed(before, reply.replace("max_drain_time=default", "max_drain_time=1800.0"))
    assert filters.limits_changed(before, reply.replace("downlink=unlimited", "downlink=default"))
    assert filters.limits_changed({}, reply)
    assert filters.listen_ports(
        {
            "smtp": {"listen": "0.0.0.0:25"},
            "pop3": {"listen": "", "pop3s_listen": "[::]:995"},
            "metrics": {"listen": "127.0.0.1:9425"},
            "domain": "x",
        }
    ) == [25, 995, 9425]


def test_ansible_lint_and_syntax_check(tmp_path):
    password_file = tmp_path / "vault-password"
    password_file.write_text(VAULT_PASSWORD + "\n")
    env = ansible_env(tmp_path / "ansible-home") | {"ANSIBLE_VAULT_PASSWORD_FILE": str(password_file)}
    syntax = subprocess.run(
        [BIN / "ansible-playbook", "--syntax-check", "site.yml"],
        cwd=ANSIBLE,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert syntax.returncode == 0, syntax.stdout + syntax.stderr
    lint = subprocess.run(
        [BIN / "ansible-lint", "--nocolor"], cwd=ANSIBLE, env=env, capture_output=True, text=True, timeout=300
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "Profile 'production' was required, and it passed" in lint.stdout + lint.stderr
    assert not list(ANSIBLE.glob(".cache")), "ansible-lint left a cache in ansible/"


def test_dashboard_has_a_datasource_variable_and_the_issue_panels():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
    used = dashboard_metric_names()
    assert {
        "mailhub_smtp_received_bytes_total",
        "mailhub_mailbox_bytes",
        "mailhub_site_drain_time_seconds",
        "mailhub_smtp_deferrals_total",
        "mailhub_smtp_ingest_duration_seconds_bucket",
        "mailhub_disk_free_bytes",
    } <= used
    assert all(name == "up" or name.startswith(("mailhub_", "process_")) for name in used), used
    check = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "grafana_dashboard.py"), "--check"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr


def test_the_example_inventory_as_shipped_stops_first_naming_the_files_to_provide(tmp_path):
    """The shipped inventory, its vault and site.yml on this machine (check mode, local connection):
    the role's first tasks pass, then it stops before touching the host and names every file the
    example expects on the controller (the wheel is looked for in a folder of its own here)."""
    password_file = tmp_path / "vault-password"
    password_file.write_text(VAULT_PASSWORD + "\n")
    env = ansible_env(tmp_path / "ansible-home") | {"ANSIBLE_VAULT_PASSWORD_FILE": str(password_file)}
    wheel = tmp_path / "dist" / "dicom_mail_hub-0.1.0-py3-none-any.whl"
    run = subprocess.run(
        [BIN / "ansible-playbook", "site.yml", "--check", "--limit", "hub1.example.net"]
        + ["-e", "ansible_connection=local", "-e", f"ansible_python_interpreter={MODULE_PYTHON}"]
        + ["-e", f"mailhub_wheel_source={wheel}"],
        cwd=ANSIBLE,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 2 and "ok=1 " in output and "changed=0 " in output, output[-3000:]
    missing = re.search(r'"msg": "missing on the controller: (.*?)\. Build the wheel', output)
    assert missing, output[-3000:]
    assert set(missing.group(1).split(", ")) == {
        str(wheel),
        str(ANSIBLE / "files" / "tls" / "hub1.example.net.crt"),
        str(ANSIBLE / "files" / "tls" / "hub1.example.net.key"),
        str(ANSIBLE / "files" / "site-keys" / "clinic-a.asc"),
        str(ANSIBLE / "files" / "site-keys" / "practice-b.asc"),
        str(ANSIBLE / "files" / "hub-signing-key.asc"),  # the nodes' one hub key (two nodes, one index)
    }, missing.group(1)
    assert 'docs/ansible.md, "Before the first run"' in output


def test_postgresql_role_sets_the_password_by_a_verifier_the_server_accepts(postgres_server):
    import psycopg

    from pgutil import PASSWORD_ROLE  # pg_hba: this role must give its password (scram-sha-256)

    scram = _filters(ANSIBLE / "roles" / "mailhub_postgresql", "mailhub_postgresql_filters").scram_verifier

    def login(password: str) -> psycopg.Connection:
        return psycopg.connect(
            host="127.0.0.1", port=postgres_server.port, dbname="postgres", user=PASSWORD_ROLE, password=password
        )

    postgres_server.admin(f"CREATE ROLE {PASSWORD_ROLE} LOGIN")
    try:
        # ASCII with pgpass's and SQL's special characters; non-ASCII with a no-break space (SASLprep)
        for password in ("an ascii pass:word\\ with ' quote", "p\u00e4ssw\u00f6rd\u00a0mit Leerzeichen"):
            verifier = scram(password)
            assert verifier.startswith("SCRAM-SHA-256$4096:") and password not in verifier
            assert scram(password, verifier) == verifier  # kept while the password matches: no change
            assert scram(password + "x", verifier) != verifier
            assert scram(password) != verifier  # a new salt each time
            postgres_server.admin(f"ALTER ROLE {PASSWORD_ROLE} PASSWORD '{verifier}'")
            with login(password) as conn:
                assert conn.execute("SELECT current_user").fetchone() == (PASSWORD_ROLE,)
            try:
                login(password + "x").close()
            except psycopg.OperationalError as exc:
                assert "password authentication failed" in str(exc)
            else:
                raise AssertionError("a wrong password was let in")
    finally:
        postgres_server.admin(f"DROP ROLE {PASSWORD_ROLE}")


def test_blob_backends_give_the_unit_its_writable_paths(tmp_path):
    """storage.blobs as a shared folder is checked and made writable for the unit; as an object store
    ("s3://...") it is neither (the mail's cache stays in the data folder), and the play asks for the
    store's endpoint instead of stopping at a folder check."""
    playbook = tmp_path / "render.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "hosts": "localhost",
                    "gather_facts": False,
                    "vars_files": [str(ROLE / "defaults" / "main.yml"), str(ROLE / "vars" / "main.yml")],
                    "tasks": [
                        {
                            "ansible.builtin.copy": {
                                "content": "{{ lookup('ansible.builtin.template', '"
                                + str(ROLE / "templates" / "mailhub.service.j2")
                                + "') }}\nshared={{ mailhub_shared_blob_folder }}\n",
                                "dest": "{{ out }}",
                                "mode": "0600",
                            }
                        }
                    ],
                }
            ]
        )
    )
    env = ansible_env(tmp_path / "ansible-home") | {"ANSIBLE_FILTER_PLUGINS": str(ROLE / "filter_plugins")}
    seen = {}
    for blobs in ("", "/srv/mailhub-blobs", "s3://mailhub-mail/site-a"):
        out = tmp_path / f"unit-{len(seen)}"
        extra = {
            "out": str(out),
            "mailhub_storage_blobs": blobs,
            "mailhub_data_dir": "/var/lib/mailhub",
            "ansible_python_interpreter": str(MODULE_PYTHON),
        }
        run = subprocess.run(
            [BIN / "ansible-playbook", "-i", "localhost,", "-c", "local", str(playbook), "-e", json.dumps(extra)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        text = out.read_text()
        seen[blobs] = (re.search(r"^ReadWritePaths=(.*)$", text, re.MULTILINE).group(1), text.rsplit("shared=", 1)[1])
    assert seen[""] == ("/var/lib/mailhub", "\n")
    assert seen["/srv/mailhub-blobs"] == ("/var/lib/mailhub /srv/mailhub-blobs", "/srv/mailhub-blobs\n")
    assert seen["s3://mailhub-mail/site-a"] == ("/var/lib/mailhub", "\n")
    tasks = yaml.safe_load((ROLE / "tasks" / "config.yml").read_text())
    folder_checks = [t for t in tasks if "shared blob folder" in t["name"]]
    assert [t["when"] for t in folder_checks] == ["mailhub_shared_blob_folder | length > 0"] * 2
    (endpoint_check,) = [t for t in tasks if "object store" in t["name"]]
    assert "startswith('s3://')" in endpoint_check["when"]


def test_the_module_python_caches_ansiballz_bytecode_and_keeps_it_from_the_modules_children(tmp_path):
    """MODULE_PYTHON runs Ansible's modules as sent: a command module's child sees neither its
    PYTHONPATH nor its cache setting, and the second run reads the bytecode the first compiled."""
    env = ansible_env(tmp_path / "ansible-home") | {"TEST_ANSIBALLZ_CACHE": str(tmp_path / "bytecode")}
    command = [BIN / "ansible", "localhost", "-c", "local", "-e", f"ansible_python_interpreter={MODULE_PYTHON}"]
    run = subprocess.run(
        [*command, "-m", "ansible.builtin.command", "-a", "env"], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and "CHANGED" in run.stdout, run.stdout + run.stderr
    assert "TEST_ANSIBLE_PYTHON=" in run.stdout  # the child's environment is in the output
    assert "PYTHONPATH=" not in run.stdout and "TEST_ANSIBALLZ_CACHE=" not in run.stdout
    cached = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "bytecode" / "ansiballz").iterdir()}
    assert len(cached) > 10  # the module and the module_utils it imports
    run = subprocess.run([*command, "-m", "ansible.builtin.ping"], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and '"ping": "pong"' in run.stdout, run.stdout + run.stderr
    again = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "bytecode" / "ansiballz").iterdir()}
    assert {name: again[name] for name in cached} == cached  # read, not compiled again
    assert len(again) > len(cached)  # ping itself is new
