# IMAP interop with real third-party clients from Debian: fetchmail and getmail6 in IMAP mode each
# download a set of mails (one of 200 MB) from a real hub and delete them; the SHA-256 of every
# downloaded message, with only the headers the client itself adds taken off (and getmail's LF line
# ends turned back into CRLF), equals that of what was sent over SMTP. neomutt, run on a pseudo
# terminal, lists the mailbox (its index shows every subject) and pipes every message out.
# Uses the same mails and helpers as the POP3 interop test.
import json
import os
import pty
import pwd
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from test_pop3_interop import _big_message, _peak_over_rss_mb, _reset_peak_rss, _strip_first_field

from conftest import PASSWORD, Hub, hub_env, make_message, wait_for
from pop3util import send, sha256, strip_trace

pytestmark = pytest.mark.skipif(
    not (shutil.which("fetchmail") and shutil.which("getmail") and shutil.which("neomutt")),
    reason="needs Debian's fetchmail, getmail6 and neomutt (bench/install-debian-packages.sh)",
)


@pytest.fixture(scope="module")
def loaded_hub(tmp_path_factory):
    """A hub whose sites alpha and beta both hold the same set of mails (one stored copy each)."""
    data_dir = tmp_path_factory.mktemp("imap-interop") / "data"
    hub = Hub(data_dir, hub_env(data_dir), process=True)  # its memory is measured (pop3_interop._reset_peak_rss)
    hub.add_site("alpha", "alpha@hub.test")
    hub.add_site("beta", "beta@hub.test")
    hub.add_site("gamma", "gamma@hub.test")
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
        send(hub, ["alpha@hub.test", "beta@hub.test"], mail)
    for mail in mails[:4]:
        send(hub, ["gamma@hub.test"], mail)
    hub.sent_digests = sorted(sha256(m) for m in mails)
    hub.stored_bytes = hub.query("SELECT sum(size) FROM messages WHERE refs = 2")[0][0]
    del mails
    yield hub
    hub.stop()


def _check_downloads(hub, site: str, digests: list[str]) -> dict:
    assert sorted(digests) == hub.sent_digests
    assert hub.query("SELECT count(*) FROM mailbox WHERE site_id = (SELECT id FROM sites WHERE name = ?)", site) == [
        (0,)
    ]
    assert "Traceback" not in hub.log_text()
    return wait_for(
        lambda: json.loads(hub.cli("site", "show", site, "--json").stdout)["downloads"],
        interval=0.1,
        message=f"{site}'s downloads counted",
    )


def test_fetchmail_imap_downloads_every_mail_byte_exact(loaded_hub, tmp_path):
    hub = loaded_hub
    out = tmp_path / "delivered"
    out.mkdir()
    mda = tmp_path / "mda.sh"
    mda.write_text(f'#!/bin/sh\nexec cat > "{out}/$(date +%s%N).$$"\n')
    mda.chmod(0o755)
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        "set no bouncemail\nset no syslog\n"
        f"poll 127.0.0.1 protocol imap port {hub.ports['imap']} auth password\n"
        f'  user "alpha" there with password "{PASSWORD}" is "root" here\n'
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
    downloads = _check_downloads(hub, "alpha", digests)
    assert downloads["bytes"] >= hub.stored_bytes


def test_getmail_imap_downloads_every_mail_byte_exact(loaded_hub, tmp_path):
    hub = loaded_hub
    nobody = pwd.getpwnam("nobody")
    top = Path(tempfile.mkdtemp(prefix="mailhub-getmail-imap-"))
    try:
        maildir = top / "Maildir"
        for sub in ("", "cur", "new", "tmp"):
            (maildir / sub).mkdir(exist_ok=True)
        for path in (top, maildir, *(maildir / s for s in ("cur", "new", "tmp"))):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        getmaildir = tmp_path / "getmail"
        getmaildir.mkdir()
        (getmaildir / "getmailrc").write_text(f"""[retriever]
type = SimpleIMAPRetriever
server = 127.0.0.1
port = {hub.ports["imap"]}
username = beta
password = {PASSWORD}
mailboxes = ("INBOX",)
record_mailbox = false

[destination]
type = Maildir
path = {maildir}/
user = nobody

[options]
read_all = true
delete = true
received = false
delivered_to = false
""")
        _reset_peak_rss(hub)
        result = subprocess.run(
            ["getmail", f"--getmaildir={getmaildir}", "--rcfile=getmailrc"], capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert _peak_over_rss_mb(hub) < 40

        digests = []
        for path in (maildir / "new").iterdir():
            data = path.read_bytes()
            added, data = _strip_first_field(data, b"\n")
            assert added == b"Return-Path: <unknown>\n", added
            assert b"\r" not in data
            digests.append(sha256(strip_trace(data.replace(b"\n", b"\r\n"))))
        downloads = _check_downloads(hub, "beta", digests)
        assert (downloads["messages"], downloads["bytes"]) == (len(digests), hub.stored_bytes)
    finally:
        shutil.rmtree(top)


def test_neomutt_lists_the_mailbox(loaded_hub, tmp_path):
    hub = loaded_hub
    piped = tmp_path / "piped"
    rc = tmp_path / "muttrc"
    rc.write_text(f"""set imap_user = "gamma"
set imap_pass = "{PASSWORD}"
set folder = "imap://127.0.0.1:{hub.ports["imap"]}/"
set spoolfile = "+INBOX"
set ssl_starttls = no
set ssl_force_tls = no
set header_cache = ""
set message_cachedir = ""
set index_format = "LISTED %s"
set sort = date-received
set quit = yes
set move = no
set wait_key = no
set pipe_split = yes
set mail_check_stats = no
set imap_check_subscribed = no
""")
    keys = f"<tag-pattern>~A<enter><tag-prefix><pipe-message>cat >> {piped}<enter><sync-mailbox><quit>"
    env = dict(os.environ, HOME=str(tmp_path), TERM="vt100", COLUMNS="200", LINES="40")
    master, slave = pty.openpty()
    os.set_blocking(master, False)
    proc = subprocess.Popen(
        ["neomutt", "-n", "-F", str(rc), "-e", f'push "{keys}"'],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        close_fds=True,
        start_new_session=True,
    )
    os.close(slave)
    screen = b""
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    screen += os.read(master, 65536)
                except OSError:
                    break
        assert proc.wait(timeout=10) == 0, screen[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    for subject in (b"small", b"dots", b"3 MB", b"8 bit"):
        assert b"LISTED " + subject in screen, screen[-3000:]
    data = piped.read_bytes()
    assert data.count(b"\nSubject: ") == 4 and b"Subject: 3 MB" in data
    assert hub.query("SELECT count(*) FROM mailbox WHERE site_id = (SELECT id FROM sites WHERE name = 'gamma')") == [
        (4,)
    ]
    assert "Traceback" not in hub.log_text()
