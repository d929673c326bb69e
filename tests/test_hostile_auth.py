# Password guessing over real sockets and real clients (smtplib, poplib, imaplib): failed logins
# slow their address down across connections and protocols (the delay grows, reconnecting does
# not reset it), too many failures block the (site, address) pair even for the right password,
# another address of the same site still logs in within 1 s, `mailhub auth blocks|unblock` show
# and lift blocks through the control socket, the password-check queue is bounded, and the failure
# log lines are rate-limited.
import imaplib
import poplib
import smtplib
import threading
import time

import pytest

from conftest import ALPHA_BETA, PASSWORD, make_message
from hostileutil import (
    ATTACKER,
    GOOD,
    IMAP4From,
    POP3From,
    good_gateway_imap,
    good_gateway_pop3,
    metric,
    metrics,
    smtp_from,
)
from pop3util import send


def try_login(hub, protocol: str, password: str, source: str = ATTACKER, site: str = "beta") -> tuple[bool, str, float]:
    """(logged in, the server's answer, seconds its login command took) for one login on a new
    connection (the time to connect and greet is left out: the penalty is what is measured)."""
    started = time.monotonic()
    try:
        if protocol == "smtp":
            client = smtp_from(hub.smtp_port, source)
            try:
                client.ehlo("guess.test")
                started = time.monotonic()
                code, reply = client.docmd("AUTH", "PLAIN " + _plain(site, password))
                return code == 235, f"{code} {reply.decode()}", time.monotonic() - started
            finally:
                client.close()
        if protocol == "pop3":
            client = POP3From(hub.ports["pop3"], source)
            try:
                client.user(site)
                started = time.monotonic()
                return True, client.pass_(password).decode(), time.monotonic() - started
            except poplib.error_proto as exc:
                return False, exc.args[0].decode(), time.monotonic() - started
            finally:
                client.close()
        client = IMAP4From(hub.ports["imap"], source)
        started = time.monotonic()
        try:
            typ, data = client.login(site, password)
            return True, data[0].decode(), time.monotonic() - started
        except imaplib.IMAP4.error as exc:
            text = exc.args[0]
            return False, text.decode() if isinstance(text, bytes) else str(text), time.monotonic() - started
        finally:
            client.shutdown()
    except (smtplib.SMTPException, OSError) as exc:
        raise AssertionError(f"{protocol} login from {source} broke: {exc!r}") from None


def _plain(user: str, password: str) -> str:
    import base64

    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


BLOCKED = {
    "smtp": "454 4.7.0 Temporary authentication failure: too many failed logins for this account from your "
    "address; try again later",
    "pop3": "-ERR [SYS/TEMP] too many failed logins for this account from your address; try again later",
    "imap": "[UNAVAILABLE] too many failed logins for this account from your address; try again later",
}
WRONG = {
    "smtp": "535 5.7.8 Authentication credentials invalid",
    "pop3": "-ERR [AUTH] invalid user name or password",
    "imap": "[AUTHENTICATIONFAILED] authentication failed",
}


# The first failure's delay there; each next one doubles it (the doubling is the point, not the size).
FIRST_DELAY = 0.1


def test_guessing_across_protocols_slows_the_address_then_blocks_the_pair(make_hub):
    hub = make_hub(
        sites=ALPHA_BETA,
        process=True,
        MAILHUB_AUTH_FAILURE_DELAY=str(FIRST_DELAY),
        MAILHUB_AUTH_MAX_FAILURES="5",
        MAILHUB_AUTH_BLOCK_TIME="600",
        MAILHUB_AUTH_PENALTY_HALF_LIFE="86400",
    ).start()
    send(hub, ["beta@hub.test"], make_message(20000))
    protocols = ["smtp", "pop3", "imap", "smtp", "pop3"]
    timings = []
    for n, protocol in enumerate(protocols):  # each on a new connection, alternating protocols
        ok, answer, took = try_login(hub, protocol, f"guess-{n}")
        assert not ok and answer.startswith(WRONG[protocol]), answer
        timings.append(took)
    # the failure replies are held back 0.1, 0.2, 0.4, 0.8, 1.6 s (each reply took at least that,
    # plus its password check, which is slow on a busy machine: the hub's own count of penalty
    # seconds shows the growth exactly); the 5th failure blocked the pair
    for n, took in enumerate(timings):
        assert FIRST_DELAY * 2**n - 0.05 < took < FIRST_DELAY * 2**n + 3.0, timings
    held = sum(
        metric(metrics(hub), "mailhub_login_penalty_seconds_total", protocol=p) for p in ("smtp", "pop3", "imap")
    )
    assert held == pytest.approx(FIRST_DELAY * (1 + 2 + 4 + 8 + 16), abs=0.05), (held, timings)
    # now the right password is refused too, unchecked, on every protocol, from that address
    for protocol in ("smtp", "pop3", "imap"):
        ok, answer, _ = try_login(hub, protocol, PASSWORD)
        assert not ok and BLOCKED[protocol] in answer, answer
    # ...while the same site from another address logs in and downloads within 1 s
    assert good_gateway_pop3(hub, GOOD) < 1.0
    assert good_gateway_imap(hub, GOOD) < 1.0
    # and another site from the attacked address is not blocked (only slowed)
    ok, _, _ = try_login(hub, "imap", PASSWORD, site="alpha")
    assert ok
    listing = hub.cli("auth", "blocks").stdout
    assert "127.0.0.1" in listing and "beta (10 min left, 5 failures)" in listing, listing
    scraped = metrics(hub)
    assert sum(metric(scraped, "mailhub_login_failures_total", protocol=p) for p in ("smtp", "pop3", "imap")) == 5
    assert metric(scraped, "mailhub_login_blocks_total") == 1
    assert all(
        metric(scraped, "mailhub_login_refused_total", protocol=p, reason="blocked") == 1
        for p in ("smtp", "pop3", "imap")
    )
    assert metric(scraped, "mailhub_login_penalties_total", protocol="smtp") >= 2
    log = hub.log_text()
    assert "failed login as 'beta' from 127.0.0.1, 5 for this account from this address: pair blocked" in log
    assert "mailhub auth unblock 127.0.0.1 --site beta" in log
    # lifting the pair's block lets the right password in again
    lifted = hub.cli("auth", "unblock", "127.0.0.1", "--site", "beta")
    assert lifted.stdout == "lifted: site 'beta' from 127.0.0.1\n"
    ok, _, _ = try_login(hub, "pop3", PASSWORD)
    assert ok
    # the address's penalty stays until it is lifted as a whole
    assert "127.0.0.1" in hub.cli("auth", "blocks").stdout
    assert hub.cli("auth", "unblock", "127.0.0.1").stdout == "lifted: 127.0.0.1\n"
    assert hub.cli("auth", "blocks").stdout == "no penalised addresses, no blocks\n"
    again = hub.cli("auth", "unblock", "127.0.0.1", check=False)
    assert (again.returncode, again.stdout) == (1, "nothing to lift for 127.0.0.1\n")
    bad = hub.cli("auth", "unblock", "not-an-address", check=False)
    assert bad.returncode == 1 and bad.stderr == "mailhub: 'not-an-address' is not an IP address\n"


def test_parallel_guesses_from_one_address_take_turns(make_hub):
    hub = make_hub(
        sites=ALPHA_BETA,
        process=True,
        MAILHUB_AUTH_FAILURE_DELAY="0.3",
        MAILHUB_AUTH_MAX_FAILURE_DELAY="0.3",
        MAILHUB_AUTH_MAX_FAILURES="100",
    ).start()
    ok, _, _ = try_login(hub, "pop3", "first-guess")  # the address now has a 0.3 s penalty
    assert not ok
    results = []
    started = time.monotonic()

    def guess(n):
        results.append(try_login(hub, ("smtp", "pop3", "imap")[n % 3], f"guess-{n}"))

    threads = [threading.Thread(target=guess, args=(n,)) for n in range(9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    elapsed = time.monotonic() - started
    assert len(results) == 9 and not any(ok for ok, _, _ in results)
    # one attempt per 0.3 s from the address, however many connections it opens
    assert elapsed > 9 * 0.3 - 0.1, elapsed
    # another address is not slowed
    assert try_login(hub, "imap", PASSWORD, source=GOOD)[2] < 1.0


def test_the_password_check_queue_is_bounded(make_hub):
    hub = make_hub(
        sites=ALPHA_BETA, process=True, MAILHUB_AUTH_HASH_THREADS="1", MAILHUB_AUTH_MAX_QUEUED_CHECKS="2"
    ).start()
    send(hub, ["beta@hub.test"], make_message(20000))
    assert good_gateway_pop3(hub, GOOD) < 2.0  # its check is now cached: no queue for it
    results = []

    def guess(n):  # many addresses at once, so that no penalty spaces them out
        results.append(try_login(hub, "imap", f"guess-{n}", source=f"127.0.1.{n + 1}", site=f"nobody{n}"))

    threads = [threading.Thread(target=guess, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    during = good_gateway_pop3(hub, GOOD)
    for thread in threads:
        thread.join(60)
    assert during < 1.0
    answers = [answer for _, answer, _ in results]
    busy = [a for a in answers if "[UNAVAILABLE] too many logins at once; try again shortly" in a]
    assert len(answers) == 16 and busy and len(busy) < 16, answers
    assert all("[UNAVAILABLE]" in a or "[AUTHENTICATIONFAILED]" in a for a in answers), answers
    assert metric(metrics(hub), "mailhub_login_refused_total", protocol="imap", reason="busy") == len(busy)


def test_failure_log_lines_are_rate_limited_per_address(make_hub):
    hub = make_hub(
        sites=ALPHA_BETA,
        process=True,
        MAILHUB_AUTH_FAILURE_DELAY="0.01",
        MAILHUB_AUTH_MAX_FAILURE_DELAY="0.02",
        MAILHUB_AUTH_MAX_FAILURES="1000",
    ).start()
    client = POP3From(hub.ports["pop3"], ATTACKER)
    for n in range(30):
        if n % 2 == 0:  # two failures per connection (the third would close it)
            client.close()
            client = POP3From(hub.ports["pop3"], ATTACKER)
        client.user("beta")
        with pytest.raises(poplib.error_proto):
            client.pass_(f"wrong-{n}")
    client.close()
    log = hub.log_text()
    assert log.count("pop3: failed login as 'beta' from 127.0.0.1") == 10, log[-3000:]
    assert try_login(hub, "pop3", "from-elsewhere", source=GOOD)[0] is False
    assert "pop3: failed login as 'beta' from 127.0.0.2" in hub.log_text()


def test_auth_commands_say_when_the_hub_is_not_running(make_hub):
    hub = make_hub(sites=ALPHA_BETA)
    result = hub.cli("auth", "blocks", check=False)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("mailhub: the hub is not running (no answer on ")
    assert result.stderr.endswith("start it with: mailhub serve\n") and result.stderr.count("\n") == 1
