# Receipts and reports of the network pass the encryption policy untouched, because their parts are
# clear reports, not because of their type or envelope: delivery status notifications as a real
# Postfix writes them (headers or the whole PGP/MIME original returned), sent to a running hub from
# the null sender; the hub's own bounces; its signed directory mails; read receipts (RFC 8098) as
# gateways and mail readers send them; PGP/MIME mails of the load-test corpus (pgpy). A Postfix DSN
# returning a clear DICOM mail is refused like any other mail carrying it.
import os
import re
import shutil
import smtplib
import tempfile
import time
from pathlib import Path

import pytest
from test_directory import pop3_messages, request_directory

from directory.policy import RecipientKeys
from loadtest.thirdparty import POSTFIX_MAILDIR_OVERRIDES, POSTFIX_VIRTUAL_MASTER, _mail_ids, postfix_instance
from relay.mime.stream import MimeStreamParser
from relay.outbound.bounce import FailedRecipient, build_dsn, header_of
from relay.policy.encryption import EncryptionPolicy

from conftest import ALPHA_BETA, PASSWORD, wait_for
from mailshapes import KEY, OTHER_KEY, armored, dicom_attachment, mail, multipart, openpgp, pgp_mime, text

# Every test that starts a hub runs on SQLite and again on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_engines

BETA = [RecipientKeys("beta", {KEY: "current key"})]


def verdict(message: bytes, recipients=BETA):
    policy = EncryptionPolicy(recipients, False)
    parser = MimeStreamParser(policy)
    for i in range(0, len(message), 65536):
        parser.feed(message[i : i + 65536])
    parser.close()
    return None if policy.reply is None else (policy.reason, policy.reply)


@pytest.fixture(scope="module")
def postfix_dsns():
    """Delivery status notifications written by a real Postfix: three mails to a domain whose
    transport fails them (error:5.1.1), bounced to a domain delivered into a maildir. (Its folder
    is not under pytest's, which concurrent pytest sessions make unreadable to the postfix user.)"""
    workdir = Path(tempfile.mkdtemp(prefix="mh-pf-dsn-"))
    try:
        yield _bounce_three_mails(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _bounce_three_mails(workdir: Path) -> dict[str, bytes]:
    uid, gid = _mail_ids()
    box = workdir / "postfix" / "mail"
    box.mkdir(parents=True)
    os.chown(box, uid, gid)

    def main_cf(text_):
        lines = [ln for ln in text_.splitlines() if not ln.startswith(("virtual_transport", "relay_domains"))]
        return (
            "\n".join(lines)
            + "\n"
            + POSTFIX_MAILDIR_OVERRIDES.format(domains="sites.test", mail=box, uid=uid, gid=gid)
            + (
                "relay_domains = gone.test\nsmtpd_reject_unlisted_recipient = no\n"
                "transport_maps = inline:{ {gone.test = error:5.1.1 no such gateway} }\n"
            )
        )

    originals = {
        "pgp-full": mail(
            pgp_mime(armored(openpgp((OTHER_KEY,), size=4000))),
            b"From: alpha@sites.test\r\nTo: x@gone.test\r\nSubject: pgp-full\r\nMIME-Version: 1.0\r\n",
        ),
        "pgp-hdrs": mail(
            pgp_mime(), b"From: alpha@sites.test\r\nTo: x@gone.test\r\nSubject: pgp-hdrs\r\nMIME-Version: 1.0\r\n"
        ),
        "dicom": mail(
            multipart(b"mixed", [text(), dicom_attachment()]),
            b"From: alpha@sites.test\r\nTo: x@gone.test\r\nSubject: dicom\r\nMIME-Version: 1.0\r\n",
        ),
    }
    with postfix_instance(workdir, main_cf, POSTFIX_VIRTUAL_MASTER) as port:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            for subject, message in originals.items():
                options = ["RET=HDRS"] if subject == "pgp-hdrs" else ["RET=FULL"]
                client.sendmail("alpha@sites.test", ["x@gone.test"], message, mail_options=options)
        new = box / "box" / "new"
        files = wait_for(
            lambda: len(list(new.glob("*"))) == 3 and list(new.glob("*")),
            timeout=60,
            interval=0.1,
            message="Postfix bounced the three mails",
        )
    dsns = {}
    for path in files:
        raw = path.read_bytes().replace(b"\n", b"\r\n")  # Postfix stores LF; SMTP carries CRLF
        subject = re.search(rb"Subject: (pgp-full|pgp-hdrs|dicom)", raw).group(1).decode()
        dsns[subject] = raw
    return dsns


def test_postfix_dsns_pass_by_their_parts(postfix_dsns):
    for subject, raw in postfix_dsns.items():
        assert b"multipart/report; report-type=delivery-status" in raw, subject
        assert b"Content-Type: message/delivery-status" in raw and b"Status: 5.1.1" in raw
    assert b"Content-Type: message/rfc822" in postfix_dsns["pgp-full"]
    assert b"Content-Type: text/rfc822-headers" in postfix_dsns["pgp-hdrs"]
    # the returned original is encrypted to the original recipient's key: right for returned content
    assert verdict(postfix_dsns["pgp-full"]) is None
    assert verdict(postfix_dsns["pgp-hdrs"]) is None
    reason, reply = verdict(postfix_dsns["dicom"])
    assert reason == "cleartext_dicom" and "part 3.2 (application/dicom" in reply, reply


def test_postfix_dsns_from_the_null_sender_at_a_running_hub(make_hub, postfix_dsns):
    hub = make_hub(sites=ALPHA_BETA).start()
    with smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30) as client:
        client.login("beta", PASSWORD)
        for subject, expected in (("pgp-full", 250), ("pgp-hdrs", 250), ("dicom", 554)):
            client.mail("")
            assert client.rcpt("alpha@hub.test")[0] == 250
            code, reply = client.data(postfix_dsns[subject])
            assert code == expected, (subject, reply)
            if code != 250:
                assert reply.startswith(b"5.7.1 Unencrypted DICOM refused"), reply
    assert hub.query("SELECT count(*) FROM mailbox") == [(2,)]


def test_the_hubs_own_bounces_pass():
    original = mail(pgp_mime(), b"From: alpha@hub.test\r\nTo: x@remote.test\r\nSubject: study\r\nMIME-Version: 1.0\r\n")
    failures = [
        FailedRecipient("x@remote.test", 550, "550 5.1.1 <x@remote.test>: unknown", "mx.remote.test"),
        FailedRecipient("y@remote.test", 451, "4.4.1 connection timed out"),
    ]
    for delayed in (False, True):
        dsn = build_dsn(
            reporting_mta="hub.test",
            sender="alpha@hub.test",
            queue_id="Q1",
            arrival=time.time(),
            failures=failures,
            delayed=delayed,
            original_header=header_of(original),
            retry_until=time.time() + 3600,
        )
        assert verdict(dsn) is None, dsn


def test_directory_mails_pass(make_hub, tmp_path):
    hub = make_hub(sites=ALPHA_BETA).start()
    request_directory(hub, "alpha")
    messages = wait_for(
        lambda: pop3_messages(hub, "alpha"), timeout=30, interval=0.1, message="directory mail in alpha's mailbox"
    )
    assert messages and b"multipart/signed" in messages[0] and b"application/pgp-keys" in messages[0]
    for raw in messages:
        assert verdict(raw) is None


THUNDERBIRD_MDN = (
    b"From: Beta Gateway <beta@hub.test>\r\nTo: alpha@hub.test\r\nSubject: Return Receipt (displayed) - study\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=disposition-notification;\r\n"
    b' boundary="------------z8x0Wb4k"\r\n\r\nThis is a multi-part message in MIME format.\r\n'
    b"--------------z8x0Wb4k\r\nContent-Type: text/plain; charset=UTF-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
    b"This is a Return Receipt for the mail that you sent to <beta@hub.test>.\r\n\r\n"
    b'--------------z8x0Wb4k\r\nContent-Type: message/disposition-notification; name="MDNPart2.txt"\r\n'
    b"Content-Disposition: inline\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
    b"Reporting-UA: gateway.beta; Thunderbird 115.6.0\r\nFinal-Recipient: rfc822;beta@hub.test\r\n"
    b"Original-Message-ID: <study-7@alpha.test>\r\nDisposition: manual-action/MDN-sent-manually; displayed\r\n\r\n"
    b'--------------z8x0Wb4k\r\nContent-Type: text/rfc822-headers; name="MDNPart3.txt"\r\n'
    b"Content-Disposition: inline\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
    b"Subject: study\r\nFrom: alpha@hub.test\r\nTo: beta@hub.test\r\nMessage-ID: <study-7@alpha.test>\r\n\r\n"
    b"--------------z8x0Wb4k--\r\n"
)


def gateway_mdn(returned: bytes) -> bytes:
    """An RFC 8098 MDN as a DICOM gateway sends it for a processed study, the original returned."""
    return (
        b"From: <beta@hub.test>\r\nTo: <alpha@hub.test>\r\nSubject: Disposition notification\r\n"
        b"Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=disposition-notification; boundary="mdn-1"\r\n\r\n'
        b"--mdn-1\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nThe study was received and processed.\r\n"
        b"--mdn-1\r\nContent-Type: message/disposition-notification\r\n\r\n"
        b"Reporting-UA: gateway.beta; DICOM gateway 3.1\r\nOriginal-Recipient: rfc822;beta@hub.test\r\n"
        b"Final-Recipient: rfc822;beta@hub.test\r\nOriginal-Message-ID: <study-7@alpha.test>\r\n"
        b"Disposition: automatic-action/MDN-sent-automatically; processed\r\n\r\n"
        b"--mdn-1\r\nContent-Type: message/rfc822\r\n\r\n" + returned + b"\r\n--mdn-1--\r\n"
    )


def test_read_receipts_pass_and_cannot_carry_data():
    assert verdict(THUNDERBIRD_MDN) is None
    original = mail(pgp_mime(armored(openpgp((OTHER_KEY,)))))
    assert verdict(gateway_mdn(original)) is None
    reason, reply = verdict(gateway_mdn(mail(multipart(b"mixed", [dicom_attachment()]))))
    assert reason == "cleartext_dicom" and "part 3.1" in reply


def test_load_test_corpus_mails_pass():
    from loadtest import pgpmime

    key = pgpmime.new_site_key("beta", "beta@hub.test")
    key_id = next(iter(key.subkeys))  # the ECDH encryption subkey
    message = pgpmime.pgp_mime_mail(
        sender="alpha@hub.test",
        recipient="beta@hub.test",
        public_key=key.pubkey,
        files=[("1.dcm", b"\0" * 128 + b"DICM" + b"x" * 5000)],
        set_id="1.2.3",
        set_part=1,
        set_total=1,
        message_id="m1@alpha",
        subject="study",
    )
    assert verdict(message, [RecipientKeys("beta", {key_id.upper(): "current key"})]) is None
    reason, _ = verdict(message, [RecipientKeys("beta", {OTHER_KEY: "current key"})])
    assert reason == "wrong_key"


def test_the_hubs_rotation_announcement_passes(tmp_path):
    """A key-rotation announcement (helper E's directory mail: two hub keys in the application/pgp-keys
    part, two signatures, a participant's armored key in the text) passes as it is, also forwarded."""
    from directory import HubKeySource, directory_mail, rotate_hub_key
    from directory.document import FORMAT

    addresses = ["directory@hub.test"]
    HubKeySource(tmp_path, addresses, 86400).get()
    rotate_hub_key(tmp_path, addresses)
    keys = HubKeySource(tmp_path, addresses, 86400).get()
    armored_keys, _ = keys.published(time.time(), True)
    document = {
        "format": FORMAT,
        "version": 7,
        "generated_at": "2026-12-05T10:00:00Z",
        "hub": {
            "fingerprint": keys.fingerprint,
            "directory_addresses": addresses,
            "key_rotation": {
                "previous_fingerprint": keys.previous_fingerprint,
                "rotated_at": "2026-12-05T10:00:00Z",
                "previous_signs_until": "2026-12-06T10:00:00Z",
            },
        },
        "participants": [
            {
                "name": "beta",
                "addresses": ["beta@hub.test"],
                "key_fingerprint": keys.fingerprint,
                "key_imported_at": "2026-12-01T10:00:00Z",
                "public_key": armored_keys,
            }
        ],
    }
    raw = directory_mail(document, keys, "directory@hub.test", "beta@hub.test", "hub key rotation", announcement=True)
    assert raw.count(b"-----BEGIN PGP PUBLIC KEY BLOCK-----") >= 2 and b"application/pgp-keys" in raw
    assert verdict(raw) is None
    forwarded = mail(
        multipart(b"mixed", [text(b"FYI, the hub's new key.\r\n"), b"Content-Type: message/rfc822\r\n\r\n" + raw])
    )
    assert verdict(forwarded) is None
    swapped = raw.replace(b"Content-Type: application/pgp-keys", b"Content-Type: application/octet-stream")
    assert verdict(swapped)[0] == "cleartext_data"  # the same key block under another label is not harmless
