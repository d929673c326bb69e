# Site liveness (issue 26) against an in-process hub: one meaning of "waiting" (not fetched yet by
# its site) in the metrics, `mailhub stats` and `mailhub site show`, also for a mail fetched over
# IMAP and kept while the session goes on; IMAP downloads and deletes recorded with their site;
# stale detection with an injected clock (notices to the site's contact and the operator, sent once
# per episode, also across a restart of the monitor, and a recovery notice); the contact attribute.
import asyncio
import imaplib
import json
import poplib
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mailhub.liveness import LivenessCollector, LivenessMonitor, is_stale, stale_at
from storage.liveness import SiteLiveness

from conftest import ALPHA_BETA_B2, PASSWORD, make_message, wait_for
from pop3util import send

HOUR = 3600.0


def row(waiting=1, oldest=1000.0, last_fetch=None, stale_since=None) -> SiteLiveness:
    return SiteLiveness(
        1, "beta", None, waiting, 10 * waiting, waiting, 10 * waiting, oldest, None, last_fetch, stale_since
    )


def test_stale_rule():
    # nothing waiting: never stale, however long since the last fetch
    assert stale_at(row(waiting=0, oldest=None, last_fetch=0.0), HOUR) is None
    assert not is_stale(row(waiting=0, oldest=None), HOUR, 1e9)
    # waiting since 1000, never fetched: stale from 1000 + stale_after on
    assert stale_at(row(), HOUR) == 1000 + HOUR
    assert not is_stale(row(), HOUR, 1000 + HOUR - 1)
    assert is_stale(row(), HOUR, 1000 + HOUR)
    # a site that fetched long ago is not stale the moment new mail arrives: the later time counts
    assert stale_at(row(oldest=5000.0, last_fetch=10.0), HOUR) == 5000 + HOUR
    # a fetch after the oldest waiting mail arrived (it took others) restarts the clock
    assert stale_at(row(oldest=5000.0, last_fetch=6000.0), HOUR) == 6000 + HOUR


def scrape(hub) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{hub.ports['metrics']}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def cli_json(hub, *args):
    return json.loads(hub.cli(*args, "--json").stdout)


def test_fetched_over_imap_and_kept_is_not_waiting_anywhere(hub):
    size = len(make_message(4000, subject="kept"))
    send(hub, ["beta@hub.test"], make_message(4000, subject="kept"))
    queue_id = send(hub, ["beta@hub.test"], make_message(4000, subject="deleted"))
    client = imaplib.IMAP4("127.0.0.1", hub.ports["imap"], timeout=60)
    try:
        client.login("beta", PASSWORD)
        client.select("INBOX")
        assert client.fetch("1:2", "(BODY.PEEK[])")[0] == "OK"
        # the session goes on (as an IDLE session would): the fetch is on record already
        wait_for(lambda: hub.query("SELECT count(*) FROM mailbox WHERE fetched_at IS NULL")[0][0] == 0)
        shown = cli_json(hub, "site", "show", "beta")
        assert shown["mailbox_messages"] == 2  # held: still in the mailbox, counted by the quota
        assert shown["waiting_messages"] == 0
        assert shown["liveness"]["waiting_messages"] == 0
        assert shown["liveness"]["held_messages"] == 2
        assert shown["liveness"]["last_fetch_at"] is not None and shown["liveness"]["last_login_at"] is not None
        assert shown["activity"]["oldest_waiting_at"] is None
        stats = cli_json(hub, "stats", "--since", "1h")
        assert stats["backlogs"] == []
        assert {s["site"]: s["waiting_messages"] for s in stats["liveness"]} == {"alpha": 0, "beta": 0}
        m = scrape(hub)
        assert m[("mailhub_site_waiting_messages", (("site", "beta"),))] == 0
        assert m[("mailhub_site_waiting_bytes", (("site", "beta"),))] == 0
        assert m[("mailhub_site_oldest_waiting_age_seconds", (("site", "beta"),))] == 0
        assert m[("mailhub_mailbox_messages", (("site", "beta"),))] == 2
        assert m[("mailhub_site_stale", (("site", "beta"),))] == 0
        assert ("mailhub_site_last_fetch_timestamp_seconds", (("site", "beta"),)) in m
        assert ("mailhub_site_last_fetch_timestamp_seconds", (("site", "alpha"),)) not in m
        # the downloads are recorded with their site (trace and stats right for IMAP gateways)
        downloaded = hub.query("SELECT site, detail FROM events WHERE kind = 'downloaded'")
        assert downloaded == [("beta", "imap"), ("beta", "imap")]
        client.store("2", "+FLAGS", "(\\Deleted)")
        assert client.expunge()[0] == "OK"
    finally:
        client.logout()
    assert hub.query("SELECT site, detail FROM events WHERE kind = 'deleted'") == [("beta", "imap")]
    traced = cli_json(hub, "trace", queue_id)
    assert [r["site"] for r in traced["mails"][0]["recipients"]] == ["beta"]
    stats = cli_json(hub, "stats", "--since", "1h")
    beta = next(s for s in stats["sites"] if s["site"] == "beta")
    assert beta["downloaded_messages"] == 2 and beta["downloaded_bytes"] >= 2 * size
    assert beta["deleted_messages"] == 1
    # one session, counted once although its downloads were recorded in two parts
    assert hub.query("SELECT sessions FROM site_downloads")[0][0] == 1


@pytest.fixture
def liveness_hub(make_hub):
    hub = make_hub(
        sites=ALPHA_BETA_B2,
        MAILHUB_LIVENESS_STALE_AFTER=str(HOUR),
        MAILHUB_LIVENESS_CHECK_INTERVAL="86400",  # the hub's own monitor looks once, at start
        MAILHUB_LIVENESS_NOTIFY_SITES="true",
        MAILHUB_LIFECYCLE_OPERATOR_ADDRESS="ops@hub.test",
    )
    hub.add_site("ops", "ops@hub.test")
    hub.add_site("carol", "carol@hub.test")
    return hub


def read_mail(hub, site: str) -> None:
    """The site fetches every mail in its mailbox over POP3 and keeps it."""
    pop = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=60)
    pop.user(site)
    pop.pass_(PASSWORD)
    for n in range(1, pop.stat()[0] + 1):
        pop.retr(n)
    pop.quit()
    wait_for(
        lambda: (
            hub.query(
                "SELECT count(*) FROM mailbox b JOIN sites s ON s.id = b.site_id"
                " WHERE s.name = ? AND b.fetched_at IS NULL",
                site,
            )[0][0]
            == 0
        )
    )


def run(hub, coro):
    return asyncio.run_coroutine_threadsafe(coro, hub._loop).result(60)


def mailbox_subjects(hub, site: str) -> list[str]:
    rows = hub.query(
        "SELECT m.queue_id FROM mailbox b JOIN sites s ON s.id = b.site_id JOIN messages m ON m.queue_id = b.queue_id"
        " WHERE s.name = ? ORDER BY b.uid",
        site,
    )
    subjects = []
    for (queue_id,) in rows:
        head = hub.stored(queue_id).split(b"\r\n\r\n", 1)[0].decode()
        subjects += [line[len("Subject: ") :] for line in head.split("\r\n") if line.startswith("Subject: ")]
    return subjects


def test_stale_site_notices_once_and_recovery(liveness_hub):
    hub = liveness_hub
    assert (
        "contact of site beta: carol@hub.test"
        in hub.cli("site", "modify", "beta", "--contact", "carol@hub.test").stdout
    )
    bad = hub.cli("site", "modify", "beta", "--contact", "not an address", check=False)
    assert bad.returncode == 1 and "invalid contact address" in bad.stderr and "Traceback" not in bad.stderr
    hub.start()
    send(hub, ["beta@hub.test"], make_message(3000, subject="for beta"))
    now = [time.time()]
    inner = hub._hub

    def monitor():  # a new one each time: as after a restart of the hub
        return LivenessMonitor(inner.cfg, inner.storage, inner._sites, clock=lambda: now[0])

    assert run(hub, monitor().check()) == []  # mail waiting, but not for long
    now[0] += HOUR + 1
    assert run(hub, monitor().check()) == [("beta", "stale")]
    stale_subject = "[mailhub] site beta is not fetching its mail"
    wait_for(lambda: mailbox_subjects(hub, "ops") == [stale_subject])
    assert mailbox_subjects(hub, "carol") == [stale_subject]  # beta's contact
    read_mail(hub, "ops")  # the operator and beta's contact read their notices (else theirs would wait)
    read_mail(hub, "carol")
    # the state is kept in the index: no second notice, also from a new monitor (a restart)
    assert run(hub, monitor().check()) == []
    now[0] += HOUR
    assert run(hub, monitor().check()) == []
    assert hub.query("SELECT count(*) FROM site_stale")[0][0] == 1
    shown = cli_json(hub, "site", "show", "beta")
    assert shown["liveness"]["stale_since"] is not None and shown["liveness"]["contact"] == "carol@hub.test"
    text = hub.cli("site", "show", "beta").stdout
    assert "liveness:  ok: 1 waiting" in text and "contact:   carol@hub.test" in text
    # the metric, with the same injected clock
    collector = LivenessCollector(hub.data_dir, HOUR, clock=lambda: now[0])
    try:
        stale = {
            s.labels["site"]: s.value for f in collector.collect() for s in f.samples if s.name == "mailhub_site_stale"
        }
    finally:
        collector.close()
    assert stale == {"alpha": 0, "beta": 1, "carol": 0, "ops": 0}

    # beta fetches its mail over POP3: it recovers, and says so once
    read_mail(hub, "beta")
    assert run(hub, monitor().check()) == [("beta", "recovered")]
    recovered_subject = "[mailhub] site beta is fetching its mail again"
    wait_for(lambda: mailbox_subjects(hub, "ops") == [stale_subject, recovered_subject])
    assert mailbox_subjects(hub, "carol") == [stale_subject, recovered_subject]
    read_mail(hub, "ops")
    read_mail(hub, "carol")
    assert run(hub, monitor().check()) == []
    assert hub.query("SELECT count(*) FROM site_stale")[0][0] == 0
    assert "site=beta is stale" in hub.log_text() and "site=beta recovered" in hub.log_text()


def test_deferrals_are_counted_for_the_site_they_were_for(make_hub):
    """mailhub_site_deferrals_total (alert MailhubSiteDeferrals, the dashboard's top-N deferrals):
    a mail deferred because beta's mailbox is full counts for beta, side=receiver, not for alpha."""
    import smtplib

    hub = make_hub(sites=ALPHA_BETA_B2)
    hub.cli("site", "set", "beta", "--mailbox-messages", "1")
    hub.start()
    send(hub, ["beta@hub.test"], make_message(1000))
    with smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=60) as smtp:
        smtp.login("alpha", PASSWORD)
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            smtp.sendmail("alpha@hub.test", ["beta@hub.test"], make_message(1000))
    assert refused.value.recipients["beta@hub.test"][0] == 452
    m = scrape(hub)
    assert m[("mailhub_site_deferrals_total", (("side", "receiver"), ("site", "beta")))] == 1
    assert not [k for k in m if k[0] == "mailhub_site_deferrals_total" and ("site", "alpha") in k[1]]
