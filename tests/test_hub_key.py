# The hub's public key is public (issue 22): a gateway with real GnuPG and no prior knowledge but
# the hub key's fingerprint obtains the key by each documented path (`mailhub directory export-key`,
# GET /hub-key.asc and the Web Key Directory with `gpg --fetch-keys`, the application/pgp-keys part
# of a directory mail), verifies a directory reply with it and refuses a tampered one. Then the
# key's rotation: announced to every site in a mail signed by both keys, the new key certified by
# the old one (so a gateway that trusts only the old key accepts the new one), both keys signing
# during the grace period and the old one retired after it, and a rotation cut off by SIGKILL at
# each of its steps leaving one consistent state.
# gpg --locate-keys cannot be pointed at a loopback port (it asks DNS for the domain and speaks
# HTTPS on port 443), so the WKD URL is computed by GnuPG's own gpg-wks-client, its host part
# replaced by the hub's loopback HTTP port, and fetched with gpg --fetch-keys.
import email
import http.client
import json
import logging
import smtplib
import subprocess
import sys
import time

import pytest
from test_directory import document_of, pop3_messages, request_directory, signed_parts

from mailhub import control

from conftest import ALPHA_BETA, PASSWORD, REPO, wait_for
from gpgutil import Gpg

WKS_CLIENT = "/usr/lib/gnupg/gpg-wks-client"


class Gateway(Gpg):
    """A site's gateway: a GnuPG home that pins the hub key by fingerprint."""

    def fingerprints_known(self) -> set[str]:
        out = self.run("--with-colons", "--list-keys", check=False).stdout.decode()
        lines = out.splitlines()
        return {
            line.split(":")[9]
            for i, line in enumerate(lines)
            if line.startswith("fpr:") and i > 0 and lines[i - 1].startswith("pub:")
        }

    def fetch(self, url: str) -> None:
        result = self.run("--fetch-keys", url, check=False)
        assert result.returncode == 0, result.stderr.decode(errors="replace")

    def check(self, signature: bytes, signed: bytes, *options: str) -> tuple[int, str]:
        """gpg --verify of a detached signature: (exit status, status lines)."""
        (self.home / "check.sig").write_bytes(signature)
        (self.home / "check.dat").write_bytes(signed)
        result = self.run(
            "--status-fd",
            "1",
            *options,
            "--verify",
            str(self.home / "check.sig"),
            str(self.home / "check.dat"),
            check=False,
        )
        return result.returncode, result.stdout.decode()

    def close(self) -> None:
        subprocess.run(["gpgconf", "--homedir", str(self.home), "--kill", "all"], capture_output=True, timeout=30)
        super().close()


@pytest.fixture
def gateways():
    made = []

    def make() -> Gateway:
        made.append(Gateway())
        return made[-1]

    yield make
    for gateway in made:
        gateway.close()


def valid_signers(status: str) -> list[str]:
    return [line.split()[2] for line in status.splitlines() if line.startswith("[GNUPG:] VALIDSIG ")]


def http_get(hub, path: str, method: str = "GET") -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", hub.ports["metrics"], timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def wkd_url(hub, address: str, method: str) -> str:
    """GnuPG's own WKD URL for `address`, its host replaced by the hub's loopback HTTP port."""
    url = subprocess.run(
        [WKS_CLIENT, "--print-wkd-url", address], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()
    local, domain = address.split("@")
    advanced = f"https://openpgpkey.{domain}/.well-known/openpgpkey/{domain}/hu/"
    assert url.startswith(advanced) and url.endswith(f"?l={local}"), url
    base = f"http://127.0.0.1:{hub.ports['metrics']}/.well-known/openpgpkey/"
    return base + (f"{domain}/hu/" if method == "advanced" else "hu/") + url[len(advanced) :]


def key_part(raw: bytes) -> bytes:
    message = email.message_from_bytes(raw)
    mixed, _ = message.get_payload()
    (part,) = [p for p in mixed.get_payload() if p.get_content_type() == "application/pgp-keys"]
    assert part["Content-Transfer-Encoding"] == "7bit"
    return part.get_payload(decode=True)


def tampered(raw: bytes) -> bytes:
    """The mail with one character of its signed text part changed (a participant's address)."""
    changed = raw.replace(b"alpha@hub.test", b"alphq@hub.test", 1)
    assert changed != raw
    return changed


def test_a_gateway_knowing_only_the_fingerprint_gets_the_key_by_every_path(make_hub, gateways, tmp_path):
    hub = make_hub(sites=ALPHA_BETA).start()
    pinned = hub.cli("directory", "fingerprint").stdout.strip()  # told to the site out of band

    exported = hub.cli("directory", "export-key")
    assert exported.stdout.startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----\nComment: current hub key " + pinned)
    assert f"current hub key: {pinned}" in exported.stderr
    assert hub.cli("directory", "export-key", "--fingerprint-only").stdout == pinned + "\n"
    hub.cli("directory", "export-key", "--binary", "--output", str(tmp_path / "hub-key.gpg"))
    assert "directory sent to your mailbox" in request_directory(hub, "beta")
    (reply,) = pop3_messages(hub, "beta")
    signed, signature = signed_parts(reply)

    sources = {
        "export-key": lambda g: g.import_key(exported.stdout.encode()),
        "export-key --binary": lambda g: g.import_key((tmp_path / "hub-key.gpg").read_bytes()),
        "GET /hub-key.asc": lambda g: g.fetch(f"http://127.0.0.1:{hub.ports['metrics']}/hub-key.asc"),
        "WKD direct": lambda g: g.fetch(wkd_url(hub, "directory@hub.test", "direct")),
        "WKD advanced": lambda g: g.fetch(wkd_url(hub, "directory@hub.test", "advanced")),
        "application/pgp-keys part": lambda g: g.import_key(key_part(reply)),
    }
    for name, obtain in sources.items():
        gateway = gateways()
        obtain(gateway)
        assert gateway.fingerprints_known() == {pinned}, name
        code, status = gateway.check(signature, signed)
        assert code == 0 and valid_signers(status) == [pinned], (name, status)
        code, status = gateway.check(*reversed(signed_parts(tampered(reply))))
        assert code != 0 and "[GNUPG:] BADSIG" in status and not valid_signers(status), (name, status)
    assert document_of(reply)["hub"] == {
        "fingerprint": pinned,
        "directory_addresses": ["directory@hub.test"],
        "key_rotation": None,
    }

    # the HTTP side: types, HEAD, the WKD policy files, nothing for other names
    status, headers, body = http_get(hub, "/hub-key.asc")
    assert status == 200 and headers["Content-Type"] == "application/pgp-keys" and body == exported.stdout.encode()
    wkd_path = wkd_url(hub, "directory@hub.test", "direct").split(str(hub.ports["metrics"]), 1)[1]
    status, headers, body = http_get(hub, wkd_path)
    assert status == 200 and headers["Content-Type"] == "application/octet-stream"
    assert body == (tmp_path / "hub-key.gpg").read_bytes()
    status, headers, head = http_get(hub, wkd_path, "HEAD")
    assert status == 200 and head == b"" and int(headers["Content-Length"]) == len(body)
    for policy in ("/.well-known/openpgpkey/policy", "/.well-known/openpgpkey/hub.test/policy"):
        assert http_get(hub, policy)[:1] == (200,)
    other = wkd_url(hub, "alpha@hub.test", "direct").split(str(hub.ports["metrics"]), 1)[1]
    for missing in (
        other,
        "/.well-known/openpgpkey/other.test/hu/" + wkd_path.rsplit("/", 1)[1],
        "/hub-signing-key.asc",
        "/hub-key.asc/../hub-signing-key.asc",
    ):
        assert http_get(hub, missing)[0] == 404, missing


def test_the_directory_mail_with_its_key_part_passes_the_encryption_policy(make_hub):
    """A site forwarding the hub's signed directory to another site: the mail, key part and
    signature included, is not refused by the hub's own policy."""
    hub = make_hub(sites=ALPHA_BETA).start()
    signed = hub.cli("directory", "export", "--format", "signed").stdout.encode()
    client = smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30)
    try:
        client.ehlo("gateway.test")
        client.login("alpha", PASSWORD)
        client.mail("alpha@hub.test")
        assert client.rcpt("beta@hub.test")[0] == 250
        code, reply = client.data(b"From: alpha@hub.test\r\nTo: beta@hub.test\r\n" + signed)
        assert code == 250, reply
    finally:
        client.quit()


def test_rotation_is_announced_signed_by_both_keys_and_the_old_key_retires(make_hub, gateways, tmp_path):
    hub = make_hub(sites=ALPHA_BETA, MAILHUB_DIRECTORY_HUB_KEY_GRACE_DAYS="1").start()
    old = hub.cli("directory", "fingerprint").stdout.strip()
    gateway = gateways()  # pins the old key, the only hub key it ever received out of band
    gateway.import_key(hub.cli("directory", "export-key").stdout.encode())
    trusting_old = ("--trust-model", "pgp", "--trusted-key", old)

    rotated = hub.cli("directory", "rotate-key")
    new = rotated.stdout.strip()
    assert new != old and f"hub key rotated: {old} -> {new}" in rotated.stderr
    # the command asked the running hub over the control socket, which announced it before answering
    assert (
        "The running hub announced the rotation to 2 site(s), in a mail signed by both keys (queued as "
        in rotated.stderr
    ), rotated.stderr
    assert (hub.data_dir / "hub-keys" / f"{old}.asc").stat().st_mode & 0o777 == 0o600
    wait_for(
        lambda: f"hub key rotation {old} -> {new} announced to 2 site(s)" in hub.log_text(),
        interval=0.1,
        message=lambda: f"the rotation announced to 2 sites\n{hub.log_text()[-2000:]}",
    )
    assert hub.query("SELECT count(*) FROM mailbox") == [(2,)]
    announcements = {login: pop3_messages(hub, login) for login in ("alpha", "beta")}
    assert all(len(mails) == 1 for mails in announcements.values())
    raw = announcements["alpha"][0]
    assert announcements["beta"][0].split(b"\r\n\r\n", 1)[1] == raw.split(b"\r\n\r\n", 1)[1]  # one stored mail
    headers = email.message_from_bytes(raw)
    assert headers["Subject"].startswith("Hub signing key rotation")
    assert headers["X-DICOM-Mail-Hub-Key-Rotation"] == f"{old} -> {new}"
    document = document_of(raw)
    assert document["hub"]["fingerprint"] == new
    assert document["hub"]["key_rotation"]["previous_fingerprint"] == old

    # the gateway knows only the old key: the old key's signature checks, the new one is unknown
    signed, signature = signed_parts(raw)
    code, status = gateway.check(signature, signed, *trusting_old)
    assert valid_signers(status) == [old] and "[GNUPG:] ERRSIG" in status and code != 0, status
    # it imports the keys the announcement carries: both signatures check, and the new key is valid
    # through the old key's certification (TRUST_FULLY), not because it came in the mail
    gateway.import_key(key_part(raw))
    assert gateway.fingerprints_known() == {old, new}
    code, status = gateway.check(signature, signed, *trusting_old)
    assert code == 0 and sorted(valid_signers(status)) == sorted([old, new]), status
    assert status.count("[GNUPG:] TRUST_ULTIMATE") == 1 and status.count("[GNUPG:] TRUST_FULLY") == 1, status
    sigs = gateway.run("--with-colons", "--check-sigs", new).stdout.decode()
    assert any(line.startswith("sig:!:") and line.split(":")[4] == old[-16:] for line in sigs.splitlines()), sigs
    code, status = gateway.check(*reversed(signed_parts(tampered(raw))), *trusting_old)
    assert code != 0 and "[GNUPG:] BADSIG" in status and not valid_signers(status), status

    # during the grace period every directory mail is signed by both, and both keys are published
    request_directory(hub, "beta")
    reply = pop3_messages(hub, "beta")[-1]
    code, status = gateway.check(*reversed(signed_parts(reply)), *trusting_old)
    assert code == 0 and sorted(valid_signers(status)) == sorted([old, new]), status
    fresh = gateways()
    fresh.fetch(f"http://127.0.0.1:{hub.ports['metrics']}/hub-key.asc")
    assert fresh.fingerprints_known() == {old, new}
    assert f"previous hub key: {old}" in hub.cli("directory", "export-key").stderr

    # a restart announces nothing again
    assert hub.stop() == 0
    hub.start()
    request_directory(hub, "alpha")
    # what the update loop looks for once a second, asked now: nothing is due
    assert control.request(hub.data_dir, "hub-key-announce")["kind"] is None
    assert hub.query("SELECT count(*) FROM mailbox") == [(4,)]  # 2 announcements, 2 replies

    # after the grace period only the new key signs and is published; the old one stays on disk
    hub.stop()
    hub.env["MAILHUB_DIRECTORY_HUB_KEY_GRACE_DAYS"] = "0"
    hub.env["MAILHUB_DIRECTORY_MIN_REQUEST_INTERVAL"] = "0"
    hub.start()
    request_directory(hub, "beta")
    reply = pop3_messages(hub, "beta")[-1]
    code, status = gateway.check(*reversed(signed_parts(reply)), *trusting_old)
    assert code == 0 and valid_signers(status) == [new], status
    assert key_part(reply).replace(b"\r\n", b"\n") == http_get(hub, "/hub-key.asc")[2].rstrip(b"\n")
    fresh = gateways()
    fresh.import_key(key_part(reply))
    assert fresh.fingerprints_known() == {new}
    shown = hub.cli("directory", "export-key").stderr
    assert f"previous hub key: {old}" in shown and "retired since" in shown
    assert (hub.data_dir / "hub-keys" / f"{old}.asc").exists()


def test_a_rotation_not_yet_announced_blocks_the_next_one(make_hub):
    hub = make_hub(sites=ALPHA_BETA)
    first = hub.cli("directory", "fingerprint").stdout.strip()
    rotated = hub.cli("directory", "rotate-key")
    assert "the hub is not running" in rotated.stderr and "announces the rotation" in rotated.stderr
    second = rotated.stdout.strip()
    refused = hub.cli("directory", "rotate-key", check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert f"the previous rotation ({first} -> {second}) is not announced to the sites yet" in refused.stderr
    assert "not announced to the sites yet" in hub.cli("directory", "export-key").stderr
    hub.start()  # announces it
    wait_for(
        lambda: "announced to 2 site(s)" in hub.log_text(),
        interval=0.1,
        message=lambda: f"the rotation announced to 2 sites\n{hub.log_text()[-2000:]}",
    )
    third = hub.cli("directory", "rotate-key").stdout.strip()
    assert len({first, second, third}) == 3
    forced = hub.cli("directory", "rotate-key", "--force")  # before the hub announced the third
    assert forced.returncode == 0 and "stops co-signing now" in forced.stderr


def test_a_rotation_that_cannot_write_says_so_and_changes_nothing(make_hub):
    hub = make_hub(sites=ALPHA_BETA)
    first = hub.cli("directory", "fingerprint").stdout.strip()
    (hub.data_dir / "hub-keys").write_text("in the way\n")  # the archive folder cannot be made
    failed = hub.cli("directory", "rotate-key", check=False)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert f"rotation not done, the hub key {first} stays current: File exists" in failed.stderr
    assert hub.cli("directory", "fingerprint").stdout.strip() == first
    (hub.data_dir / "hub-keys").unlink()
    assert hub.cli("directory", "rotate-key").stdout.strip() != first


_CUT_OFF = """
import os, signal, sys
from directory import rotate_hub_key
rotate_hub_key(sys.argv[1], ["directory@hub.test"],
               step=lambda name: name == sys.argv[2] and os.kill(os.getpid(), signal.SIGKILL))
"""


def test_a_rotation_killed_at_each_step_leaves_one_consistent_state(make_hub):
    from directory import load_hub_keys
    from directory.hub_key_rotation import STEPS

    outcomes = {}
    for step in STEPS:
        hub = make_hub(sites=ALPHA_BETA)
        old = hub.cli("directory", "fingerprint").stdout.strip()
        killed = subprocess.run(
            [sys.executable, "-c", _CUT_OFF, str(hub.data_dir), step],
            cwd=REPO,
            env=hub.env,
            capture_output=True,
            timeout=120,
        )
        assert killed.returncode == -9, killed.stderr
        keys = load_hub_keys(hub.data_dir, 86400)
        if keys.fingerprint == old:  # cut off before the commit: nothing changed
            assert keys.rotation() is None
            outcomes[step] = "old key current"
        else:  # after it: the whole rotation
            assert keys.previous.fingerprint == old and keys.in_grace()
            outcomes[step] = "rotated"
        hub.start()
        assert not list(hub.data_dir.glob(".hub-signing-key.asc.*")), "leftover removed at start"
        mails = 2 if outcomes[step] == "rotated" else 0
        wait_for(
            lambda: hub.query("SELECT count(*) FROM mailbox") == [(mails,)],
            interval=0.1,
            message=lambda: f"{mails} announcement(s) in the mailboxes\n{hub.log_text()[-2000:]}",
        )
        next_key = hub.cli("directory", "rotate-key").stdout.strip()  # and the next rotation works
        wait_for(
            lambda: f"-> {next_key} announced to 2 site(s)" in hub.log_text(),
            interval=0.1,
            message=lambda: f"the next rotation announced to 2 sites\n{hub.log_text()[-2000:]}",
        )
        hub.stop()
    print("rotation cut off by SIGKILL after each step:", json.dumps(outcomes))
    assert outcomes == {
        "generated": "old key current",
        "archived": "old key current",
        "written": "old key current",
        "committed": "rotated",
    }


def test_wkd_names_are_gnupgs():
    from directory import wkd_hash

    for address in (
        "directory@hub.test",
        "Directory@Hub.Test",
        "Joe.Doe@Example.ORG",
        "x@y.z",
        "teilnehmer-verzeichnis_2@klinik.example",
    ):
        printed = subprocess.run(
            [WKS_CLIENT, "--print-wkd-hash", address], capture_output=True, text=True, check=True, timeout=30
        ).stdout.split()[0]
        assert wkd_hash(address.split("@")[0]) == printed, address


def test_a_rotation_slower_than_a_second_still_certifies_the_new_key_validly(tmp_path, gateways):
    """The old key's certification is never older than the new key, however long before the key
    was made the rotation read its clock (here 30 s): GnuPG ignores a certification older than the
    key it certifies, and a gateway trusting the old key would find the new one of unknown
    validity. (Found as a flaky rotation test: the clock, read before the lock and the loading of
    the current key, was in the second before the new key's creation.)"""
    from directory import HubKeySource, rotate_hub_key

    addresses = ["directory@hub.test"]
    old = HubKeySource(tmp_path, addresses, 86400).get().fingerprint
    previous, new = rotate_hub_key(tmp_path, addresses, now=time.time() - 30)
    assert previous.fingerprint == old and new.certifier() == (old, pytest.approx(new.created, abs=0.001))
    gateway = gateways()
    gateway.import_key(previous.public_armored.encode())
    gateway.import_key(new.public_armored.encode())
    listing = gateway.run(
        "--trust-model", "pgp", "--trusted-key", old, "--with-colons", "--check-sigs", new.fingerprint
    )
    lines = listing.stdout.decode().splitlines()
    assert any(line.startswith("sig:!:") and line.split(":")[4] == old[-16:] for line in lines), lines
    assert [line.split(":")[1] for line in lines if line.startswith("pub:")] == ["f"], lines  # fully valid


def test_the_server_reloads_a_rotated_key_and_keeps_its_keys_when_the_file_goes_bad(tmp_path, caplog, gateways):
    from directory import HubKeySource, rotate_hub_key

    addresses = ["directory@hub.test", "directory@other.test"]  # one user ID per local domain
    source = HubKeySource(tmp_path, addresses, 86400)
    first = source.get().fingerprint
    assert source.get() is source.get()  # not read again while the file is unchanged
    previous, new = rotate_hub_key(tmp_path, addresses)
    assert previous.fingerprint == first
    keys = source.get()
    assert keys.fingerprint == new.fingerprint and keys.previous.fingerprint == first and keys.in_grace()
    gateway = gateways()
    gateway.import_key(keys.published()[0].encode())
    listing = gateway.run("--with-colons", "--check-sigs", new.fingerprint).stdout.decode().splitlines()
    uids = [i for i, line in enumerate(listing) if line.startswith("uid:")]
    assert [listing[i].split(":")[9] for i in uids] == [f"DICOM Mail Hub directory <{a}>" for a in addresses]
    for start, end in zip(uids, uids[1:] + [len(listing)]):  # each user ID certified by the old key
        assert any(line.startswith("sig:!:") and line.split(":")[4] == first[-16:] for line in listing[start:end]), (
            listing
        )
    (tmp_path / "hub-signing-key.asc").write_text("damaged\n")
    caplog.clear()  # only what the damaged file causes (not the warnings of the rotation above)
    with caplog.at_level("ERROR", logger="mailhub.directory"):
        assert all(source.get() is keys for _ in range(5))
    assert [r.getMessage().split(":")[0] for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"hub key file unreadable, still signing with {new.fingerprint}"
    ]
