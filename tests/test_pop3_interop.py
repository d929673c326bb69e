# POP3 interop with real third-party clients from Debian: fetchmail and getmail6 each download a set
# of mails (one of 200 MB) from a real hub into a local folder / Maildir and delete them; the
# SHA-256 of every downloaded message, with only the headers the client itself adds taken off (and
# getmail's LF line ends turned back into CRLF), equals that of what was sent over SMTP.
# The 200 MB mail has 998-character lines (the RFC 5322 maximum): fetchmail reads line by line with
# about two system calls per line, which takes it ~13 s for 200 MB of 76-character lines against
# ~2 s here; getmail parses the whole message with Python's email package (~15 s either way).
import json
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import PASSWORD, Hub, hub_env, make_message
from pop3util import send, sha256, strip_trace

BIG = 200 * 1024 * 1024
pytestmark = pytest.mark.skipif(
    not (shutil.which("fetchmail") and shutil.which("getmail")),
    reason="needs Debian's fetchmail and getmail6 (bench/install-debian-packages.sh)",
)


def _big_message() -> bytes:
    header = b"From: alpha@hub.test\r\nTo: alpha@hub.test, beta@hub.test\r\nSubject: 200 MB\r\n\r\n"
    line = os.urandom(499).hex().encode() + b"\r\n"
    return header + line * (BIG // len(line))


@pytest.fixture(scope="module")
def loaded_hub(tmp_path_factory):
    """A hub whose sites alpha and beta both hold the same set of mails (one stored copy each)."""
    data_dir = tmp_path_factory.mktemp("interop") / "data"
    hub = Hub(data_dir, hub_env(data_dir), process=True)  # its memory is measured
    hub.add_site("alpha", "alpha@hub.test")
    hub.add_site("beta", "beta@hub.test")
    hub.start()
    mails = [
        make_message(2000, subject="small"),
        make_message(3000, subject="dots") + b".\r\n..\r\n.leading dot\r\n",
        make_message(3 * 1024 * 1024, subject="3 MB"),
        make_message(
            1500,
            subject="8 bit",
            extra_headers="Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n",
        )
        + "Grüße, Ärztin\r\n".encode(),
        _big_message(),
    ]
    for mail in mails:
        assert b"\r" not in mail.replace(b"\r\n", b"") and b"\n" not in mail.replace(b"\r\n", b"")
        send(hub, ["alpha@hub.test", "beta@hub.test"], mail)
    hub.sent_digests = sorted(sha256(m) for m in mails)
    hub.stored_bytes = hub.query("SELECT sum(size) FROM messages")[0][0]  # what RETR sends
    del mails
    yield hub
    hub.stop()


def _reset_peak_rss(hub) -> None:
    with open(f"/proc/{hub.proc.pid}/clear_refs", "w") as f:
        f.write("5")


def _peak_over_rss_mb(hub) -> float:
    fields = dict(line.split(":", 1) for line in open(f"/proc/{hub.proc.pid}/status").read().splitlines())
    return (int(fields["VmHWM"].split()[0]) - int(fields["VmRSS"].split()[0])) / 1024


def _strip_first_field(data: bytes, eol: bytes) -> tuple[bytes, bytes]:
    """(first header field with its continuation lines, the rest)."""
    end = data.index(eol) + len(eol)
    while data[end : end + 1] in (b" ", b"\t"):
        end = data.index(eol, end) + len(eol)
    return data[:end], data[end:]


def _check_downloads(hub, site: str, digests: list[str]) -> None:
    assert sorted(digests) == hub.sent_digests
    assert hub.query("SELECT count(*) FROM mailbox WHERE site_id = (SELECT id FROM sites WHERE name = ?)", site) == [
        (0,)
    ]
    downloads = json.loads(hub.cli("site", "show", site, "--json").stdout)["downloads"]
    assert (downloads["messages"], downloads["bytes"]) == (len(digests), hub.stored_bytes)
    assert "Traceback" not in hub.log_text()


def test_fetchmail_downloads_every_mail_byte_exact(loaded_hub, tmp_path):
    hub = loaded_hub
    out = tmp_path / "delivered"
    out.mkdir()
    mda = tmp_path / "mda.sh"  # one file per message, named in delivery order
    mda.write_text(f'#!/bin/sh\nexec cat > "{out}/$(date +%s%N).$$"\n')
    mda.chmod(0o755)
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        "set no bouncemail\nset no syslog\n"
        f"poll 127.0.0.1 protocol pop3 port {hub.ports['pop3']} auth password\n"
        f'  user "alpha" there with password "{PASSWORD}" is "root" here\n'
        # sslproto "": plain POP3 (loopback); no stripcr: keep CRLF; no rewrite: leave headers alone
        f'  options fetchall no rewrite no stripcr sslproto "" mda "{mda}"\n'
    )
    rc.chmod(0o600)
    env = dict(os.environ, HOME=str(tmp_path), FETCHMAILHOME=str(tmp_path))
    _reset_peak_rss(hub)
    result = subprocess.run(
        ["fetchmail", "-N", "-f", str(rc), "--idfile", str(tmp_path / "ids"), "--pidfile", str(tmp_path / "pid")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert _peak_over_rss_mb(hub) < 40

    digests = []
    for path in sorted(out.iterdir()):
        data = path.read_bytes()
        added, data = _strip_first_field(data, b"\r\n")
        assert added.startswith(b"Received: from 127.0.0.1") and b"fetchmail" in added, added
        digests.append(sha256(strip_trace(data)))
    _check_downloads(hub, "alpha", digests)


def test_getmail_downloads_every_mail_byte_exact(loaded_hub, tmp_path):
    hub = loaded_hub
    # getmail refuses to deliver as root, so it runs as "nobody" (not as root with `user = nobody`:
    # then it forks a child per mail and, when a child exits before getmail waits for it, waits out
    # its timeout and fails, a race of getmail's own); nobody cannot enter pytest's private
    # tmp_path, hence a folder of its own.
    nobody = pwd.getpwnam("nobody")
    top = Path(tempfile.mkdtemp(prefix="mailhub-getmail-"))
    try:
        maildir = top / "Maildir"
        for sub in ("", "cur", "new", "tmp"):
            (maildir / sub).mkdir(exist_ok=True)
        for path in (top, maildir, *(maildir / s for s in ("cur", "new", "tmp"))):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        getmaildir = top / "getmail"  # getmail keeps its state here
        getmaildir.mkdir()
        os.chown(getmaildir, nobody.pw_uid, nobody.pw_gid)
        (getmaildir / "getmailrc").write_text(f"""[retriever]
type = SimplePOP3Retriever
server = 127.0.0.1
port = {hub.ports["pop3"]}
username = beta
password = {PASSWORD}

[destination]
type = Maildir
path = {maildir}/

[options]
read_all = true
delete = true
received = false
delivered_to = false
""")
        _reset_peak_rss(hub)
        result = subprocess.run(
            ["runuser", "-u", "nobody", "--", "getmail", f"--getmaildir={getmaildir}", "--rcfile=getmailrc"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert _peak_over_rss_mb(hub) < 40

        digests = []
        for path in (maildir / "new").iterdir():
            data = path.read_bytes()
            added, data = _strip_first_field(data, b"\n")
            assert added == b"Return-Path: <unknown>\n", added
            assert b"\r" not in data  # Maildir files have LF line ends; the mails had CRLF only
            digests.append(sha256(strip_trace(data.replace(b"\n", b"\r\n"))))
        _check_downloads(hub, "beta", digests)
    finally:
        shutil.rmtree(top)
