# The encryption policy: in memory on the real streaming MIME parser (fed in pieces of any size),
# and end to end against a real hub with keys made and mails encrypted by real GnuPG: the right
# key is accepted, a stale or foreign key refused with both key IDs named, cleartext DICOM refused,
# exemptions (MDN, DSN, directory@, per-site policy off), and a 200 MB encrypted mail checked in
# bounded memory.
import base64
import os
import smtplib
import subprocess
import urllib.request
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from directory.policy import RecipientKeys
from relay.mime.stream import MimeStreamParser
from relay.policy.encryption import EncryptionPolicy

from conftest import ALPHA_BETA, PASSWORD, Hub, RawSMTP, copy_data_folder, hub_env, queue_id_from, wait_for
from gpgutil import Gpg, pgp_mime

# Every test that starts a hub runs on SQLite and again on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_engines

MB = 1024 * 1024
DICOM = b"\0" * 128 + b"DICM" + os.urandom(400)


@pytest.fixture(scope="module")
def gpg():
    g = Gpg()
    for name in ("alpha", "beta", "beta-old", "stranger"):
        g.new_key(f"{name} <{name}@keys.test>")
    yield g
    g.close()


def check(message: bytes, recipients, allow_hidden: bool = False, piece: int = 1 << 20) -> str | None:
    policy = EncryptionPolicy(recipients, allow_hidden)
    parser = MimeStreamParser(policy)
    for i in range(0, len(message), piece):
        parser.feed(message[i : i + piece])
    parser.close()
    return policy.reply


def beta_keys(gpg) -> list[RecipientKeys]:
    return [RecipientKeys("beta", {gpg.encryption_key_id("beta@keys.test"): "current key"})]


def dicom_mail(content_type: str = "application/dicom", encoding: str = "base64") -> bytes:
    body = base64.encodebytes(DICOM).replace(b"\n", b"\r\n") if encoding == "base64" else DICOM
    return (
        b"From: alpha@hub.test\r\nTo: beta@hub.test\r\nSubject: image\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\n'
        b"see attachment\r\n--b1\r\nContent-Type: "
        + content_type.encode()
        + b'; name="img.dcm"\r\nContent-Transfer-Encoding: '
        + encoding.encode()
        + b"\r\n\r\n"
        + body
        + b"\r\n--b1--\r\n"
    )


# ---- in memory -------------------------------------------------------------------------------


@pytest.mark.parametrize("piece", [1, 13, 1 << 20])
def test_right_key_accepted_wrong_key_refused(gpg, piece):
    right = pgp_mime("alpha@hub.test", "beta@hub.test", gpg.encrypt(DICOM, "beta@keys.test"))
    assert check(right, beta_keys(gpg), piece=piece) is None
    wrong = pgp_mime("alpha@hub.test", "beta@hub.test", gpg.encrypt(DICOM, "stranger@keys.test"))
    reply = check(wrong, beta_keys(gpg), piece=piece)
    assert reply.startswith("550 5.7.5 ") and gpg.encryption_key_id("stranger@keys.test") in reply
    assert gpg.encryption_key_id("beta@keys.test") in reply


def test_every_recipient_needs_its_key(gpg):
    both = [*beta_keys(gpg), RecipientKeys("alpha", {gpg.encryption_key_id("alpha@keys.test"): "current key"})]
    to_beta = pgp_mime("a@hub.test", "b@hub.test", gpg.encrypt(DICOM, "beta@keys.test"))
    reply = check(to_beta, both)
    assert reply.startswith("550 5.7.5 Not encrypted to site alpha's key"), reply
    to_both = pgp_mime("a@hub.test", "b@hub.test", gpg.encrypt(DICOM, "beta@keys.test", "alpha@keys.test"))
    assert check(to_both, both) is None
    no_key_registered = [RecipientKeys("gamma", {})]
    assert check(to_beta, no_key_registered) is None


def test_hidden_recipients_per_configuration(gpg):
    hidden = pgp_mime("a@hub.test", "b@hub.test", gpg.encrypt(DICOM, "beta@keys.test", extra=("--throw-keyids",)))
    reply = check(hidden, beta_keys(gpg))
    assert reply.startswith("550 5.7.1 Hidden recipients (key ID 0)"), reply
    assert check(hidden, beta_keys(gpg), allow_hidden=True) is None


@pytest.mark.parametrize(
    "content_type, encoding",
    [("application/dicom", "base64"), ("application/octet-stream", "base64"), ("application/octet-stream", "binary")],
)
def test_cleartext_dicom_refused(content_type, encoding):
    reply = check(dicom_mail(content_type, encoding), [RecipientKeys("beta", {})], piece=7)
    assert reply.startswith("554 5.7.1 Unencrypted DICOM refused: part 2 ("), reply
    assert check(b"Subject: hi\r\n\r\nplain text is fine\r\n", [RecipientKeys("beta", {})]) is None


def test_malformed_pgp_mime(gpg):
    good = pgp_mime("a@hub.test", "b@hub.test", gpg.encrypt(b"x", "beta@keys.test"))
    cases = {
        good.replace(b"Version: 1", b"Version: 2"): "Version: 1",
        good.replace(b'protocol="application/pgp-encrypted"', b'protocol="application/pkcs7-mime"'): "protocol",
        good.replace(b"Content-Type: application/octet-stream", b"Content-Type: text/plain"): "second part",
        good.replace(
            b"--enc-boundary-42--", b"--enc-boundary-42\r\nContent-Type: text/plain\r\n\r\nx\r\n--enc-boundary-42--"
        ): "exactly two parts",
        good.replace(b"-----BEGIN PGP MESSAGE-----", b"-----BEGIN PGP SIGNATURE-----"): "neither",
    }
    for message, reason in cases.items():
        reply = check(message, beta_keys(gpg))
        assert reply is not None and reply.startswith("554 5.6.0 Malformed PGP/MIME") and reason in reply, reply


def test_reports_pass_by_their_parts_not_by_their_type():
    mdn = (
        b"Subject: read\r\nMIME-Version: 1.0\r\nContent-Type: multipart/report;"
        b' report-type=disposition-notification; boundary="r"\r\n\r\n--r\r\nContent-Type: text/plain\r\n\r\n'
        b"displayed\r\n--r\r\nContent-Type: message/disposition-notification\r\n\r\n"
        b"Final-Recipient: rfc822; beta@hub.test\r\nDisposition: manual-action/MDN-sent-manually; displayed\r\n"
        b"--r--\r\n"
    )
    assert check(mdn, [RecipientKeys("beta", {})]) is None
    carrying = mdn.replace(b"--r--", b"--r\r\nContent-Type: application/dicom\r\n\r\nDICM\r\n--r--")
    assert check(carrying, [RecipientKeys("beta", {})]).startswith("554 5.7.1 Unencrypted DICOM refused: part 3")


# ---- over SMTP against a real hub ------------------------------------------------------------


def send(hub, sender: str, rcpts: list[str], message: bytes, login: str = "alpha"):
    """(code, reply text) at the end of data."""
    client = smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=60)
    try:
        client.ehlo("gateway.test")
        client.login(login, PASSWORD)
        client.mail(sender)
        for rcpt in rcpts:
            code, text = client.rcpt(rcpt)
            assert code == 250, text
        code, text = client.data(message)
        return code, text.decode()
    finally:
        client.quit()


GRACE_14_DAYS = {"MAILHUB_DIRECTORY_KEY_GRACE_DAYS": "14"}


@pytest.fixture(scope="module")
def keyed_data(gpg, tmp_path_factory) -> Path:
    """A data folder with sites alpha, beta and gamma, alpha's key and beta's previous and current
    keys imported with the CLI; made once, each `keyed_hub` starts on a copy."""
    folder = tmp_path_factory.mktemp("keyed")
    hub = Hub(folder / "data", hub_env(folder / "data", **GRACE_14_DAYS))
    for name in ("alpha", "beta", "gamma"):
        hub.add_site(name, f"{name}@hub.test")
    for site, user in (("alpha", "alpha@keys.test"), ("beta", "beta-old@keys.test"), ("beta", "beta@keys.test")):
        hub.cli("site", "key", "import", site, str(gpg.export(user, folder / f"{user}.asc")))
    return hub.data_dir


@pytest.fixture
def keyed_hub(make_hub, keyed_data):
    hub = make_hub(**GRACE_14_DAYS)
    copy_data_folder(keyed_data, hub)
    return hub.start()


def test_smtp_policy_end_to_end(keyed_hub, gpg):
    hub = keyed_hub
    encrypted = gpg.encrypt(DICOM, "beta@keys.test")
    assert (
        send(hub, "alpha@hub.test", ["beta@hub.test"], pgp_mime("alpha@hub.test", "beta@hub.test", encrypted))[0] == 250
    )
    # the previous key is still valid in its grace period
    previous = gpg.encrypt(DICOM, "beta-old@keys.test")
    assert (
        send(hub, "alpha@hub.test", ["beta@hub.test"], pgp_mime("alpha@hub.test", "beta@hub.test", previous))[0] == 250
    )
    stale = gpg.encrypt(DICOM, "stranger@keys.test")
    code, text = send(hub, "alpha@hub.test", ["beta@hub.test"], pgp_mime("alpha@hub.test", "beta@hub.test", stale))
    assert code == 550 and text.startswith("5.7.5 Not encrypted to site beta's key"), text
    assert gpg.encryption_key_id("stranger@keys.test") in text and gpg.encryption_key_id("beta@keys.test") in text
    code, text = send(hub, "alpha@hub.test", ["beta@hub.test"], dicom_mail())
    assert code == 554 and text.startswith("5.7.1 Unencrypted DICOM refused"), text
    # a refused mail is not stored; the two accepted ones are
    assert hub.query("SELECT count(*) FROM mailbox") == [(2,)]
    assert "refused by the encryption policy" in hub.log_text()
    scraped = urllib.request.urlopen(f"http://127.0.0.1:{hub.ports['metrics']}/metrics", timeout=10).read().decode()
    assert 'mailhub_encryption_refusals_total{reason="wrong_key"} 1.0' in scraped
    assert 'mailhub_encryption_refusals_total{reason="cleartext_dicom"} 1.0' in scraped

    # no exemption by label or envelope: a report type, the null sender; a request to the directory
    # only is not stored, so not checked
    mdn = dicom_mail().replace(b"multipart/mixed;", b"multipart/report; report-type=disposition-notification;")
    assert send(hub, "alpha@hub.test", ["beta@hub.test"], mdn)[0] == 554
    assert send(hub, "", ["beta@hub.test"], dicom_mail())[0] == 554  # authenticated, null sender
    assert send(hub, "alpha@hub.test", ["directory@hub.test"], dicom_mail())[0] == 250

    # a site with the policy off takes cleartext; gamma has no key: encrypted mail is not checked
    hub.cli("site", "policy", "gamma", "--encryption", "off")
    # the key cache reloads within 0.5 s: until then the mail is refused (and not stored)
    wait_for(lambda: send(hub, "alpha@hub.test", ["gamma@hub.test"], dicom_mail())[0] == 250, 5, 0.1)
    code, text = send(hub, "alpha@hub.test", ["gamma@hub.test", "beta@hub.test"], dicom_mail())
    assert code == 554, text  # beta is still under the policy
    hub.cli("site", "policy", "gamma", "--encryption", "default")
    wait_for(lambda: send(hub, "alpha@hub.test", ["gamma@hub.test"], dicom_mail())[0] == 554, 5, 0.1)


def test_stale_key_after_the_grace_period(make_hub, gpg, tmp_path):
    hub = make_hub(sites=ALPHA_BETA, MAILHUB_DIRECTORY_KEY_GRACE_DAYS="0")  # the previous key is invalid at once
    for user in ("beta-old@keys.test", "beta@keys.test"):
        hub.cli("site", "key", "import", "beta", str(gpg.export(user, tmp_path / f"{user}.asc")))
    hub.start()
    stale = pgp_mime("alpha@hub.test", "beta@hub.test", gpg.encrypt(DICOM, "beta-old@keys.test"))
    code, text = send(hub, "alpha@hub.test", ["beta@hub.test"], stale)
    assert code == 550 and gpg.encryption_key_id("beta-old@keys.test") in text, text
    assert f"expected {gpg.encryption_key_id('beta@keys.test')} (current key" in text, text


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(field)


@pytest.mark.one_engine("about the serve process's memory, not the index")
def test_200_mb_encrypted_mail_checked_in_bounded_memory(make_hub, keyed_data, gpg):
    hub = make_hub(process=True, **GRACE_14_DAYS)  # a process of its own: its memory is measured
    copy_data_folder(keyed_data, hub)
    hub.start()
    payload_bytes = 150 * 1000 * 1000  # about 200 MB once armored
    header, trailer = pgp_mime("alpha@hub.test", "beta@hub.test", b"@@BODY@@").split(b"@@BODY@@")
    zeros = subprocess.Popen(["head", "-c", str(payload_bytes), "/dev/zero"], stdout=subprocess.PIPE)
    encrypt = subprocess.Popen(
        [
            "gpg",
            "--homedir",
            str(gpg.home),
            "--batch",
            "--quiet",
            "--trust-model",
            "always",
            "--compress-algo",
            "none",
            "--encrypt",
            "--armor",
            "--recipient",
            "beta@keys.test",
            "--output",
            "-",
        ],
        stdin=zeros.stdout,
        stdout=subprocess.PIPE,
    )
    zeros.stdout.close()
    client = RawSMTP(hub.smtp_port, timeout=120)
    sent = 0
    try:
        client.ehlo()
        assert client.auth_plain("alpha").startswith(b"235")
        assert client.command("MAIL FROM:<alpha@hub.test>").startswith(b"250")
        assert client.command("RCPT TO:<beta@hub.test>").startswith(b"250")
        assert client.command("DATA").startswith(b"354")
        client.send(header)
        while chunk := encrypt.stdout.read(1 << 20):
            data = chunk.replace(b"\n", b"\r\n")
            client.send(data)
            sent += len(data)
        client.send(trailer + b".\r\n")
        reply = client.reply()
    finally:
        encrypt.wait(60)
        zeros.wait(60)
        client.close()
    queue_id_from(reply)
    peak = _status_kb(hub.proc.pid, "VmHWM") * 1024
    print(f"\n{sent / MB:.0f} MiB encrypted mail accepted; hub peak RSS {peak / MB:.1f} MiB")
    assert sent > 190 * MB
    assert peak < 100 * MB, f"hub peak RSS {peak / MB:.1f} MiB"


def test_bdat_goes_through_the_same_policy(keyed_hub):
    client = RawSMTP(keyed_hub.smtp_port)
    try:
        client.ehlo()
        assert client.auth_plain("alpha").startswith(b"235")
        assert client.command("MAIL FROM:<alpha@hub.test>").startswith(b"250")
        assert client.command("RCPT TO:<beta@hub.test>").startswith(b"250")
        message = dicom_mail()
        half = len(message) // 2
        client.send(f"BDAT {half}\r\n".encode() + message[:half])
        assert client.reply().startswith(b"250")
        client.send(f"BDAT {len(message) - half} LAST\r\n".encode() + message[half:])
        reply = client.reply()
        assert reply.startswith(b"554 5.7.1 Unencrypted DICOM refused"), reply
    finally:
        client.close()


@pytest.fixture(scope="module")
def sample_mails(gpg):
    return [pgp_mime("a@hub.test", "b@hub.test", gpg.encrypt(b"x", "beta@keys.test")), dicom_mail()]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mangled_mails_never_break_the_policy(gpg, sample_mails, data):
    """Whatever the bytes, the policy ends with a verdict or none, never an exception."""
    base = data.draw(st.sampled_from(sample_mails))
    cut = data.draw(st.integers(0, len(base)))
    noise = data.draw(st.binary(max_size=200))
    keep = data.draw(st.integers(0, len(base) - cut))
    message = base[:cut] + noise + base[cut + keep :]
    reply = check(message, beta_keys(gpg), piece=data.draw(st.integers(1, 4096)))
    assert reply is None or reply[:3] in ("550", "554")
