# The participant directory: site keys imported and rotated with the CLI, the hub's signing key,
# the directory requested by mail (smtplib) and fetched over POP3 (poplib), its PGP/MIME signature
# verified by real GnuPG against `mailhub directory fingerprint`, and update mails to every site
# after a change, sent once (not again after a restart).
import email
import json
import poplib
import re
import smtplib
import urllib.request

import pytest

from mailhub import control

from conftest import ALPHA, ALPHA_BETA, PASSWORD, wait_for
from gpgutil import Gpg

# Every test that starts a hub runs on SQLite and again on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_engines


@pytest.fixture
def gpg():
    g = Gpg()
    yield g
    g.close()


def pop3_messages(hub, login: str) -> list[bytes]:
    client = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=30)
    try:
        client.user(login)
        client.pass_(PASSWORD)
        count, _ = client.stat()
        return [b"\r\n".join(client.retr(i)[1]) + b"\r\n" for i in range(1, count + 1)]
    finally:
        client.quit()


def signed_parts(raw: bytes) -> tuple[bytes, bytes]:
    """(the signed part's exact bytes, the detached signature) of a multipart/signed mail, cut out
    of the raw bytes by the boundary as RFC 3156 verifiers do (no re-serialisation)."""
    boundary = re.search(rb'multipart/signed;[^\r]*\r\n\s+boundary="([^"]+)"', raw).group(1)
    pieces = raw.split(b"\r\n--" + boundary)
    signed = pieces[1][2:]  # after the CRLF that ends the delimiter line
    signature = pieces[2].split(b"\r\n\r\n", 1)[1]
    return signed, signature


def document_of(raw: bytes) -> dict:
    message = email.message_from_bytes(raw)
    assert message.get_content_type() == "multipart/signed"
    assert message.get_param("protocol") == "application/pgp-signature"
    assert message.get_param("micalg") == "pgp-sha256"
    mixed, signature = message.get_payload()
    assert signature.get_content_type() == "application/pgp-signature"
    text, attachment, key = mixed.get_payload()
    assert text.get_content_type() == "text/plain" and attachment.get_content_type() == "application/json"
    assert key.get_content_type() == "application/pgp-keys" and key.get_filename() == "hub-key.asc"
    assert key.get_payload().startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")
    document = json.loads(attachment.get_payload(decode=True))
    readable = text.get_payload(decode=True).decode()
    for site in document["participants"] if "participants" in document else document["added"] + document["changed"]:
        assert site["name"] in readable and all(a in readable for a in site["addresses"])
    return document


def hub_fingerprint(hub) -> str:
    """The hub key's fingerprint as `mailhub directory fingerprint` and `directory export` give
    it, asked once per hub: the key is made once and kept (a mail signed by another key after a
    restart would not match it)."""
    if not hasattr(hub, "fingerprint"):
        fingerprint = hub.cli("directory", "fingerprint").stdout.strip()
        assert re.fullmatch(r"[0-9A-F]{40}", fingerprint)
        exported = hub.cli("directory", "export", "--format", "json").stdout
        assert json.loads(exported)["hub"]["fingerprint"] == fingerprint
        hub.fingerprint = fingerprint
    return hub.fingerprint


def verify_directory_mail(gpg: Gpg, hub, raw: bytes) -> dict:
    fingerprint = hub_fingerprint(hub)
    document = document_of(raw)
    assert document["hub"]["fingerprint"] == fingerprint
    signed, signature = signed_parts(raw)
    gpg.import_key(hub_public_key(hub))
    status = gpg.verify(signature, signed)
    assert f"VALIDSIG {fingerprint} " in status, status  # signed by the hub key itself
    return document


def hub_public_key(hub) -> bytes:
    from directory import load_hub_key

    return load_hub_key(hub.data_dir).public_armored.encode()


def request_directory(hub, login: str) -> str:
    client = smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30)
    try:
        client.ehlo("gateway.test")
        client.login(login, PASSWORD)
        message = (
            f"From: {login}@hub.test\r\nTo: directory@hub.test\r\nSubject: directory please\r\n"
            f"Message-ID: <req-1@{login}.test>\r\n\r\nsend the list\r\n"
        )
        client.mail(f"{login}@hub.test")
        assert client.rcpt("directory@hub.test")[0] == 250
        code, reply = client.data(message.encode())
        assert code == 250, reply
        return reply.decode()
    finally:
        client.quit()


def request_directory_if_allowed(hub, login: str) -> str | None:
    """request_directory, or None when the directory address answers RCPT with 450 (too soon)."""
    client = smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30)
    try:
        client.ehlo("gateway.test")
        client.login(login, PASSWORD)
        client.mail(f"{login}@hub.test")
        code, reply = client.rcpt("directory@hub.test")
        if code == 450:
            return None
        assert code == 250, (code, reply)
        code, reply = client.data(f"From: {login}@hub.test\r\nSubject: directory please\r\n\r\nagain\r\n".encode())
        assert code == 250, reply
        return reply.decode()
    finally:
        client.quit()


def test_key_import_show_and_rotation_with_grace(make_hub, gpg, tmp_path):
    hub = make_hub(sites=ALPHA, MAILHUB_DIRECTORY_KEY_GRACE_DAYS="14")
    assert "has no key" in hub.cli("site", "key", "show", "alpha").stdout
    old = gpg.new_key("alpha-old <alpha@hub.test>")
    new = gpg.new_key("alpha-new <alpha@hub.test>")
    gpg.export(old, tmp_path / "old.asc")
    gpg.export(new, tmp_path / "new.gpg", armor=False)  # binary works too

    out = hub.cli("site", "key", "import", "alpha", str(tmp_path / "old.asc")).stdout
    assert gpg.encryption_key_id(old) in out
    again = hub.cli("site", "key", "import", "alpha", str(tmp_path / "old.asc"), check=False)
    assert again.returncode == 1 and "already the current key" in again.stderr
    hub.cli("site", "key", "import", "alpha", str(tmp_path / "new.gpg"))
    shown = json.loads(hub.cli("site", "key", "show", "alpha", "--json").stdout)
    assert [k["fingerprint"] for k in shown["keys"]] == [new, old]
    assert shown["keys"][0]["state"] == "current"
    assert shown["keys"][1]["state"].startswith("previous (valid until ")
    assert shown["keys"][0]["encryption_key_ids"] == [gpg.encryption_key_id(new)]
    text = hub.cli("site", "key", "show", "alpha", "--armor").stdout
    assert "-----BEGIN PGP PUBLIC KEY BLOCK-----" in text and "current: " in text

    # after the grace period the previous key is shown as expired
    hub.env["MAILHUB_DIRECTORY_KEY_GRACE_DAYS"] = "0.000001"  # 0.09 s
    states = lambda: [k["state"] for k in json.loads(hub.cli("site", "key", "show", "alpha", "--json").stdout)["keys"]]
    wait_for(
        lambda: states() == ["current", "expired"], interval=0.1, message=lambda: f"previous key expired: {states()}"
    )


def test_bad_keys_are_refused_with_a_clear_message(make_hub, gpg, tmp_path):
    hub = make_hub(sites=ALPHA)
    fpr = gpg.new_key("alpha <alpha@hub.test>")
    secret = tmp_path / "secret.asc"
    secret.write_bytes(gpg.run("--armor", "--export-secret-keys", fpr).stdout)
    junk = tmp_path / "junk.asc"
    junk.write_text("hello\n")
    gpg.new_key("other <other@hub.test>")
    two = tmp_path / "two.asc"
    two.write_bytes(gpg.run("--armor", "--export").stdout)
    for path, text in (
        (secret, "private key"),
        (junk, "not an OpenPGP key"),
        (two, "2 keys given"),
        (tmp_path / "missing.asc", "cannot read"),
    ):
        result = hub.cli("site", "key", "import", "alpha", str(path), check=False)
        assert result.returncode == 1 and text in result.stderr and "Traceback" not in result.stderr, result
    assert hub.query("SELECT count(*) FROM site_keys") == [(0,)]
    unknown = hub.cli("site", "key", "import", "nobody", str(junk), check=False)
    assert unknown.returncode == 1


def test_directory_by_mail_is_signed_by_the_hub_key(hub, gpg, tmp_path):
    fpr = gpg.new_key("alpha <alpha@hub.test>")
    hub.cli("site", "key", "import", "alpha", str(gpg.export(fpr, tmp_path / "alpha.asc")))
    reply = request_directory(hub, "beta")
    assert "directory sent to your mailbox" in reply

    (raw,) = pop3_messages(hub, "beta")
    assert pop3_messages(hub, "alpha") == []  # only the asker gets the reply
    headers = email.message_from_bytes(raw)
    assert headers["From"] == "DICOM Mail Hub directory <directory@hub.test>"
    assert headers["In-Reply-To"] == "<req-1@beta.test>" and headers["Auto-Submitted"] == "auto-replied"
    document = verify_directory_mail(gpg, hub, raw)
    sites = {s["name"]: s for s in document["participants"]}
    assert set(sites) == {"alpha", "beta"}
    assert sites["alpha"]["addresses"] == ["alpha@hub.test"]
    assert sites["alpha"]["key_fingerprint"] == fpr
    assert sites["beta"]["key_fingerprint"] is None and sites["beta"]["addresses"] == ["b2@hub.test", "beta@hub.test"]
    # the armored key in the directory is the one GnuPG exported: importing it gives the same key
    other = Gpg()
    try:
        other.import_key(sites["alpha"]["public_key"].encode())
        assert other.fingerprints(fpr)[0] == fpr
    finally:
        other.close()
    # the request itself is not stored anywhere
    assert hub.query("SELECT count(*) FROM messages") == [(1,)]
    scraped = urllib.request.urlopen(f"http://127.0.0.1:{hub.ports['metrics']}/metrics", timeout=10).read().decode()
    assert 'mailhub_directory_mails_total{kind="reply"} 1.0' in scraped


def test_a_site_asking_again_too_soon_is_told_when_to_ask(make_hub):
    hub = make_hub(sites=ALPHA_BETA, MAILHUB_DIRECTORY_MIN_REQUEST_INTERVAL="3").start()
    assert "directory sent to your mailbox" in request_directory(hub, "alpha")
    client = smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30)
    try:
        client.ehlo("gateway.test")
        client.login("alpha", PASSWORD)
        client.mail("alpha@hub.test")
        code, reply = client.rcpt("directory@hub.test")
        assert code == 450 and re.match(
            rb"4\.7\.1 The directory was sent to your mailbox a moment ago;"
            rb" ask again in [123] s$",
            reply,
        ), reply
    finally:
        client.quit()
    assert "directory sent to your mailbox" in request_directory(hub, "beta")  # other sites are not held
    # asking again until the interval has passed (3 s after the first request) is answered
    reply = wait_for(
        lambda: request_directory_if_allowed(hub, "alpha"), interval=0.1, message="directory request accepted again"
    )
    assert reply and "directory sent to your mailbox" in reply, reply
    assert len(pop3_messages(hub, "alpha")) == 2


def test_directory_address_is_for_sites_only(hub):
    client = smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30)
    try:
        client.ehlo("gateway.test")
        client.mail("")
        code, reply = client.rcpt("directory@hub.test")
        assert code == 550 and b"5.7.1" in reply, reply
    finally:
        client.quit()


def test_adding_a_site_sends_every_site_an_update_once(make_hub, gpg, tmp_path):
    hub = make_hub(sites=ALPHA_BETA, MAILHUB_DIRECTORY_NOTIFY_ON_CHANGE="true", MAILHUB_DIRECTORY_UPDATE_DELAY="0")
    hub.start()
    # a check of the directory mailer now (as its loop makes every second) sends nothing
    assert control.request(hub.data_dir, "hub-key-announce")["kind"] is None
    assert hub.query("SELECT count(*) FROM mailbox") == [(0,)]  # the sites present at first start get none

    hub.add_site("gamma", "gamma@hub.test")
    wait_for(
        lambda: hub.query("SELECT count(*) FROM mailbox") == [(3,)],
        interval=0.1,
        message=lambda: f"3 directory update mails in the mailboxes\n{hub.log_text()[-2000:]}",
    )
    documents = {}
    for login in ("alpha", "beta", "gamma"):
        (raw,) = pop3_messages(hub, login)
        message = email.message_from_bytes(raw)
        assert message["Subject"] == "Participant directory update"
        documents[login] = verify_directory_mail(gpg, hub, raw)
        assert message["X-DICOM-Mail-Hub-Directory-Base-Version"] == str(documents[login]["base_version"])
    update = documents["alpha"]
    assert update["format"] == "dicom-mail-hub-directory-update/1" and update["participant_count"] == 3
    assert [s["name"] for s in update["added"]] == ["gamma"] and update["changed"] == update["removed"] == []
    assert update["base_version"] < update["version"]
    assert hub.query("SELECT count(DISTINCT queue_id) FROM mailbox") == [(1,)]  # one blob for all

    # a key change is an update too, based on the version sent before
    fpr = gpg.new_key("gamma <gamma@hub.test>")
    hub.cli("site", "key", "import", "gamma", str(gpg.export(fpr, tmp_path / "gamma.asc")))
    wait_for(
        lambda: hub.query("SELECT count(*) FROM mailbox") == [(6,)],
        interval=0.1,
        message=lambda: f"6 directory update mails in the mailboxes\n{hub.log_text()[-2000:]}",
    )
    raw = pop3_messages(hub, "beta")[-1]
    second = verify_directory_mail(gpg, hub, raw)
    assert second["base_version"] == update["version"] and second["added"] == second["removed"] == []
    (changed,) = second["changed"]
    assert changed["name"] == "gamma" and changed["key_fingerprint"] == fpr

    # nothing is sent again after a restart
    assert hub.stop() == 0
    hub.start()
    assert control.request(hub.data_dir, "hub-key-announce")["kind"] is None
    assert hub.query("SELECT count(*) FROM mailbox") == [(6,)]
    # a change made while the hub was down is sent after the start, compared with what was sent
    hub.stop()
    hub.add_site("delta", "delta@hub.test")
    hub.start()
    wait_for(
        lambda: hub.query("SELECT count(*) FROM mailbox") == [(10,)],
        interval=0.1,
        message=lambda: f"10 directory update mails in the mailboxes\n{hub.log_text()[-2000:]}",
    )
    third = document_of(pop3_messages(hub, "delta")[-1])
    assert third["base_version"] == second["version"] and [s["name"] for s in third["added"]] == ["delta"]


def test_export_and_fingerprint_from_the_cli(make_hub, gpg, tmp_path):
    hub = make_hub(sites=ALPHA)
    fingerprint = hub.cli("directory", "fingerprint").stdout.strip()
    assert hub.cli("directory", "fingerprint").stdout.strip() == fingerprint  # created once
    key_file = hub.data_dir / "hub-signing-key.asc"
    assert key_file.stat().st_mode & 0o777 == 0o600
    hub.start()
    assert f"directory signing key {fingerprint}" in hub.log_text()  # the server uses the same key
    out = tmp_path / "directory.json"
    hub.cli("directory", "export", "--output", str(out))
    document = json.loads(out.read_text())
    assert [s["name"] for s in document["participants"]] == ["alpha"]
    text = hub.cli("directory", "export", "--format", "text").stdout
    assert "alpha@hub.test" in text and "none registered" in text
    signed = tmp_path / "directory.eml"
    hub.cli("directory", "export", "--format", "signed", "--output", str(signed))
    verify_directory_mail(gpg, hub, signed.read_bytes())


def test_the_directory_address_cannot_be_given_to_a_site(make_hub):
    hub = make_hub()
    result = hub.cli(
        "site", "add", "dir", "--address", "Directory@hub.test", "--password-stdin", stdin=PASSWORD + "\n", check=False
    )
    assert result.returncode == 1 and "participant directory" in result.stderr


@pytest.mark.one_engine("about what the serve process prints for a damaged key file, not the index")
def test_a_damaged_hub_key_stops_the_start_with_one_line(make_hub):
    hub = make_hub(process=True)  # what `mailhub serve` prints
    hub.data_dir.mkdir(parents=True)
    (hub.data_dir / "hub-signing-key.asc").write_text("not a key\n")
    with pytest.raises(AssertionError) as failed:
        hub.start()
    key_file = hub.data_dir / "hub-signing-key.asc"
    assert f"mailhub: cannot start: hub key {key_file}: not an OpenPGP key" in str(failed.value)
    assert "restore the file from the data folder's backup" in str(failed.value)
    assert "Traceback" not in hub.log_text()
