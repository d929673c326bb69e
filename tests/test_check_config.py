# `mailhub check` beyond a configuration that loads (certificate expired, not valid yet, expiring
# within 30 days, a key of another certificate; MAILHUB_* variables and file keys that are no
# setting, with the nearest one's name; a data folder that is not writable or nearly full) and
# `mailhub config show` (every key, its value and where it came from; secrets masked).
import json
import os
import subprocess
from pathlib import Path

import pytest

from mailhub.config import SCHEMA

from certutil import make_certificate
from conftest import run_cli_in_process


def mailhub(*args: str, **settings: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILHUB_")} | settings
    return run_cli_in_process(args, None, env)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """(cert, key) paths by name: valid for a year, expiring in 9 days, expired 20 days ago, valid
    only from the day after tomorrow."""
    folder = tmp_path_factory.mktemp("certs")
    periods = {"valid": (-1, 366), "expiring": (-1, 10), "expired": (-30, 10), "future": (2, 30)}
    made = {}
    for name, (start, days) in periods.items():
        cert, key = folder / f"{name}.pem", folder / f"{name}.key"
        make_certificate(cert, key, f"{name}.hub.test", valid_from_days=start, valid_days=days)
        made[name] = (str(cert), str(key))
    return made


@pytest.fixture
def data_dir(tmp_path) -> str:
    return str(tmp_path / "data")


@pytest.mark.parametrize(
    "name, code, message",
    [
        ("valid", 0, None),
        ("expiring", 0, "mailhub: warning: tls.cert_file: the certificate (CN=expiring.hub.test) expires in 9 day(s)"),
        ("expired", 2, "mailhub: config error: tls.cert_file: the certificate (CN=expired.hub.test) expired on "),
        ("future", 2, "mailhub: config error: tls.cert_file: the certificate is valid only from "),
    ],
)
def test_check_reads_the_certificate_period(certs, data_dir, name, code, message):
    cert, key = certs[name]
    result = mailhub("check", MAILHUB_TLS_CERT_FILE=cert, MAILHUB_TLS_KEY_FILE=key, MAILHUB_DATA_DIR=data_dir)
    assert result.returncode == code, result
    assert result.stdout == ("config ok (built-in defaults)\n" if code == 0 else "")
    if message is None:
        assert result.stderr == ""
    else:
        assert result.stderr.count("\n") == 1 and result.stderr.startswith(message), result.stderr
    if name == "expiring":
        assert result.stderr.rstrip().endswith("UTC; renew it, then: mailhub reload")


def test_check_refuses_a_key_of_another_certificate(certs, data_dir):
    cert, _ = certs["valid"]
    _, other = certs["expiring"]
    result = mailhub("check", MAILHUB_TLS_CERT_FILE=cert, MAILHUB_TLS_KEY_FILE=other, MAILHUB_DATA_DIR=data_dir)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"mailhub: config error: tls.cert_file: cannot load {cert} with {other}")


def test_unknown_variables_and_file_keys_are_named_with_the_nearest_setting(tmp_path, data_dir):
    result = mailhub("check", MAILHUB_DATA_DIR=data_dir, MAILHUB_SMTP_MAX_RECIPIENT="5", MAILHUB_COLOUR="blue")
    assert result.returncode == 0 and result.stdout == "config ok (built-in defaults)\n"
    assert result.stderr.splitlines() == [
        "mailhub: warning: MAILHUB_COLOUR: no such setting, ignored (docs/configuration.md lists the settings)",
        "mailhub: warning: MAILHUB_SMTP_MAX_RECIPIENT: no such setting, ignored; did you mean "
        "MAILHUB_SMTP_MAX_RECIPIENTS?",
    ]
    settings = tmp_path / "hub.toml"
    settings.write_text("[pop]\nidle_timeout = 600\n")
    result = mailhub("check", "--config", str(settings), MAILHUB_DATA_DIR=data_dir)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"mailhub: config error: pop.idle_timeout: unknown key; did you mean pop3.idle_timeout? (in {settings})\n"
    )


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MB tmpfs (needs root, as in CI), mounted read-only first; remount(rw) makes it writable."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mount_point)], check=True)

    def remount(mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(mount_point)], check=True)

    yield mount_point, remount
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_check_finds_an_unwritable_or_nearly_full_data_folder(tiny_disk):
    mount_point, remount = tiny_disk
    data = mount_point / "data"  # not made yet: what counts is the folder it would be made in
    result = mailhub("check", MAILHUB_DATA_DIR=str(data))
    assert (result.returncode, result.stdout) == (2, ""), result
    assert result.stderr.splitlines() == [
        f"mailhub: config error: data_dir: {mount_point}, where the data folder would be made, is not writable "
        f"by this user (uid {os.getuid()})",
        f"mailhub: warning: data_dir: only 1 MB free on the file system of {mount_point} (under 1024 MB: "
        "/healthz answers 503)",
    ]
    remount("rw")
    data.mkdir()
    result = mailhub("check", MAILHUB_DATA_DIR=str(data), MAILHUB_STORAGE_MIN_FREE_BYTES="2M")
    assert (result.returncode, result.stdout) == (0, "config ok (built-in defaults)\n"), result
    assert result.stderr == (
        f"mailhub: warning: data_dir: only 1 MB free on the file system of {data} (under 1024 MB: /healthz "
        "answers 503, new mail is refused)\n"
    )
    assert list(data.iterdir()) == []  # checking creates nothing


def test_config_show_gives_every_value_and_its_source_and_masks_secrets(tmp_path):
    secret = "s3cret-relay-password"
    settings = tmp_path / "hub.toml"
    settings.write_text(
        'domain = ["hub.test", "other.test"]\n[smtp]\nmax_recipients = 9\nlisten = "[::1]:2525"\n'
        '[[relay.routes]]\ndomain = "*"\nhost = "127.0.0.1"\ntls = "none"\n'
        f'auth_user = "hub"\nauth_password = "{secret}"\n'
    )
    env = {"MAILHUB_SMTP_IDLE_TIMEOUT": "120", "MAILHUB_QUOTAS_MAILBOX_BYTES": "2G"}
    text = mailhub("config", "show", "--config", str(settings), **env)
    assert text.returncode == 0 and text.stderr == "", text
    lines = {line.split()[0]: line.split(None, 1)[1] for line in text.stdout.splitlines()[1:]}
    assert len(lines) == len(SCHEMA)
    assert lines["smtp.max_recipients"].split() == ["9", "file", str(settings)]
    assert lines["smtp.listen"].split() == ['"[::1]:2525"', "file", str(settings)]
    assert lines["smtp.idle_timeout"].split() == ["120", "environment", "MAILHUB_SMTP_IDLE_TIMEOUT"]
    assert lines["quotas.mailbox_bytes"].split() == [str(2 * 1024**3), "environment", "MAILHUB_QUOTAS_MAILBOX_BYTES"]
    assert lines["smtp.max_line_length"].split() == ["2048", "default"]
    assert lines["pop3.pop3s_listen"].split() == ['""', "default"]
    assert lines["hostname"].split() == ['"hub.test"', "default"]
    assert secret not in text.stdout
    as_json = json.loads(mailhub("config", "show", "--json", "--config", str(settings), **env).stdout)
    assert [row["key"] for row in as_json] == [f"{s}.{k}" if s else k for s, k in SCHEMA]
    by_key = {row["key"]: row for row in as_json}
    assert by_key["domain"] == {"key": "domain", "value": ["hub.test", "other.test"], "source": f"file {settings}"}
    (route,) = by_key["relay.routes"]["value"]
    assert route["auth_user"] == "hub" and route["auth_password"] == "********" and route["port"] == 25
    assert by_key["smtp.peer_networks"] == {"key": "smtp.peer_networks", "value": [], "source": "default"}
    assert Path(by_key["data_dir"]["value"]) == Path("mailhub-data")


@pytest.mark.parametrize("address", ["postmaster@hub.test", "PostMaster@HUB.test", "postmaster"])
def test_check_warns_of_an_operator_address_that_is_postmaster_itself(data_dir, address):
    # postmaster@ goes to lifecycle.operator_address: naming postmaster there defers it for ever
    result = mailhub(
        "check", MAILHUB_DATA_DIR=data_dir, MAILHUB_DOMAIN="hub.test", MAILHUB_LIFECYCLE_OPERATOR_ADDRESS=address
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(f"mailhub: warning: lifecycle.operator_address: {address} is the postmaster")
    fine = mailhub(
        "check", MAILHUB_DATA_DIR=data_dir, MAILHUB_DOMAIN="hub.test", MAILHUB_LIFECYCLE_OPERATOR_ADDRESS="ops@hub.test"
    )
    assert fine.stderr == ""
