# postmaster@ of every local domain reaches the operator (RFC 5321 4.5.1): lifecycle.operator_address
# (here beta's second address b2@hub.test) gets it from anyone, without AUTH or TLS and without the
# encryption policy, while other recipients still need a login; senders that are not logged-in
# sites are bounded by smtp.postmaster_max_message_size and smtp.postmaster_max_per_hour. Over real
# SMTP (raw socket) against an in-process hub; the rate window with an injected clock.
import socket

import pytest

from relay.smtp.postmaster import ALL_CLIENTS, GLOBAL_FACTOR, MAX_CLIENTS, PostmasterRate, is_postmaster
from relay.smtp.syntax import parse_path

from conftest import ALPHA_BETA_B2, RawSMTP, queue_id_from

# Every test that starts a hub runs on SQLite and again on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_engines

ATTACHMENT = (
    b"From: someone@elsewhere.example\r\nTo: postmaster@hub.test\r\nSubject: abuse report\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
    b"Content-Type: text/plain\r\n\r\nsee the attachment\r\n--b\r\nContent-Type: application/octet-stream\r\n"
    b"Content-Disposition: attachment; filename=data.bin\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    + b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=\r\n" * 20
    + b"--b--\r\n"
)


def operator_hub(make_hub, **overrides):
    settings = {"MAILHUB_LIFECYCLE_OPERATOR_ADDRESS": "b2@hub.test"} | overrides
    return make_hub(sites=ALPHA_BETA_B2, **settings).start()


def send(hub, rcpts: list[str], data: bytes, login: str | None = None, size: int | None = None) -> list[bytes]:
    """One transaction; the replies to RCPT (each) and, if one was accepted, to the end of data."""
    client = RawSMTP(hub.smtp_port)
    try:
        client.ehlo()
        if login:
            assert client.auth_plain(login).startswith(b"235")
        mail = "MAIL FROM:<someone@elsewhere.example>" if not login else f"MAIL FROM:<{login}@hub.test>"
        assert client.command(mail + (f" SIZE={size}" if size else "")).startswith(b"250")
        replies = [client.command(f"RCPT TO:<{rcpt}>") for rcpt in rcpts]
        if any(r.startswith(b"250") for r in replies):
            assert client.command("DATA").startswith(b"354")
            client.send(data + b".\r\n")
            replies.append(client.reply())
        client.command("QUIT")
        return replies
    finally:
        client.close()


def beta_mails(hub) -> list[tuple[str, str]]:
    return hub.query("SELECT m.queue_id, m.rcpt FROM mailbox m JOIN sites s ON s.id = m.site_id WHERE s.name = 'beta'")


def test_postmaster_reaches_the_operator_from_anyone_without_the_encryption_policy(make_hub):
    hub = operator_hub(make_hub)
    replies = send(hub, ["postmaster@hub.test", "beta@hub.test", "Postmaster"], ATTACHMENT)
    assert replies[0].startswith(b"250") and replies[2].startswith(b"250")
    assert replies[1].startswith(b"530 5.7.0")  # other recipients still need a login
    queue_id = queue_id_from(replies[3])
    assert beta_mails(hub) == [(queue_id, "b2@hub.test")]  # one mailbox entry, in the operator's mailbox
    assert b"application/octet-stream" in hub.stored(queue_id)
    # the same attachment from a site to the operator's site as such is under the policy
    refused = send(hub, ["beta@hub.test"], ATTACHMENT.replace(b"postmaster@", b"beta@"), login="alpha")
    assert refused[0].startswith(b"250") and refused[1][:1] == b"5", refused
    assert "refused by the encryption policy" in hub.log_text()
    # and from a logged-in site to postmaster it passes (PostMaster@HUB.TEST: any case)
    assert send(hub, ["PostMaster@HUB.TEST"], ATTACHMENT, login="alpha")[1].startswith(b"250")
    assert len(beta_mails(hub)) == 2


def test_postmaster_mail_from_outside_is_bounded_in_size_and_rate(make_hub):
    hub = operator_hub(
        make_hub, MAILHUB_SMTP_POSTMASTER_MAX_MESSAGE_SIZE="4K", MAILHUB_SMTP_POSTMASTER_MAX_PER_HOUR="2"
    )
    big = ATTACHMENT + b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=\r\n" * 200
    assert send(hub, ["postmaster@hub.test"], big, size=len(big))[0].startswith(b"552 5.3.4")  # SIZE= said so
    replies = send(hub, ["postmaster@hub.test"], big)  # (counted: its RCPT was taken)
    assert replies[0].startswith(b"250") and replies[1].startswith(b"552 5.3.4"), replies
    assert send(hub, ["postmaster@hub.test"], ATTACHMENT)[1].startswith(b"250")
    third = send(hub, ["postmaster@hub.test"], ATTACHMENT)
    assert third[0].startswith(b"450 4.7.1 Too many mails to postmaster"), third
    assert len(beta_mails(hub)) == 1
    # a logged-in site is neither capped in size nor counted
    assert send(hub, ["postmaster@hub.test"], big, login="alpha")[1].startswith(b"250")


def test_without_an_operator_address_postmaster_is_refused_with_the_setting_to_set(make_hub):
    hub = make_hub(sites=ALPHA_BETA_B2).start()
    (reply,) = send(hub, ["postmaster@hub.test"], ATTACHMENT)
    assert reply.startswith(b"550 5.1.1") and b"lifecycle.operator_address" in reply


def test_a_remote_operator_address_gets_postmaster_mail_through_the_relay(make_hub):
    with socket.socket() as closed:  # the next hop: bound, never listening (the mail stays queued)
        closed.bind(("127.0.0.1", 0))
        hub = operator_hub(
            make_hub,
            MAILHUB_LIFECYCLE_OPERATOR_ADDRESS="noc@ops.example",
            MAILHUB_RELAY_ROUTES=f"ops.example=127.0.0.1:{closed.getsockname()[1]}",
            MAILHUB_RELAY_MIN_BACKOFF="3600",
        )
        replies = send(hub, ["postmaster@hub.test"], ATTACHMENT)
        queue_id = queue_id_from(replies[1])
        assert hub.query("SELECT rcpt FROM outbound WHERE queue_id = ?", queue_id) == [("noc@ops.example",)]
        assert beta_mails(hub) == []
        # an operator address in a local domain that no site has: deferred, and the log says why
        hub.stop()
        hub.env["MAILHUB_LIFECYCLE_OPERATOR_ADDRESS"] = "nobody@hub.test"
        hub.start()
        (reply,) = send(hub, ["postmaster@hub.test"], ATTACHMENT)
        assert reply.startswith(b"451 4.3.0") and "neither a site's address nor relayed" in hub.log_text()


def test_postmaster_of_every_local_domain_and_the_window():
    domains = ["hub.test", "second.test"]
    assert all(is_postmaster(a, domains) for a in ("postmaster@hub.test", "POSTMASTER@Second.Test", "Postmaster"))
    assert not any(is_postmaster(a, domains) for a in ("postmaster@other.test", "postmasters@hub.test", "abuse"))
    assert parse_path("TO:<Postmaster>", "TO:", False) == ("Postmaster", {})
    assert isinstance(parse_path("FROM:<Postmaster>", "FROM:", True), str)  # a sender needs a domain
    rate = PostmasterRate(2)
    assert rate.take("192.0.2.1", 0.0) == 0 and rate.take("192.0.2.1", 10.0) == 0
    assert rate.take("192.0.2.1", 20.0) == 3580.0  # the first one leaves the window at 3600
    assert rate.take("192.0.2.2", 20.0) == 0  # per address
    assert rate.take("192.0.2.1", 3600.0) == 0


def test_the_postmaster_rate_counts_an_ipv6_64_as_one_client_and_caps_all_outsiders():
    rate = PostmasterRate(2)
    assert rate.take("2001:db8:1:2::1", 0.0) == 0 and rate.take("2001:db8:1:2:ffff::9", 1.0) == 0
    assert rate.take("2001:db8:1:2:abcd::1", 2.0) == 3598.0  # another address of the same /64
    assert rate.take("2001:db8:1:3::1", 2.0) == 0  # the next /64 is another client
    assert rate.take("::ffff:192.0.2.7", 3.0) == 0 and rate.take("192.0.2.7", 4.0) == 0
    assert rate.take("192.0.2.7", 5.0) > 0  # an IPv4-mapped address is its IPv4 address
    # all outside clients together: GLOBAL_FACTOR times the per-client limit per hour
    flood = PostmasterRate(2)
    taken = [flood.take(f"198.51.100.{n % 250}", float(n)) for n in range(GLOBAL_FACTOR * 2 + 5)]
    assert taken[: GLOBAL_FACTOR * 2] == [0.0] * (GLOBAL_FACTOR * 2) and all(t > 0 for t in taken[GLOBAL_FACTOR * 2 :])
    assert flood.take("198.51.100.99", 3600.0) == 0  # the first ones left the window


def test_the_postmaster_rate_forgets_the_oldest_clients_but_not_the_total():
    rate = PostmasterRate(1000)  # all-clients cap 20,000: not reached by these
    assert all(rate.take(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", 0.0) == 0 for n in range(MAX_CLIENTS + 5))
    assert len(rate._sent) == MAX_CLIENTS and len(rate._sent[ALL_CLIENTS]) == MAX_CLIENTS + 5
    assert rate.take("10.0.0.5", 1.0) == 0  # forgotten (among the oldest): counts afresh
