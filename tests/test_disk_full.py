# A full disk: mails that do not fit get a temporary 452/451 (never a 250), mails acknowledged
# before stay intact, and the hub takes mail again once space is freed. Uses a small tmpfs as the
# data folder (needs root, as in CI).
import hashlib
import smtplib

from conftest import PASSWORD, make_message


def test_full_disk_refuses_temporarily_and_keeps_acknowledged_mail(make_hub, small_disk):
    hub = make_hub(MAILHUB_DATA_DIR=str(small_disk / "data"))
    hub.data_dir = small_disk / "data"
    hub.add_site("alpha", "alpha@hub.test")
    hub.start()
    client = smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30)
    client.login("alpha", PASSWORD)
    accepted = {}
    refusals = []
    for i in range(12):
        body = make_message(1_500_000, subject=f"fill {i}")
        client.mail("alpha@hub.test")
        client.rcpt("alpha@hub.test")
        code, reply = client.data(body)
        if code == 250:
            accepted[reply.decode().rsplit(" ", 1)[1]] = (hashlib.sha256(body).hexdigest(), len(body))
        else:
            refusals.append((code, reply))
    assert accepted, "nothing fitted at all"
    assert refusals, "the disk never filled up"
    assert all(code in (451, 452) for code, _ in refusals), refusals
    assert any(reply.startswith(b"4.3.1") for _, reply in refusals)
    client.quit()
    for qid, (digest, size) in accepted.items():
        data = hub.stored(qid)
        assert data.startswith(b"Received: ")
        assert hashlib.sha256(data[-size:]).hexdigest() == digest
    assert not list((hub.data_dir / "spool").iterdir())
    # free space (remove the site's mail through the index), restart, and mail flows again
    hub.stop()
    hub.cli("site", "remove", "alpha")
    hub.add_site("alpha", "alpha@hub.test")
    hub.start()
    client = smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30)
    client.login("alpha", PASSWORD)
    assert client.sendmail("alpha@hub.test", ["alpha@hub.test"], make_message(1_000_000)) == {}
    client.quit()
