# Reloading a running hub (SIGHUP, `mailhub reload`): a renewed certificate reaches new connections
# while a POP3 download and an IMAP IDLE that began under the old one go on to the end; live
# settings change at once; settings that need a restart are named and left as they run; a broken
# configuration or a key that does not fit the certificate is refused with one log line and the
# hub keeps running as before. A graceful restart (SIGUSR2, `mailhub restart`) keeps the listening
# sockets: a transaction in flight is finished, a connection made meanwhile waits and is served by
# the new hub, in the same process.
import imaplib
import json
import os
import signal
import smtplib
import socket

import pytest

from mailhub import config
from mailhub.config import SCHEMA
from mailhub.reload import LIVE
from mailhub.reload import plan as reload_plan

from certutil import any_certificate, make_certificate, peer_fingerprint
from conftest import ALPHA_BETA_B2, PASSWORD, RawSMTP, make_message, wait_for
from pop3util import RawPop3, send, unstuff


@pytest.fixture
def tls_files(tmp_path):
    folder = tmp_path / "tls"
    folder.mkdir()
    return folder / "cert.pem", folder / "key.pem"


def pop3_over_stls(hub, rcvbuf: int | None = None) -> RawPop3:
    pop = RawPop3(hub.ports["pop3"], rcvbuf=rcvbuf)
    assert pop.command("STLS").startswith(b"+OK")
    pop.sock = any_certificate().wrap_socket(pop.sock)
    return pop


def imaps(hub, user: str = "beta") -> imaplib.IMAP4_SSL:
    client = imaplib.IMAP4_SSL("127.0.0.1", hub.ports["imaps"], ssl_context=any_certificate(), timeout=30)
    client.login(user, PASSWORD)
    return client


def served_certificates(hub) -> tuple[str, str, str]:
    """The certificate a new SMTP STARTTLS, POP3 STLS and IMAPS connection get."""
    smtp = smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30)
    smtp.starttls(context=any_certificate())
    pop = pop3_over_stls(hub)
    client = imaps(hub)
    try:
        return peer_fingerprint(smtp.sock), peer_fingerprint(pop.sock), peer_fingerprint(client.sock)
    finally:
        smtp.quit()
        pop.close()
        client.logout()


def reloaded(hub, mark: int, what: str = "configuration reloaded") -> str:
    """The hub's log lines since `mark` once one says `what`."""
    wait_for(lambda: what in hub.log_text()[mark:], timeout=30, message=f"no {what!r} in the log")
    return hub.log_text()[mark:]


def test_sighup_renews_the_certificate_under_a_pop3_download_and_an_imap_idle(make_hub, tmp_path, tls_files):
    cert, key = tls_files
    old = make_certificate(cert, key, "old.hub.test")
    settings = tmp_path / "hub.toml"
    settings.write_text("[smtp]\nmax_recipients = 50\n")
    hub = make_hub(
        sites=ALPHA_BETA_B2,
        process=True,
        MAILHUB_TLS_CERT_FILE=str(cert),
        MAILHUB_TLS_KEY_FILE=str(key),
        MAILHUB_IMAP_IMAPS_LISTEN="127.0.0.1:0",
    )
    hub.config = settings
    hub.start()
    queue_id = send(hub, ["alpha@hub.test"], make_message(4 * 1024 * 1024))
    # a download under way: a small receive buffer keeps the hub sending while we pause
    download = pop3_over_stls(hub, rcvbuf=32 * 1024)
    assert download.login("alpha").startswith(b"+OK")
    download.send(b"RETR 1\r\n")
    assert download.line().startswith(b"+OK")
    download._fill()
    idle = imaps(hub)
    idle.select("INBOX")
    idle.send(b"I1 IDLE\r\n")
    assert idle.readline() == b"+ idling\r\n"
    assert {peer_fingerprint(download.sock), peer_fingerprint(idle.sock)} == {old}

    new = make_certificate(cert, key, "new.hub.test")  # renewed in place, as certbot does
    mark = len(hub.log_text())
    os.kill(hub.pid, signal.SIGHUP)
    log = reloaded(hub, mark)
    assert "no live setting changed" in log and "CN=new.hub.test" in log, log
    assert served_certificates(hub) == (new, new, new)

    # both sessions go on under the old certificate
    assert unstuff(download.block()) == hub.stored(queue_id)
    assert download.command("QUIT").startswith(b"+OK")
    idle.sock.settimeout(30)
    send(hub, ["beta@hub.test"], make_message(500))
    assert idle.readline() == b"* 1 EXISTS\r\n"
    idle.send(b"DONE\r\n")
    assert idle.readline() == b"I1 OK IDLE terminated\r\n"
    assert peer_fingerprint(idle.sock) == old
    idle.logout()

    # a broken configuration is refused with one line; the hub runs on as it was
    settings.write_text('[smtp]\nmax_recipients = "many"\n')
    mark = len(hub.log_text())
    os.kill(hub.pid, signal.SIGHUP)
    log = reloaded(hub, mark, "reload refused")
    refusals = [line for line in log.splitlines() if "reload refused" in line]
    assert len(refusals) == 1 and "smtp.max_recipients" in refusals[0], log
    assert "Traceback" not in hub.log_text()
    assert served_certificates(hub) == (new, new, new)
    assert send(hub, ["beta@hub.test"], make_message(500))
    assert hub.proc.poll() is None


def test_reload_changes_live_settings_and_names_those_that_need_a_restart(make_hub, tmp_path, tls_files):
    settings = tmp_path / "hub.toml"
    settings.write_text("[smtp]\nmax_recipients = 3\n")
    hub = make_hub(sites=ALPHA_BETA_B2, MAILHUB_SMTP_MAX_RECIPIENT="2")
    hub.config = settings
    hub.start()
    assert (
        "WARNING mailhub.server: MAILHUB_SMTP_MAX_RECIPIENT: no such setting, ignored; did you mean "
        "MAILHUB_SMTP_MAX_RECIPIENTS?" in hub.log_text()
    )
    cert, key = tls_files
    make_certificate(cert, key)
    settings.write_text(
        "[smtp]\nmax_recipients = 1\nmax_connections_per_ip = 1\n[events]\nretention_days = 7\n"
        f'[tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n'
    )
    result = hub.cli("reload", check=False)
    assert result.returncode == 3, result
    assert result.stdout == "reloaded: changed smtp.max_recipients, smtp.max_connections_per_ip\n"
    assert result.stderr == (
        "not changed, needs a restart (systemctl restart mailhub): tls.cert_file, tls.key_file, events.retention_days\n"
    )
    # the new limits hold for new connections and transactions
    client = smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30)
    client.ehlo("gateway.test")
    client.login("alpha", PASSWORD)
    client.mail("alpha@hub.test")
    assert client.rcpt("beta@hub.test")[0] == 250
    code, reply = client.rcpt("b2@hub.test")
    assert (code, reply[:5]) == (452, b"4.5.3"), reply
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30)
    assert refused.value.smtp_code == 421, refused.value
    client.quit()
    # a graceful restart needs `mailhub serve` (it replaces the process); an in-process hub refuses it
    refused = hub.cli("restart", check=False)
    assert refused.returncode == 1 and "a graceful restart needs the hub to run as `mailhub serve`" in refused.stderr
    # still no TLS: it is switched on by a restart, not by a reload
    plain = RawPop3(hub.ports["pop3"])
    assert b"STLS" not in plain.command("CAPA") + plain.block()
    plain.close()


def test_a_key_that_does_not_fit_is_refused_and_the_certificate_stays(make_hub, tls_files):
    cert, key = tls_files
    old = make_certificate(cert, key, "old.hub.test")
    hub = make_hub(
        sites=ALPHA_BETA_B2,
        MAILHUB_TLS_CERT_FILE=str(cert),
        MAILHUB_TLS_KEY_FILE=str(key),
        MAILHUB_IMAP_IMAPS_LISTEN="127.0.0.1:0",
    )
    hub.start()
    make_certificate(cert, key.with_name("other-key.pem"), "new.hub.test")  # the new key not copied yet
    mark = len(hub.log_text())
    result = hub.cli("reload", check=False)
    assert result.returncode == 1 and result.stdout == "", result
    assert result.stderr.startswith("mailhub: reload refused, the hub keeps its running configuration: tls.cert_file")
    assert result.stderr.count("\n") == 1, result.stderr
    log = hub.log_text()[mark:]
    assert log.count("reload refused") == 1 and "Traceback" not in log, log
    assert served_certificates(hub) == (old, old, old)


def test_graceful_restart_keeps_the_listening_sockets_and_lets_a_transaction_finish(make_hub, tmp_path):
    settings = tmp_path / "hub.toml"
    settings.write_text("[smtp]\nmax_recipients = 50\n")
    hub = make_hub(sites=ALPHA_BETA_B2, process=True)
    hub.config = settings
    hub.start()
    pid, port = hub.pid, hub.smtp_port
    # a configuration that does not load is refused before anything stops
    settings.write_text('[log]\nformat = "yaml"\n')
    refused = hub.cli("restart", check=False)
    assert refused.returncode == 1 and refused.stdout == "", refused
    assert refused.stderr.startswith("mailhub: restart refused, the hub keeps running: log.format"), refused.stderr
    assert "restart refused, the hub keeps running: log.format" in hub.log_text()
    settings.write_text('[log]\nformat = "json"\n')  # a setting a reload cannot change

    busy = RawSMTP(port)
    busy.ehlo()
    assert busy.auth_plain("alpha").startswith(b"235")
    assert busy.command("MAIL FROM:<alpha@hub.test>").startswith(b"250")
    assert busy.command("RCPT TO:<beta@hub.test>").startswith(b"250")
    assert busy.command("DATA").startswith(b"354")
    message = make_message(200_000)
    busy.send(message[:100_000])
    mark = len(hub.log_text())
    os.kill(pid, signal.SIGUSR2)
    reloaded(hub, mark, "shutting down")  # the old hub accepts nothing more from here on
    waiting = socket.create_connection(("127.0.0.1", port), timeout=60)  # queued by the kernel, not refused
    busy.send(message[100_000:] + b".\r\n")
    assert busy.reply().startswith(b"250 "), "the transaction in flight is finished and acknowledged"
    log = reloaded(hub, mark, '"hub ready')  # the new hub logs JSON: it read the new configuration
    assert "Traceback" not in log and log.count("listening on") == log.count("(kept over the restart)") == 4, log
    assert waiting.recv(1024).startswith(b"220 ")
    waiting.close()
    assert hub.proc.poll() is None and hub.proc.pid == pid  # the same process: systemd sees no change
    assert json.loads(hub.log_text()[mark:].splitlines()[-1])["level"] in ("info", "warning")

    restarted = hub.cli("restart")
    assert restarted.stdout.splitlines()[-1] == (
        f"restarted: process {pid} serves again; no listening socket was closed"
    ), restarted.stdout
    again = RawSMTP(port)
    assert again.banner.startswith(b"220 ")
    again.close()
    assert send(hub, ["beta@hub.test"], make_message(500))


def test_the_reload_plan_keeps_the_running_value_of_what_needs_a_restart():
    assert LIVE <= set(SCHEMA)  # no misspelt key
    running = config.load(None, environ={})
    new = running.with_overrides({"smtp.listen": "127.0.0.1:2626", "smtp.max_recipients": 7, "log.level": "debug"})
    plan = reload_plan(running, new)
    assert (plan.changed, plan.restart) == (("smtp.max_recipients", "log.level"), ("smtp.listen",))
    effective = plan.effective
    assert (effective.smtp.listen, effective.smtp.max_recipients, effective.log.level) == (
        ("127.0.0.1", 2525),
        7,
        "debug",
    )
    unchanged = reload_plan(running, config.load(None, environ={}))
    assert unchanged.changed == unchanged.restart == () and unchanged.effective == running
