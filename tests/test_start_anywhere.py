# Start anywhere (issue 21): the hub starts on a full disk (POP3 and IMAP serve; SMTP answers
# 452 4.3.1 until space returns, then takes mail again), with leftovers and strays around, and
# what start-up could not write is done at the next start. Uses a small tmpfs as the data folder
# (needs root, as in CI).
import os
import poplib
import smtplib

from conftest import PASSWORD, make_message, wait_for


def fill(path) -> None:
    """Take every free byte of the file system."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (65536, 4096, 512, 1):  # down to the last partial block
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)


def test_the_hub_starts_on_a_full_disk_serves_and_takes_mail_once_space_returns(make_hub, small_disk):
    hub = make_hub(MAILHUB_DATA_DIR=str(small_disk / "data"), MAILHUB_STORAGE_RESERVE_BYTES="2M")
    hub.data_dir = small_disk / "data"
    hub.add_site("alpha", "alpha@hub.test")
    hub.add_site("beta", "beta@hub.test")
    hub.start()
    client = smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30)
    client.login("alpha", PASSWORD)
    sent = [make_message(size, subject=f"before {i}") for i, size in enumerate((4000, 6000, 2_500_000))]
    for message in sent:
        client.sendmail("alpha@hub.test", ["beta@hub.test"], message)
    client.quit()
    assert (hub.data_dir / "reserve.space").stat().st_size == 2 * 1024 * 1024
    assert hub.stop() == 0
    (hub.data_dir / "spool" / "0123456789ABCDEF012.tmp").write_bytes(b"a cut transaction")
    filler = small_disk / "filler"
    fill(filler)

    hub.start()  # on a full disk
    log = hub.log_text()
    assert "hub ready" in log and "released the 2097152-byte reserve" in log
    pop = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=30)
    pop.user("beta")
    pop.pass_(PASSWORD)
    assert len(pop.list()[1]) == 3
    body = b"\r\n".join(pop.retr(1)[1]) + b"\r\n"
    assert body.endswith(sent[0])
    pop.dele(1)  # gateways delete on a full disk: what frees space
    assert pop.quit().startswith(b"+OK")
    assert hub.query("SELECT count(*) FROM mailbox") == [(2,)]
    client = smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30)
    client.login("alpha", PASSWORD)
    code, reply = client.mail("alpha@hub.test")
    assert (code, reply[:5]) == (452, b"4.3.1"), (code, reply)
    client.quit()

    filler.unlink()  # space returns: mail is taken again within a second or so

    def mail_taken() -> bool:
        client = smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30)
        client.login("alpha", PASSWORD)
        try:
            return client.mail("alpha@hub.test")[0] == 250
        finally:
            client.rset()
            client.quit()

    wait_for(mail_taken, interval=0.2, message="MAIL accepted again once the space returned")
    assert "space is back" in hub.log_text()
    client = smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30)
    client.login("alpha", PASSWORD)
    assert client.sendmail("alpha@hub.test", ["beta@hub.test"], make_message(50_000, subject="room")) == {}
    client.quit()
    assert hub.stop() == 0
    hub.start()  # what the full start skipped is done now: no problem left
    result = hub.cli("storage", "check", check=False)
    assert result.returncode == 0, result.stdout
    assert hub.query("SELECT count(*) FROM mailbox") == [(3,)]
    assert hub.stop() == 0
