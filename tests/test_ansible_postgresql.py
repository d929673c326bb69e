# The Ansible role mailhub_postgresql (ansible/roles/mailhub_postgresql) applied to this machine
# against the test session's PostgreSQL server (tests/pgutil.py: psql and createdb reach it through
# mailhub_postgresql_admin_environment; the package and the service are left alone): it writes the
# listen settings and one pg_hba.conf line per hub node, creates the hub's login role with the
# vault's password (set by its SCRAM-SHA-256 verifier; the server asks this role for its password)
# and the database owned by it; a second run with a new password changes only the password.
import getpass
import os
import subprocess
from pathlib import Path

import psycopg
import yaml
from test_ansible_role import ANSIBLE, BIN, MODULE_PYTHON, ansible_env

from pgutil import PASSWORD_ROLE


def _play(work: Path, extra: dict) -> str:
    inventory = work / "inventory.yml"
    local = {"ansible_connection": "local", "ansible_python_interpreter": str(MODULE_PYTHON), "ansible_become": False}
    inventory.write_text(
        yaml.safe_dump(
            {
                "all": {
                    "children": {
                        "mailhub": {
                            "hosts": {"hub1": {"ansible_host": "192.0.2.11"}, "hub2": {"ansible_host": "2001:db8::12"}}
                        },
                        "mailhub_postgresql": {"hosts": {"localhost": local}},
                    }
                }
            }
        )
    )
    playbook = work / "postgresql.yml"
    playbook.write_text(
        yaml.safe_dump(
            [{"name": "Index", "hosts": "mailhub_postgresql", "gather_facts": False, "roles": ["mailhub_postgresql"]}]
        )
    )
    env = ansible_env(work / "ansible-home") | {"ANSIBLE_ROLES_PATH": str(ANSIBLE / "roles")}
    variables = work / "vars.yml"
    variables.write_text(yaml.safe_dump(extra))
    run = subprocess.run(
        [BIN / "ansible-playbook", "-i", inventory, "-e", f"@{variables}", playbook],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "first password" not in run.stdout + run.stderr and "second password" not in run.stdout + run.stderr
    return run.stdout


def _changed(output: str) -> int:
    recap = [line for line in output.splitlines() if line.startswith("localhost ")][-1]
    return int(recap.split("changed=")[1].split()[0])


def _logs_in(server, password: str) -> bool:
    try:
        psycopg.connect(
            host="127.0.0.1", port=server.port, dbname="postgres", user=PASSWORD_ROLE, password=password
        ).close()
    except psycopg.OperationalError as exc:
        assert "password authentication failed" in str(exc)
        return False
    return True


def test_the_role_makes_the_hubs_role_and_database(postgres_server, tmp_path):
    conf = tmp_path / "conf"
    (conf / "conf.d").mkdir(parents=True)
    (conf / "pg_hba.conf").write_text("local all postgres peer\n")
    database = f"hubindex_{os.getpid()}"
    extra = {
        "mailhub_postgresql_packages": [],  # this machine has them; apt is not for a test
        "mailhub_postgresql_manage_service": False,
        "mailhub_postgresql_conf_dir": str(conf),
        "mailhub_postgresql_admin_user": getpass.getuser(),
        "mailhub_postgresql_admin_environment": {
            "PGHOST": "127.0.0.1",
            "PGPORT": str(postgres_server.port),
            "PGUSER": "mailhub",
        },
        "mailhub_postgresql_user": PASSWORD_ROLE,
        "mailhub_postgresql_database": database,
        "mailhub_postgresql_password": "first password",
        "mailhub_postgresql_port": 5433,
    }
    try:
        assert _changed(_play(tmp_path, extra)) == 4  # listen settings, pg_hba.conf, the role, the database
        settings = (conf / "conf.d" / "mailhub.conf").read_text()
        assert "\nlisten_addresses = '*'\nport = 5433\n" in settings and "\ntcp_keepalives_idle = 30\n" in settings
        hba = (conf / "pg_hba.conf").read_text()
        assert f"host {database} {PASSWORD_ROLE} 192.0.2.11/32 scram-sha-256\n" in hba
        assert f"host {database} {PASSWORD_ROLE} 2001:db8::12/128 scram-sha-256\n" in hba
        assert hba.startswith("local all postgres peer\n")
        assert _logs_in(postgres_server, "first password") and not _logs_in(postgres_server, "second password")
        with psycopg.connect(postgres_server.url()) as conn:
            owner = conn.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (database,))
            assert owner.fetchall() == [(PASSWORD_ROLE,)]

        # a second run with a new password changes that alone (kept verifiers: test_ansible_role.py)
        assert _changed(_play(tmp_path, extra | {"mailhub_postgresql_password": "second password"})) == 1
        assert _logs_in(postgres_server, "second password") and not _logs_in(postgres_server, "first password")
    finally:
        postgres_server.drop_database(database)
        postgres_server.admin(f"DROP ROLE IF EXISTS {PASSWORD_ROLE}")
