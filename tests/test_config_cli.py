# Configuration (defaults, TOML file, MAILHUB_* environment, validation with a one-line error and
# exit status 2, the documented example file) and the `mailhub site` commands, alone and beside a
# running hub that must see their changes without a restart.
import ipaddress
import json
import re
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from mailhub import config
from relay.outbound.routes import Route
from storage.passwords import verify_password

from conftest import (
    PASSWORD,
    REPO,
    Hub,
    cli_in_process_is_the_same,
    hub_env,
    make_message,
    run_cli_in_process,
    wait_for,
)
from pop3util import make_cert

EXAMPLE = REPO / "mailhub" / "example.toml"


def clean_env(**overrides: str) -> dict:
    env = {k: v for k, v in hub_env(Path("unused")).items() if not k.startswith("MAILHUB_")}
    env.update(overrides)
    return env


def mailhub(
    *args: str, env: dict | None = None, stdin: str | None = None, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    """`mailhub ARGS` as a child process would run it: in this process where the outcome is the
    same (conftest.cli_in_process_is_the_same), else as `python -m mailhub.cli`."""
    env = env if env is not None else clean_env()
    if cwd in (None, REPO) and cli_in_process_is_the_same(args, env):
        return run_cli_in_process(args, stdin, env)
    return subprocess.run(
        [sys.executable, "-m", "mailhub.cli", *args],
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or REPO,
        timeout=timeout,
    )


def assert_config_error(result: subprocess.CompletedProcess, *names: str) -> str:
    """Exit status 2, nothing on stdout, exactly one line on stderr naming the key."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mailhub: config error: "), lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def pem_files(tmp_path_factory) -> tuple[Path, Path]:
    return make_cert(tmp_path_factory.mktemp("pem"))  # `mailhub check` loads them


# ---- configuration ---------------------------------------------------------------------------


def test_check_with_the_built_in_defaults(tmp_path):
    result = mailhub("check", cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "config ok (built-in defaults)\n", "")
    assert list(tmp_path.iterdir()) == []  # checking creates nothing
    cfg = config.load(None, environ={})
    assert (cfg.data_dir, cfg.domain, cfg.hostname, cfg.shutdown_timeout) == (
        Path("mailhub-data"),
        ("hub.test",),
        "hub.test",
        30,
    )
    assert (cfg.smtp.listen, cfg.pop3.listen, cfg.imap.listen, cfg.metrics.listen) == (
        ("127.0.0.1", 2525),
        ("127.0.0.1", 1110),
        ("127.0.0.1", 1143),
        ("127.0.0.1", 9425),
    )
    assert cfg.smtp.max_message_size == 2 * 1024**3
    assert (cfg.tls.cert_file, cfg.tls.key_file, cfg.auth.allow_plaintext) == (None, None, False)
    assert cfg.smtp.peer_networks == () and cfg.config_file is None


def samples(pem_files) -> dict[tuple[str, str], tuple[str, object]]:
    """(section, key) -> (environment text, parsed value), a non-default value for every key."""
    cert, key = pem_files
    net = ipaddress.ip_network
    return {
        ("", "data_dir"): ("/srv/mailhub", Path("/srv/mailhub")),
        ("", "domain"): ("Hub.Example, second.example", ("hub.example", "second.example")),
        ("", "hostname"): ("mx.hub.example", "mx.hub.example"),
        ("", "shutdown_timeout"): ("2.5", 2.5),
        ("smtp", "listen"): ("0.0.0.0:25", ("0.0.0.0", 25)),
        ("smtp", "max_message_size"): ("1000000", 1000000),
        ("smtp", "max_recipients"): ("5", 5),
        ("smtp", "postmaster_max_message_size"): ("64K", 64 * 1024),
        ("smtp", "postmaster_max_per_hour"): ("3", 3),
        ("smtp", "max_connections"): ("50", 50),
        ("smtp", "max_connections_per_ip"): ("7", 7),
        ("smtp", "max_unauthenticated"): ("21", 21),
        ("smtp", "max_unauthenticated_per_ip"): ("22", 22),
        ("smtp", "login_timeout"): ("23.5", 23.5),
        ("smtp", "limit_exempt_networks"): ("127.0.0.0/8, ::1/128", (net("127.0.0.0/8"), net("::1/128"))),
        ("smtp", "max_commands"): ("500", 500),
        ("smtp", "max_bad_commands"): ("3", 3),
        ("smtp", "max_line_length"): ("1000", 1000),
        ("smtp", "idle_timeout"): ("60", 60.0),
        ("smtp", "peer_networks"): ("10.0.0.0/8, 2001:db8::/32", (net("10.0.0.0/8"), net("2001:db8::/32"))),
        ("smtp", "memory_budget"): ("64M", 64 * 1024**2),
        ("pop3", "listen"): ("[::1]:110", ("::1", 110)),
        ("pop3", "pop3s_listen"): ("127.0.0.1:995", ("127.0.0.1", 995)),
        ("pop3", "max_connections"): ("9", 9),
        ("pop3", "max_connections_per_ip"): ("8", 8),
        ("pop3", "max_unauthenticated"): ("31", 31),
        ("pop3", "max_unauthenticated_per_ip"): ("32", 32),
        ("pop3", "login_timeout"): ("33.5", 33.5),
        ("pop3", "limit_exempt_networks"): ("127.0.0.0/8, ::1/128", (net("127.0.0.0/8"), net("::1/128"))),
        ("pop3", "idle_timeout"): ("700", 700.0),
        ("imap", "listen"): ("127.0.0.2:143", ("127.0.0.2", 143)),
        ("imap", "imaps_listen"): ("127.0.0.1:993", ("127.0.0.1", 993)),
        ("imap", "max_connections"): ("11", 11),
        ("imap", "max_connections_per_ip"): ("6", 6),
        ("imap", "max_unauthenticated"): ("41", 41),
        ("imap", "max_unauthenticated_per_ip"): ("42", 42),
        ("imap", "login_timeout"): ("43.5", 43.5),
        ("imap", "limit_exempt_networks"): ("127.0.0.0/8, ::1/128", (net("127.0.0.0/8"), net("::1/128"))),
        ("imap", "idle_timeout"): ("1900", 1900.0),
        ("quotas", "mailbox_bytes"): ("10G", 10 * 1024**3),
        ("quotas", "mailbox_messages"): ("5000", 5000),
        ("quotas", "max_message_size"): ("500M", 500 * 1024**2),
        ("quotas", "submitted_per_day"): ("100G", 100 * 1024**3),
        ("quotas", "submitted_per_month"): ("2T", 2 * 1024**4),
        ("quotas", "received_per_day"): ("1073741824", 1024**3),
        ("quotas", "received_per_month"): ("30G", 30 * 1024**3),
        ("quotas", "max_drain_time"): ("600", 600.0),
        ("quotas", "downlink"): ("2M", 2 * 1024**2),
        ("throttle", "drain_admission"): ("off", False),
        ("throttle", "floor_bytes"): ("4M", 4 * 1024**2),
        ("throttle", "set_overshoot"): ("0.5", 0.5),
        ("throttle", "min_retry"): ("30", 30.0),
        ("throttle", "offline_retry"): ("300", 300.0),
        ("throttle", "drain_window"): ("10", 10.0),
        ("throttle", "drain_tau"): ("20", 20.0),
        ("throttle", "offline_grace"): ("120", 120.0),
        ("throttle", "pacing"): ("false", False),
        ("throttle", "pacing_engage_at"): ("0.8", 0.8),
        ("throttle", "pacing_min_rate"): ("128K", 128 * 1024),
        ("throttle", "interval"): ("0.5", 0.5),
        ("metrics", "listen"): ("127.0.0.1:9100", ("127.0.0.1", 9100)),
        ("metrics", "health_min_free_bytes"): ("5000000", 5000000),
        ("metrics", "node"): ("hub-b", "hub-b"),
        ("tls", "cert_file"): (str(cert), cert),
        ("tls", "key_file"): (str(key), key),
        ("auth", "allow_plaintext"): ("yes", True),
        ("auth", "failure_delay"): ("0.25", 0.25),
        ("auth", "max_failure_delay"): ("20", 20.0),
        ("auth", "penalty_half_life"): ("120", 120.0),
        ("auth", "max_failures"): ("4", 4),
        ("auth", "failure_window"): ("600", 600.0),
        ("auth", "block_time"): ("60", 60.0),
        ("auth", "max_penalty_wait"): ("5", 5.0),
        ("auth", "hash_threads"): ("1", 1),
        ("auth", "max_queued_checks"): ("16", 16),
        ("events", "retention_days"): ("30", 30.0),
        ("events", "audit_retention_days"): ("3650", 3650.0),
        ("lifecycle", "retention_days"): ("7", 7.0),
        ("lifecycle", "warn_before_days"): ("1.5", 1.5),
        ("lifecycle", "check_interval"): ("60", 60.0),
        ("lifecycle", "quota_warning_levels"): ("95,70", (70, 95)),
        ("lifecycle", "operator_address"): ("ops@hub.test", "ops@hub.test"),
        ("lifecycle", "study_alert_hours"): ("12", 12.0),
        ("storage", "index"): (
            "postgresql://mailhub@db.test:5432/mailhub",
            "postgresql://mailhub@db.test:5432/mailhub",
        ),
        ("storage", "blobs"): ("/srv/shared-blobs", Path("/srv/shared-blobs")),
        ("node", "name"): ("node-a", "node-a"),
        ("storage", "release_freed_after"): ("0", 0.0),
        ("storage", "reserve_bytes"): ("1M", 1024 * 1024),
        ("storage", "min_free_bytes"): ("0", 0),
        ("storage", "scrub_rate"): ("1K", 1024),
        ("storage", "verify_while_serving"): ("true", True),
        ("storage", "cache_bytes"): ("1G", 1024**3),
        ("storage", "delete_orphan_objects"): ("true", True),
        ("log", "level"): ("debug", "debug"),
        ("log", "format"): ("json", "json"),
        ("log", "stall_threshold"): ("0.5", 0.5),
        ("directory", "address"): ("Participants", "participants"),
        ("directory", "notify_on_change"): ("off", False),
        ("directory", "update_delay"): ("2.5", 2.5),
        ("directory", "key_grace_days"): ("0.5", 0.5),
        ("directory", "min_request_interval"): ("0", 0.0),
        ("directory", "hub_key_grace_days"): ("2.5", 2.5),
        ("encryption", "required"): ("false", False),
        ("encryption", "allow_hidden_recipients"): ("true", True),
        ("relay", "enabled"): ("no", False),
        ("relay", "hostname"): ("relay.hub.example", "relay.hub.example"),
        ("relay", "routes"): (
            "other.example=127.0.0.1:2526, *=[::1]:25",
            (Route("other.example", "127.0.0.1", 2526), Route("*", "::1", 25)),
        ),
        ("relay", "max_active"): ("7", 7),
        ("relay", "connect_timeout"): ("3", 3.0),
        ("relay", "command_timeout"): ("4", 4.0),
        ("relay", "min_backoff"): ("1.5", 1.5),
        ("relay", "max_backoff"): ("60", 60.0),
        ("relay", "max_lifetime"): ("3600", 3600.0),
        ("relay", "delay_warning"): ("0", 0.0),
        ("liveness", "stale_after"): ("7200", 7200.0),
        ("liveness", "check_interval"): ("30", 30.0),
        ("liveness", "notify_sites"): ("yes", True),
        ("liveness", "notify_operator"): ("off", False),
        ("proxy", "trusted_balancers"): ("10.0.0.5/32, 2001:db8::5", (net("10.0.0.5/32"), net("2001:db8::5/128"))),
        ("proxy", "header_timeout"): ("2.5", 2.5),
        ("s3", "endpoint"): ("http://127.0.0.1:8333", "http://127.0.0.1:8333"),
        ("s3", "region"): ("eu-central-1", "eu-central-1"),
        ("s3", "addressing"): ("virtual", "virtual"),
        ("s3", "access_key"): ("AKIDEXAMPLE", "AKIDEXAMPLE"),
        ("s3", "secret_key"): ("a-secret-key", "a-secret-key"),
        ("s3", "secret_key_file"): (str(key), key),
        ("s3", "part_size"): ("16M", 16 * 1024 * 1024),
        ("s3", "timeout"): ("12.5", 12.5),
    }


def value_of(cfg, section: str, key: str):
    return getattr(getattr(cfg, section) if section else cfg, key)


def test_every_key_can_be_set_from_the_environment(pem_files):
    table = samples(pem_files)
    assert set(table) == set(config.SCHEMA), "keep this table in step with config.SCHEMA"
    environ = {config.env_name(s, k): text for (s, k), (text, _) in table.items()}
    for name in (
        "MAILHUB_DATA_DIR",
        "MAILHUB_DOMAIN",
        "MAILHUB_SMTP_LISTEN",
        "MAILHUB_POP3_LISTEN",
        "MAILHUB_IMAP_LISTEN",
        "MAILHUB_METRICS_LISTEN",
        "MAILHUB_SMTP_MAX_MESSAGE_SIZE",
        "MAILHUB_TLS_CERT_FILE",
        "MAILHUB_AUTH_ALLOW_PLAINTEXT",
        "MAILHUB_SHUTDOWN_TIMEOUT",
    ):
        assert name in environ, name
    cfg = config.load(None, environ=environ)
    for (section, key), (_, expected) in table.items():
        assert value_of(cfg, section, key) == expected, (section, key)


def toml_value(value) -> str:
    if isinstance(value, (bool,)):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if (
        isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)
    ):  # HOST:PORT
        host, port = value
        return json.dumps(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    if isinstance(value, tuple):  # lists are tuples in the Config
        return "[" + ", ".join(json.dumps(v if isinstance(v, int) else str(v)) for v in value) + "]"
    return json.dumps(str(value))


def test_a_file_with_every_section_and_the_environment_winning(tmp_path, pem_files):
    table = samples(pem_files)
    sections: dict[str, list[str]] = {}
    for (section, key), (_, value) in table.items():
        sections.setdefault(section, []).append(f"{key} = {toml_value(value)}")
    text = (
        "\n".join(sections.pop(""))
        + "\n"
        + "".join(f"\n[{section}]\n" + "\n".join(lines) + "\n" for section, lines in sections.items())
    )
    path = tmp_path / "hub.toml"
    path.write_text(text)
    assert {"smtp", "pop3", "imap", "metrics", "tls", "auth", "log"} <= set(tomllib.loads(text))
    cfg = config.load(path, environ={})
    for (section, key), (_, expected) in table.items():
        assert value_of(cfg, section, key) == expected, (section, key)
    assert cfg.config_file == path
    result = mailhub("check", "--config", str(path))
    assert (result.returncode, result.stdout) == (0, f"config ok ({path})\n"), result.stderr
    # the environment wins over the file
    cfg = config.load(
        path,
        environ={
            "MAILHUB_SMTP_LISTEN": "127.0.0.1:2626",
            "MAILHUB_DOMAIN": "a.test,b.test",
            "MAILHUB_LOG_LEVEL": "error",
        },
    )
    assert cfg.smtp.listen == ("127.0.0.1", 2626) and cfg.domain == ("a.test", "b.test")
    assert cfg.log.level == "error" and cfg.hostname == "mx.hub.example"


def test_serve_uses_the_config_file(tmp_path):
    data_dir = tmp_path / "data"
    path = tmp_path / "hub.toml"
    path.write_text(
        f'data_dir = "{data_dir}"\ndomain = ["example.org", "hub.test"]\n\n'
        '[smtp]\nlisten = "127.0.0.1:0"\nmax_message_size = 5000\n\n'
        '[pop3]\nlisten = "127.0.0.1:0"\n[imap]\nlisten = "127.0.0.1:0"\n'
        '[metrics]\nlisten = "127.0.0.1:0"\n'
    )
    env = clean_env()
    result = mailhub(
        "site",
        "add",
        "org",
        "--address",
        "org@example.org",
        "--password-stdin",
        "--config",
        str(path),
        env=env,
        stdin=PASSWORD + "\n",
    )
    assert result.returncode == 0, result.stderr
    hub = Hub(data_dir, env, config=path)
    hub.start()
    try:
        client = smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=10)
        code, features = client.ehlo("gw.test")
        assert features.splitlines()[0] == b"example.org"  # hostname defaults to the first domain
        assert client.esmtp_features["size"] == "5000"
        client.login("org", PASSWORD)
        assert client.sendmail("org@example.org", ["org@example.org"], make_message(1000)) == {}
        client.quit()
    finally:
        assert hub.stop() == 0
    assert len(hub.blob_files()) == 1


INVALID_ENVIRONMENTS = [
    ({"MAILHUB_SMTP_LISTEN": "nonsense"}, ["smtp.listen", "MAILHUB_SMTP_LISTEN"]),
    ({"MAILHUB_SMTP_LISTEN": "127.0.0.1:70000"}, ["smtp.listen"]),
    ({"MAILHUB_POP3_LISTEN": "localhost"}, ["pop3.listen", "MAILHUB_POP3_LISTEN"]),
    ({"MAILHUB_IMAP_LISTEN": "127.0.0.1:-1"}, ["imap.listen"]),
    ({"MAILHUB_METRICS_LISTEN": ":9100x"}, ["metrics.listen"]),
    ({"MAILHUB_SMTP_MAX_MESSAGE_SIZE": "-5"}, ["smtp.max_message_size", "-5"]),
    ({"MAILHUB_SMTP_MAX_MESSAGE_SIZE": "2G"}, ["smtp.max_message_size"]),
    ({"MAILHUB_SMTP_MAX_LINE_LENGTH": "100"}, ["smtp.max_line_length"]),
    ({"MAILHUB_SHUTDOWN_TIMEOUT": "0"}, ["shutdown_timeout"]),
    ({"MAILHUB_SHUTDOWN_TIMEOUT": "nan"}, ["shutdown_timeout"]),
    ({"MAILHUB_SMTP_IDLE_TIMEOUT": "nan"}, ["smtp.idle_timeout"]),
    ({"MAILHUB_DOMAIN": " , "}, ["domain", "MAILHUB_DOMAIN"]),
    ({"MAILHUB_SMTP_PEER_NETWORKS": "10.0.0.0/33"}, ["smtp.peer_networks"]),
    ({"MAILHUB_AUTH_ALLOW_PLAINTEXT": "maybe"}, ["auth.allow_plaintext"]),
    ({"MAILHUB_LOG_LEVEL": "loud"}, ["log.level"]),
    ({"MAILHUB_LOG_FORMAT": "xml"}, ["log.format"]),
    (
        {"MAILHUB_TLS_CERT_FILE": "/nonexistent/cert.pem", "MAILHUB_TLS_KEY_FILE": "/nonexistent/key.pem"},
        ["tls.cert_file", "/nonexistent/cert.pem"],
    ),
    ({"MAILHUB_TLS_CERT_FILE": str(REPO / "pyproject.toml")}, ["tls.cert_file", "key_file"]),
    ({"MAILHUB_POP3_POP3S_LISTEN": "127.0.0.1:995"}, ["pop3.pop3s_listen"]),
    ({"MAILHUB_IMAP_IMAPS_LISTEN": "127.0.0.1:993"}, ["imap.imaps_listen"]),
]


@pytest.mark.parametrize(
    "env,names",
    [
        pytest.param(env, names, id=",".join(f"{k.removeprefix('MAILHUB_')}={v}" for k, v in env.items()))
        for env, names in INVALID_ENVIRONMENTS
    ],
)
def test_invalid_environment_values(tmp_path, env, names):
    assert_config_error(mailhub("check", env=clean_env(**env), cwd=tmp_path), *names)


@pytest.mark.parametrize(
    "text,names",
    [
        ('[smtp]\nlisten = "127.0.0.1:2525"\nbogus = 1\n', ["smtp.bogus", "unknown key"]),
        ("bogus = 1\n", ["bogus", "unknown key"]),
        ("[bogus]\nkey = 1\n", ["bogus.key"]),
        ('[stmp]\n# listen = "127.0.0.1:25"\n', ["stmp"]),  # a misspelt section, all its keys commented out
        ('[smtp]\nmax_message_size = "big"\n', ["smtp.max_message_size"]),
        ("[smtp]\nmax_message_size = -1\n", ["smtp.max_message_size"]),
        ("[smtp]\nlisten = 2525\n", ["smtp.listen"]),
        ('[smtp]\npeer_networks = "not a net"\n', ["smtp.peer_networks"]),
        ("domain = []\n", ["domain"]),
        ('[auth]\nallow_plaintext = "perhaps"\n', ["auth.allow_plaintext"]),
        ('[tls]\ncert_file = "/nonexistent.pem"\nkey_file = "/nonexistent.key"\n', ["tls.cert_file"]),
        ("[smtp\nlisten = 1\n", ["invalid TOML"]),
        ("data_dir = 'a'\ndata_dir = 'b'\n", ["invalid TOML"]),
    ],
    ids=[
        "unknown-key",
        "unknown-top-key",
        "unknown-section",
        "unknown-empty-section",
        "string-size",
        "negative-size",
        "number-listen",
        "bad-network",
        "no-domain",
        "bad-bool",
        "missing-cert",
        "bad-toml",
        "duplicate-key",
    ],
)
def test_invalid_config_files(tmp_path, text, names):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    line = assert_config_error(mailhub("check", "--config", str(path)), *names)
    if "invalid TOML" in names:
        assert str(path) in line


def test_missing_config_file_and_serve_with_a_bad_config(tmp_path):
    line = assert_config_error(mailhub("check", "--config", str(tmp_path / "missing.toml")))
    assert "missing.toml" in line
    # serve validates before starting anything
    result = mailhub(
        "serve",
        env=clean_env(MAILHUB_DATA_DIR=str(tmp_path / "data"), MAILHUB_SMTP_LISTEN="127.0.0.1:99999"),
        timeout=20,
    )
    assert_config_error(result, "smtp.listen")
    assert not (tmp_path / "data").exists()


def test_serve_exits_when_its_port_is_taken(tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    env = hub_env(tmp_path / "data", MAILHUB_SMTP_LISTEN=f"127.0.0.1:{port}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailhub.cli", "serve"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the hub printed {err.splitlines()[-1:]} but did not exit") from None
    finally:
        holder.close()
    assert proc.returncode == 1
    assert err.splitlines()[-1].startswith("mailhub: cannot start: ") and str(port) in err
    assert "Traceback" not in err


def test_serve_with_an_empty_smtp_listen_neither_crashes_nor_hangs(tmp_path):
    # "" disables a listener (config._listen); for SMTP that must be refused cleanly or honoured.
    env = hub_env(tmp_path / "data", MAILHUB_SMTP_LISTEN="")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailhub.cli", "serve"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError("serve hangs and ignores SIGTERM:\n" + err[-2000:]) from None
        assert "hub ready" in err, err[-2000:]  # kept running: then it must have started properly
    assert "Traceback" not in err, err[-2000:]
    if "hub ready" not in err:
        assert proc.returncode == 2 and "smtp.listen" in err and len(err.splitlines()) == 1, err


def test_the_example_file_documents_every_key_and_loads(tmp_path):
    assert EXAMPLE.is_file(), f"{EXAMPLE} is missing (issue 2: an example file documenting every key)"
    text = EXAMPLE.read_text()
    document = tomllib.loads(text)
    section = ""
    documented: set[tuple[str, str]] = set()
    for line in text.splitlines():  # a key counts whether it is set or shown commented out
        stripped = line.strip()
        header = re.fullmatch(r"#?\s*\[(\w+)\]", stripped)
        key = re.fullmatch(r"#?\s*(\w+)\s*=.*", stripped)
        if header:
            section = header.group(1)
        elif key and (section, key.group(1)) in config.SCHEMA:
            documented.add((section, key.group(1)))
    missing = sorted(f"{s}.{k}" if s else k for s, k in set(config.SCHEMA) - documented)
    assert missing == [], f"keys not in the example file: {missing}"
    assert text.count("\n#") >= len({s for s, _ in config.SCHEMA}), "the example has hardly any comments"
    assert "MAILHUB_" in text  # it tells how to override keys from the environment
    # it loads cleanly, and the values it shows are the built-in defaults
    cfg = config.load(EXAMPLE, environ={})
    defaults = config.load(None, environ={})
    for section, key in config.SCHEMA:
        assert value_of(cfg, section, key) == value_of(defaults, section, key), (section, key)
    assert set(document) - {k for s, k in config.SCHEMA if not s} <= {s for s, _ in config.SCHEMA if s}
    result = mailhub("check", "--config", str(EXAMPLE), cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"config ok ({EXAMPLE})\n", "")


# ---- sites -----------------------------------------------------------------------------------


@pytest.fixture
def site_env(tmp_path) -> dict:
    return clean_env(MAILHUB_DATA_DIR=str(tmp_path / "data"), MAILHUB_DOMAIN="hub.test,second.test")


def site(env: dict, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return mailhub("site", *args, env=env, stdin=stdin)


def ok(result: subprocess.CompletedProcess) -> str:
    assert (result.returncode, result.stderr) == (0, ""), (result.returncode, result.stderr)
    return result.stdout


def failed(result: subprocess.CompletedProcess, message: str) -> None:
    assert (result.returncode, result.stdout, result.stderr) == (1, "", f"mailhub: {message}\n")


def test_site_round_trip_with_exact_outputs(site_env, tmp_path):
    assert ok(site(site_env, "list")) == "no sites\n"
    assert json.loads(ok(site(site_env, "list", "--json"))) == []
    assert (
        ok(site(site_env, "add", "alpha", "--address", "alpha@hub.test", "--password-stdin", stdin="alpha-password\n"))
        == "site alpha added with address(es) alpha@hub.test\n"
    )
    assert ok(
        site(
            site_env,
            "add",
            "beta.site",
            "--address",
            "beta@hub.test",
            "--address",
            "B2@second.test",
            "--password-stdin",
            stdin="beta-password\n",
        )
    ) == ("site beta.site added with address(es) B2@second.test, beta@hub.test\n")
    assert ok(site(site_env, "list")) == (
        "alpha                          0 mails        0 B  alpha@hub.test\n"
        "beta.site                      0 mails        0 B  B2@second.test, beta@hub.test\n"
    )
    shown = ok(site(site_env, "show", "beta.site"))
    assert re.fullmatch(
        r"site:      beta.site\naddresses: B2@second.test, beta@hub.test\n"
        r"created:   \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\n"
        r"mailbox:   0 mail\(s\), 0 B \(0 mail\(s\), 0 B not downloaded yet\)\n"
        r"limits:\n  mailbox_bytes        0 B of 50.0 GiB \(0.0%\)\n"
        r"  mailbox_messages     0 of 200000 \(0.0%\)\n  max_message_size     unlimited\n"
        r"(  (submitted|received)_per_(day|month) +0 B of unlimited\n){4}"
        r"  max_drain_time       1800 s\n  downlink             1.0 MiB/s assumed until measured\n"
        r"retention: 14 days unfetched, then expired\n"
        r"throttle:  no live state yet .*\n"
        r"downloads: never polled\n"
        r"activity:  last 60 min: downloaded 0 mail\(s\), 0 B \(0 B/s\)\n"
        r"liveness:  ok: 0 waiting \(0 B\); last login never; last fetch never\n"
        r"contact:   none\n",
        shown,
    ), shown
    as_json = json.loads(ok(site(site_env, "show", "beta.site", "--json")))
    created = as_json.pop("created_at")
    assert as_json.pop("activity") == {
        "window_seconds": 3600.0,
        "oldest_waiting_at": None,
        "downloaded_messages": 0,
        "downloaded_bytes": 0,
        "download_rate_bytes_per_second": 0.0,
        "refusals_as_sender": [],
        "refusals_as_recipient": [],
    }
    assert as_json.pop("liveness") == {
        "site": "beta.site",
        "contact": None,
        "waiting_messages": 0,
        "waiting_bytes": 0,
        "held_messages": 0,
        "held_bytes": 0,
        "oldest_waiting_at": None,
        "oldest_waiting_age_seconds": 0.0,
        "last_login_at": None,
        "last_fetch_at": None,
        "stale": False,
        "stale_since": None,
    }
    limits = as_json.pop("limits")
    assert limits["mailbox_bytes"] == {"limit": 50 * 1024**3, "source": "config", "used": 0}
    assert limits["max_drain_time"] == {"limit": 1800.0, "source": "config", "used": None}
    assert as_json == {
        "name": "beta.site",
        "addresses": ["B2@second.test", "beta@hub.test"],
        "mailbox_messages": 0,
        "mailbox_bytes": 0,
        "waiting_bytes": 0,
        "waiting_messages": 0,
        "throttle": None,
        "retention": {"days": 14.0, "source": "config"},
        "downloads": {
            "sessions": 0,
            "messages": 0,
            "bytes": 0,
            "send_seconds": 0,
            "first_poll_at": None,
            "last_poll_at": None,
        },
    }
    assert f"created:   {created}\n" in shown
    assert abs(time.mktime(time.strptime(created, "%Y-%m-%dT%H:%M:%SZ")) - time.mktime(time.gmtime())) < 120
    listed = json.loads(ok(site(site_env, "list", "--json")))
    assert [s["name"] for s in listed] == ["alpha", "beta.site"]
    assert ok(site(site_env, "passwd", "alpha", "--password-stdin", stdin="alpha-new-password\n")) == (
        "password of site alpha changed\n"
    )
    assert ok(site(site_env, "remove", "alpha")) == "site alpha removed (0 mail(s) in its mailbox dropped)\n"
    failed(site(site_env, "show", "alpha"), "no site named 'alpha'")
    assert (
        ok(site(site_env, "list"))
        == "beta.site                      0 mails        0 B  B2@second.test, beta@hub.test\n"
    )
    # the removed site's address is free again
    ok(site(site_env, "add", "gamma", "--address", "alpha@hub.test", "--password-stdin", stdin=PASSWORD + "\n"))


def test_site_command_errors(site_env):
    add = ("add", "alpha", "--address", "alpha@hub.test", "--password-stdin")
    ok(site(site_env, *add, stdin=PASSWORD + "\n"))
    failed(site(site_env, *add, stdin=PASSWORD + "\n"), "site 'alpha' exists already")
    failed(
        site(site_env, "add", "other", "--address", "alpha@hub.test", "--password-stdin", stdin=PASSWORD + "\n"),
        "address 'alpha@hub.test' belongs to site 'alpha'",
    )
    failed(
        site(site_env, "add", "other", "--address", "ALPHA@Hub.Test", "--password-stdin", stdin=PASSWORD + "\n"),
        "address 'ALPHA@Hub.Test' belongs to site 'alpha'",
    )
    failed(
        site(site_env, "add", "other", "--address", "x@else.org", "--password-stdin", stdin=PASSWORD + "\n"),
        "address 'x@else.org' is not in a local domain (hub.test, second.test)",
    )
    failed(
        site(site_env, "add", "other", "--address", "no-at-sign", "--password-stdin", stdin=PASSWORD + "\n"),
        "invalid address 'no-at-sign'",
    )
    failed(
        site(site_env, "add", "bad name", "--address", "b@hub.test", "--password-stdin", stdin=PASSWORD + "\n"),
        "invalid site name 'bad name': use letters, digits, '.', '_' or '-'",
    )
    failed(site(site_env, "add", "other", "--address", "o@hub.test", "--password-stdin", stdin="\n"), "empty password")
    failed(
        site(site_env, "add", "other", "--address", "o@hub.test"),
        "no password: use --password-stdin or run interactively",
    )
    for action in (("show", "ghost"), ("remove", "ghost"), ("passwd", "ghost", "--password-stdin")):
        failed(site(site_env, *action, stdin=PASSWORD + "\n"), "no site named 'ghost'")
    usage = site(site_env, "add", "other", "--password-stdin", stdin=PASSWORD + "\n")
    assert usage.returncode == 2 and "--address" in usage.stderr
    # nothing of the refused commands was stored
    assert [s["name"] for s in json.loads(ok(site(site_env, "list", "--json")))] == ["alpha"]


@pytest.mark.parametrize(
    "address", ["postmaster@hub.test", "PostMaster@second.test", "abuse@hub.test", "MAILER-DAEMON@hub.test"]
)
def test_reserved_local_parts_cannot_be_given_to_a_site(site_env, address):
    local = address.split("@")[0].lower()
    failed(
        site(site_env, "add", "other", "--address", address, "--password-stdin", stdin=PASSWORD + "\n"),
        f"address {address!r} is reserved: {local}@ of every local domain is the hub operator's"
        " (postmaster: RFC 5321, abuse: RFC 2142, mailer-daemon: the hub's bounces)",
    )
    assert json.loads(ok(site(site_env, "list", "--json"))) == []


def test_the_same_address_twice_in_one_add_gives_a_clear_message(site_env):
    result = site(
        site_env,
        "add",
        "dup",
        "--address",
        "d@hub.test",
        "--address",
        "D@hub.test",
        "--password-stdin",
        stdin=PASSWORD + "\n",
    )
    assert result.returncode == 1
    assert "d@hub.test" in result.stderr.lower() and "UNIQUE constraint" not in result.stderr, result.stderr
    assert json.loads(ok(site(site_env, "list", "--json"))) == []


def test_passwords_are_stored_only_as_salted_scrypt_hashes(site_env, tmp_path):
    password = "Corr3ct-Horse-Battery-Staple"
    ok(site(site_env, "add", "one", "--address", "one@hub.test", "--password-stdin", stdin=password + "\n"))
    ok(site(site_env, "add", "two", "--address", "two@hub.test", "--password-stdin", stdin=password + "\n"))
    ok(site(site_env, "passwd", "two", "--password-stdin", stdin=password + "2\n"))
    conn = sqlite3.connect(tmp_path / "data" / "index.sqlite3")
    hashes = dict(conn.execute("SELECT name, password_hash FROM sites"))
    conn.close()
    for _name, stored in hashes.items():
        assert re.fullmatch(r"scrypt\$16384\$8\$1\$[A-Za-z0-9+/=]{24}\$[A-Za-z0-9+/=]{44}", stored), stored
        assert password not in stored
    assert hashes["one"].split("$")[4] != hashes["two"].split("$")[4]  # salted
    assert verify_password(password, hashes["one"]) and not verify_password(password, hashes["two"])
    assert verify_password(password + "2", hashes["two"])
    for path in (tmp_path / "data").iterdir():  # index, WAL and shared memory files
        assert password.encode() not in path.read_bytes(), path


def test_passwords_shorter_than_12_characters_are_refused(site_env):
    too_short = "x" * 11
    refusal = "password too short: 11 characters, at least 12 (or let --generate-password make one)"
    add = ("add", "alpha", "--address", "alpha@hub.test", "--password-stdin")
    failed(site(site_env, *add, stdin=too_short + "\n"), refusal)
    assert json.loads(ok(site(site_env, "list", "--json"))) == []
    ok(site(site_env, *add, stdin="y" * 12 + "\n"))
    failed(site(site_env, "passwd", "alpha", "--password-stdin", stdin=too_short + "\n"), refusal)
    assert ok(site(site_env, "verify", "alpha", "--password-stdin", stdin="y" * 12 + "\n")).endswith("matches\n")
    # verify checks whatever it is given: a password set before the rule still verifies
    differs = site(site_env, "verify", "alpha", "--password-stdin", stdin="pw\n")
    assert (differs.returncode, differs.stderr) == (1, "")


def test_generate_password_sets_a_random_password_and_prints_it_once(site_env):
    added = ok(site(site_env, "add", "alpha", "--address", "alpha@hub.test", "--generate-password"))
    first_line, second_line = added.splitlines()
    assert first_line == "site alpha added with address(es) alpha@hub.test"
    password = second_line.removeprefix("generated password (shown only now): ")
    assert re.fullmatch(r"[A-Za-z0-9]{32}", password), second_line
    assert ok(site(site_env, "verify", "alpha", "--password-stdin", stdin=password + "\n")).endswith("matches\n")
    changed = ok(site(site_env, "passwd", "alpha", "--generate-password")).splitlines()
    assert changed[0] == "password of site alpha changed"
    new = changed[1].removeprefix("generated password (shown only now): ")
    assert re.fullmatch(r"[A-Za-z0-9]{32}", new) and new != password
    assert ok(site(site_env, "verify", "alpha", "--password-stdin", stdin=new + "\n")).endswith("matches\n")
    assert password not in ok(site(site_env, "show", "alpha")) + ok(site(site_env, "list", "--json"))
    both = site(site_env, "passwd", "alpha", "--generate-password", "--password-stdin", stdin=PASSWORD + "\n")
    assert both.returncode == 2 and "not allowed with argument --generate-password" in both.stderr


def test_check_loads_the_certificate_with_its_key(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    cert, key = make_cert(tmp_path / "one")
    _, other_key = make_cert(tmp_path / "two")
    env = clean_env(MAILHUB_TLS_CERT_FILE=str(cert), MAILHUB_TLS_KEY_FILE=str(key))
    assert mailhub("check", env=env).returncode == 0
    mismatch = mailhub("check", env=env | {"MAILHUB_TLS_KEY_FILE": str(other_key)})
    assert mismatch.returncode == 2 and mismatch.stdout == "", mismatch
    assert mismatch.stderr.startswith(f"mailhub: config error: tls.cert_file: cannot load {cert} with {other_key}")
    assert mismatch.stderr.count("\n") == 1, mismatch.stderr


def test_site_verify_tells_whether_a_password_matches(site_env):
    ok(site(site_env, "add", "alpha", "--address", "alpha@hub.test", "--password-stdin", stdin="first-password\n"))
    assert ok(site(site_env, "verify", "alpha", "--password-stdin", stdin="first-password\n")) == (
        "password of site alpha matches\n"
    )
    differs = site(site_env, "verify", "alpha", "--password-stdin", stdin="second-password\n")
    assert (differs.returncode, differs.stdout, differs.stderr) == (1, "password of site alpha differs\n", "")
    ok(site(site_env, "passwd", "alpha", "--password-stdin", stdin="second-password\n"))
    assert ok(site(site_env, "verify", "alpha", "--password-stdin", stdin="second-password\n")).endswith("matches\n")
    failed(site(site_env, "verify", "ghost", "--password-stdin", stdin=PASSWORD + "\n"), "no site named 'ghost'")


# ---- a running hub sees site changes without a restart -----------------------------------------


def rcpt_code(hub, address: str) -> int:
    client = smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=10)
    try:
        client.ehlo("gw.test")
        client.login("alpha", PASSWORD)
        client.mail("alpha@hub.test")
        return client.rcpt(address)[0]
    finally:
        client.close()


def login_code(hub, name: str, password: str) -> int:
    client = smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=10)
    try:
        client.ehlo("gw.test")
        try:
            return client.login(name, password)[0]
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code
    finally:
        client.close()


def test_a_running_hub_sees_site_changes_without_restart(hub):
    assert rcpt_code(hub, "gamma@hub.test") == 550
    hub.add_site("gamma", "gamma@hub.test", password="gamma-old-password")
    started = time.monotonic()
    wait_for(lambda: rcpt_code(hub, "gamma@hub.test") == 250, timeout=2.0, interval=0.1, message="added site seen")
    print(f"\nadded site seen after {time.monotonic() - started:.2f} s")
    client = smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=10)
    client.ehlo("gw.test")
    client.login("alpha", PASSWORD)
    assert client.sendmail("alpha@hub.test", ["gamma@hub.test"], make_message(4000)) == {}
    client.quit()
    wait_for(
        lambda: login_code(hub, "gamma", "gamma-old-password") == 235,
        timeout=2.0,
        interval=0.1,
        message="login of the added site",
    )

    assert hub.cli("site", "passwd", "gamma", "--password-stdin", stdin="gamma-new-password\n").stdout == (
        "password of site gamma changed\n"
    )
    wait_for(
        lambda: login_code(hub, "gamma", "gamma-old-password") == 535,
        timeout=2.0,
        interval=0.1,
        message="old password refused",
    )
    assert login_code(hub, "gamma", "gamma-new-password") == 235

    listed = hub.cli("site", "list").stdout.splitlines()
    assert [line.split()[:3] for line in listed] == [
        ["alpha", "0", "mails"],
        ["beta", "0", "mails"],
        ["gamma", "1", "mails"],
    ]
    assert hub.cli("site", "remove", "gamma").stdout == "site gamma removed (1 mail(s) in its mailbox dropped)\n"
    wait_for(
        lambda: rcpt_code(hub, "gamma@hub.test") == 550, timeout=2.0, interval=0.1, message="removed address refused"
    )
    assert login_code(hub, "gamma", "gamma-new-password") == 535
    assert hub.query("SELECT count(*) FROM messages") == [(0,)]
    # the orphaned blob is freed at the latest on the next start
    assert hub.stop() == 0
    hub.start()
    assert hub.blob_files() == []
    assert hub.query("SELECT count(*) FROM blob_trash") == [(0,)]
