# The command-line entry points of `mailhub` and `mailhub-loadtest`, run as real processes: `--version`
# prints the installed package's version; output to a pipe whose reader has gone (`| head -1`) ends
# the command quietly (status 141, nothing on standard error), whatever the command, with standard
# output buffered or not; what the quick start creates (a served data folder with sites and a mail)
# is private, whatever the umask the commands were started with.
import importlib.metadata
import os
import smtplib
import stat
import subprocess
import sys

import pytest

from conftest import PASSWORD, REPO, hub_env, make_message, wait_for

TOOLS = {"mailhub": "mailhub.cli", "mailhub-loadtest": "loadtest.cli"}


def run(module: str, *args: str, stdin=subprocess.DEVNULL, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, stdin=stdin, timeout=60, **kwargs)


@pytest.mark.parametrize("tool", TOOLS)
def test_version_prints_the_package_version(tool):
    result = run(TOOLS[tool], "--version", capture_output=True, text=True)
    expected = importlib.metadata.version("dicom-mail-hub")
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{tool} {expected}\n", "")


CLOSED_PIPE_COMMANDS = [
    ("mailhub", "site", "list"),
    ("mailhub", "site", "list", "--json"),
    ("mailhub", "site", "show", "alpha"),
    ("mailhub", "stats"),
    ("mailhub", "queue", "list"),
    ("mailhub", "--help"),
    ("mailhub", "--version"),
    ("mailhub-loadtest", "--help"),
    ("mailhub-loadtest", "--version"),
]


@pytest.fixture(scope="module")
def site_env(tmp_path_factory) -> dict:
    env = hub_env(tmp_path_factory.mktemp("pipe") / "data")
    added = run(
        "mailhub.cli",
        *("site", "add", "alpha", "--address", "alpha@hub.test", "--password-stdin"),
        env=env,
        input=PASSWORD + "\n",
        stdin=None,
        capture_output=True,
        text=True,
    )
    assert added.returncode == 0, added.stderr
    return env


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize("command", CLOSED_PIPE_COMMANDS, ids=" ".join)
def test_output_to_a_closed_pipe_ends_quietly(command, buffered, site_env):
    env = {k: v for k, v in site_env.items() if k != "PYTHONUNBUFFERED"} | (
        {} if buffered else {"PYTHONUNBUFFERED": "1"}
    )
    reader, writer = os.pipe()
    os.close(reader)  # the reader is gone before the command writes a byte, as `| head -1` after a line
    try:
        result = run(TOOLS[command[0]], *command[1:], env=env, stdout=writer, stderr=subprocess.PIPE)
    finally:
        os.close(writer)
    assert result.stderr.decode() == ""
    if command[1].startswith("--") and not buffered:
        assert result.returncode == 0  # argparse drops the write error of its own --help and --version
    else:
        assert result.returncode == 141


def test_the_quick_start_leaves_a_private_data_folder(make_hub):
    saved = os.umask(0o022)  # a common login umask: without the hub's own, files 0644, folders 0755
    try:
        hub = make_hub(process=True, own_key=True)
        # `mailhub site add` makes the folder and the index, `mailhub serve` its key, lock and the
        # rest (the sites are added first: a running hub sees new sites only at its next look)
        hub.add_site("clinic-a")
        hub.add_site("practice-b")
        hub.start()
        with smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30) as smtp:
            smtp.login("clinic-a", PASSWORD)
            smtp.sendmail("clinic-a@hub.test", ["practice-b@hub.test"], make_message())
        wait_for(lambda: hub.blob_files(), message="the mail's blob")
        hub.stop()
    finally:
        os.umask(saved)
    modes = {
        str(path.relative_to(hub.data_dir)): oct(stat.S_IMODE(path.lstat().st_mode))
        for path in [hub.data_dir, *hub.data_dir.rglob("*")]
    }
    assert {"index.sqlite3", "hub-signing-key.asc", "mailhub.lock", "reserve.space"} <= set(modes)
    assert any(name.startswith("ledger/") for name in modes) and any(name.startswith("blobs/") for name in modes)
    folders = {name for name in modes if (hub.data_dir / name).is_dir()}
    assert {name: mode for name, mode in modes.items() if mode != ("0o700" if name in folders else "0o600")} == {}


def test_main_in_a_program_keeps_that_programs_umask(tmp_path, monkeypatch, capsys):
    from mailhub.cli import main

    monkeypatch.setenv("MAILHUB_DATA_DIR", str(tmp_path / "data"))
    saved = os.umask(0o022)
    try:
        assert main(["site", "list"]) == 0
        assert os.umask(0o022) == 0o022  # the tests and loadtest's site adder call main() in their process
    finally:
        os.umask(saved)
    assert capsys.readouterr().out == "no sites\n"
    assert oct(stat.S_IMODE((tmp_path / "data").stat().st_mode)) == "0o700"
