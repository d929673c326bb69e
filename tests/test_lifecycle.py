# The mailbox lifecycle (issue 25) against a real in-process hub with the lifecycle's clock moved
# forward (relay/lifecycle.py takes `clock`): the warning to the receiving site before the expiry,
# the expiry itself (mailbox entries gone, their blobs freed, `expired` events, an open IMAP session
# told by EXPUNGE), one RFC 3464 notice per study to the sender (parsed with Python's email as a
# real DSN), none of it carrying the originals' subjects or bodies, the metrics, `mailhub mailbox
# expire --dry-run` and `site set --retention-days`. Quota warnings: once per crossing of each
# level, to the site and to the operator, again only after the level was left, and not again after
# a restart. Receipts: a real MDN built as gateways build them (RFC 8098) passes untouched and is
# traced to its study. A notice to a sender of another network goes to the outbound queue.
import asyncio
import email
import imaplib
import json
import poplib
import smtplib
import socket
import threading
import time
import urllib.request

import pytest

from conftest import ALPHA_BETA, PASSWORD, make_message, until, wait_for

# Every test that starts a hub runs on SQLite and again on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_engines

DAY = 86400
STUDY = "1.2.826.0.1.3680043.10.543.20261206.1"
SECRET = "Patient Doe^John 1970-01-01"  # in each original's Subject: must never reach a notice


def run(hub, coro, timeout: float = 30.0):
    """Run a coroutine on the in-process hub's event loop."""
    return asyncio.run_coroutine_threadsafe(coro, hub._loop).result(timeout)


def lifecycle(hub):
    return hub._hub.lifecycle


def send(hub, message: bytes, rcpts=("beta@hub.test",), login: str = "alpha", sender: str = "alpha@hub.test") -> str:
    with smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30) as client:
        client.login(login, PASSWORD)
        client.mail(sender)
        for rcpt in rcpts:
            assert client.rcpt(rcpt)[0] == 250
        code, reply = client.data(message)
        assert code == 250, reply
        return reply.decode().rsplit(" ", 1)[1]


def part(n: int, total: int, set_id: str = STUDY) -> bytes:
    headers = f"X-TELEMEDICINE-SETID: {set_id}\r\nX-TELEMEDICINE-SETPART: {n}\r\nX-TELEMEDICINE-SETTOTAL: {total}\r\n"
    return make_message(3000, subject=f"{SECRET} part {n}", extra_headers=headers)


def mailbox(hub, site: str) -> list[tuple[str, float | None]]:
    return hub.query(
        "SELECT b.queue_id, b.fetched_at FROM mailbox b JOIN sites s ON s.id = b.site_id WHERE s.name = ? ORDER BY uid",
        site,
    )


def stored_mails(hub, site: str, exclude: set[str]) -> list[bytes]:
    return [hub.stored(q) for q, _ in mailbox(hub, site) if q not in exclude]


def metric(hub, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{hub.ports['metrics']}/metrics", timeout=10).read().decode()
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture
def lifecycle_hub(make_hub):
    # the loop's own rounds stay out of the way (an hour apart); the test runs rounds itself
    return make_hub(
        sites=ALPHA_BETA,
        MAILHUB_LIFECYCLE_CHECK_INTERVAL="3600",
        MAILHUB_LIFECYCLE_RETENTION_DAYS="14",
        MAILHUB_LIFECYCLE_WARN_BEFORE_DAYS="2",
    ).start()


def test_warning_expiry_and_one_dsn_per_study(lifecycle_hub):
    hub = lifecycle_hub
    start = time.time()
    study = [send(hub, part(n, 3)) for n in (1, 2, 3)]
    single = send(hub, make_message(2500, subject=SECRET))
    fetched = send(hub, make_message(2000, subject=SECRET))
    pop = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=30)
    pop.user("beta")
    pop.pass_(PASSWORD)
    count = len(pop.list()[1])
    pop.retr(count)  # the newest: `fetched` (downloaded, kept): never expires
    pop.quit()
    wait_for(lambda: dict(mailbox(hub, "beta"))[fetched] is not None)
    originals = set(study + [single, fetched])

    imap = imaplib.IMAP4("127.0.0.1", hub.ports["imap"])
    imap.login("beta", PASSWORD)
    assert imap.select("INBOX")[1] == [b"5"]

    # 12.5 days on: the whole study and the single mail are within 2 days of their expiry
    lifecycle(hub).clock = lambda: start + 12.5 * DAY
    dry = json.loads(hub.cli("mailbox", "expire", "--dry-run", "--json").stdout)
    assert dry["expire"] == [] and sorted(e["queue_id"] for e in dry["warn"]) == sorted(study + [single])
    report = run(hub, lifecycle(hub).expire_now())
    assert report["warnings_queued"] == 1 and not report["expire"]
    warnings = stored_mails(hub, "beta", originals)
    assert len(warnings) == 1
    warning = email.message_from_bytes(warnings[0])
    assert warning["Auto-Submitted"] == "auto-generated" and "expires soon (4 mail(s))" in warning["Subject"]
    text = warning.get_payload()
    for queue_id in study + [single]:
        assert queue_id in text
    assert fetched not in text and STUDY in text and SECRET not in warnings[0].decode()
    # warned once: the next round warns nobody again
    lifecycle(hub).clock = lambda: start + 13 * DAY
    assert run(hub, lifecycle(hub).expire_now()).get("warnings_queued") is None
    assert len(stored_mails(hub, "beta", originals)) == 1

    # 14 days and a bit: the four expire, and the warning (stored in real time, as old as they are)
    # silently; alpha gets one notice for the study and one for the single mail
    lifecycle(hub).clock = lambda: start + 14 * DAY + 60
    report = run(hub, lifecycle(hub).expire_now())
    assert report["removed"] == 5 and report["notices_queued"] == 2 and report["studies"] == 3
    assert [q for q, _ in mailbox(hub, "beta")] == [fetched]
    assert hub.query("SELECT count(*) FROM messages WHERE queue_id IN (?, ?, ?, ?)", *study, single) == [(0,)]
    dsns = [email.message_from_bytes(data) for data in stored_mails(hub, "alpha", set())]
    assert len(dsns) == 2
    by_study = {}
    for dsn, raw in zip(dsns, stored_mails(hub, "alpha", set())):
        assert SECRET not in raw.decode() and "part 1" not in dsn["Subject"]
        assert dsn.get_content_type() == "multipart/report"
        assert dsn.get_param("report-type") == "delivery-status"
        human, status = dsn.get_payload()[:2]
        assert status.get_content_type() == "message/delivery-status"
        per_message, *per_recipient = status.get_payload()
        assert per_message["Reporting-MTA"] == "dns; hub.test"
        assert len(per_recipient) == 1
        rcpt = per_recipient[0]
        assert rcpt["Final-Recipient"] == "rfc822; beta@hub.test"
        assert (rcpt["Action"], rcpt["Status"]) == ("failed", "5.4.7")
        assert "not fetched by the recipient within 14 days" in rcpt["Diagnostic-Code"]
        by_study[per_message["X-Mailhub-Study-ID"]] = human.get_payload()
    assert set(by_study) == {STUDY, None}
    assert all(q in by_study[STUDY] for q in study) and single in by_study[None]
    assert "not fetched by the recipient within 14 days" in by_study[STUDY]

    expired = hub.query(
        "SELECT queue_id, site, peer_site, detail FROM events WHERE kind = 'expired' AND peer_site IS NOT NULL"
    )
    assert sorted(q for q, *_ in expired) == sorted(study + [single])
    assert {(s, p, d) for _, s, p, d in expired} == {("beta", "alpha", "not fetched within 14 days")}
    audited = hub.query(
        "SELECT queue_id, site, study_id, size, sha256, actor, detail FROM audit WHERE event = 'expired'"
        " AND study_id IS NOT NULL ORDER BY queue_id"
    )
    stored = {
        q: (size, sha)
        for q, size, sha in hub.query("SELECT queue_id, size, detail FROM events WHERE kind = 'accepted'")
    }
    assert audited == [(q, "beta", STUDY, *stored[q], "hub", "not fetched within 14 days") for q in sorted(study)]
    # the notices are in the audit trail of alpha's mailbox as accepted mails, with their Message-IDs
    notices = {q for q, _ in mailbox(hub, "alpha")}
    noted = hub.query("SELECT queue_id, message_id FROM audit WHERE event = 'accepted' AND site = 'alpha'")
    assert {q for q, _ in noted} == notices and all(m.endswith(".notice@hub.test>") for _, m in noted)
    audit_cli = json.loads(hub.cli("audit", "--study", STUDY, "--json").stdout)
    assert sorted(r["event"] for r in audit_cli) == ["accepted"] * 3 + ["expired"] * 3
    trace = json.loads(hub.cli("trace", "--study", STUDY, "--json").stdout)
    assert trace["study"]["recipients"][0]["expired"] == 3
    assert metric(hub, "mailhub_expired_mails_total", site="beta") == 5
    assert metric(hub, "mailhub_lifecycle_notices_total", kind="expiry_dsn", outcome="sent") == 2
    assert metric(hub, "mailhub_lifecycle_notices_total", kind="expiry_warning", outcome="sent") == 1

    # the IMAP session of beta sees the four go at its next command (the warning came after SELECT:
    # EXISTS, then EXPUNGE)
    imap.noop()
    assert len(imap.response("EXPUNGE")[1]) == 4 or imap.select("INBOX")[1] == [b"1"]
    assert imap.select("INBOX")[1] == [b"1"]
    imap.logout()

    # a second round (the fake clock makes alpha's two notices as old) removes those silently: no
    # notice about a notice, and none sent twice
    notices = hub.query("SELECT count(*) FROM lifecycle_notices")
    report = run(hub, lifecycle(hub).expire_now())
    assert report["removed"] == 2 and report["notices_queued"] == 0
    assert {e["sender"] for e in report["expire"]} == {""}
    assert hub.query("SELECT count(*) FROM lifecycle_notices") == notices
    assert metric(hub, "mailhub_lifecycle_notices_total", kind="expiry_dsn", outcome="sent") == 2


def test_retention_override_and_keep(lifecycle_hub):
    hub = lifecycle_hub
    start = time.time()
    queue_id = send(hub, make_message(2000))
    assert (
        "retention of site beta: keep until fetched" in hub.cli("site", "set", "beta", "--retention-days", "0").stdout
    )
    lifecycle(hub).clock = lambda: start + 400 * DAY
    assert run(hub, lifecycle(hub).expire_now())["expire"] == []
    hub.cli("site", "set", "beta", "--retention-days", "3")
    shown = json.loads(hub.cli("site", "show", "beta", "--json").stdout)["retention"]
    assert shown == {"days": 3.0, "source": "site"}
    assert "\nretention: 3 days unfetched, then expired  (site)\n" in hub.cli("site", "show", "beta").stdout
    lifecycle(hub).clock = lambda: start + 2 * DAY
    report = run(hub, lifecycle(hub).expire_now(dry_run=True))
    assert [e["queue_id"] for e in report["warn"]] == [queue_id] and report["expire"] == []
    lifecycle(hub).clock = lambda: start + 3 * DAY + 1
    assert "would expire: 1 mail(s)" in hub.cli("mailbox", "expire", "--dry-run").stdout
    assert mailbox(hub, "beta") != []
    text = hub.cli("mailbox", "expire").stdout  # the running hub's round, now
    assert text.startswith("expired: 1 mail(s) of 1 due, in 1 group(s)\n") and queue_id in text
    assert mailbox(hub, "beta") == []
    result = hub.cli("site", "set", "beta", "--retention-days", "-1", check=False)
    assert result.returncode == 1 and "--retention-days" in result.stderr
    hub.cli("site", "set", "beta", "--retention-days", "default")
    assert hub.query("SELECT count(*) FROM site_retention") == [(0,)]


def quota_notices(hub, site: str, kind_words: str) -> list[email.message.Message]:
    found = []
    for queue_id, _ in mailbox(hub, site):
        message = email.message_from_bytes(hub.stored(queue_id))
        if message["Auto-Submitted"] == "auto-generated" and kind_words in (message["Subject"] or ""):
            found.append(message)
    return found


def test_quota_warnings_once_per_crossing_to_site_and_operator(make_hub):
    hub = make_hub(
        sites=ALPHA_BETA,
        MAILHUB_QUOTAS_MAILBOX_MESSAGES="10",
        MAILHUB_LIFECYCLE_QUOTA_WARNING_LEVELS="50, 90",
        MAILHUB_LIFECYCLE_OPERATOR_ADDRESS="alpha@hub.test",
    ).start()

    def warned(site: str) -> list[str]:
        return sorted(m["Subject"] for m in quota_notices(hub, site, "is "))

    for _ in range(5):  # 5 of 10: the 50 % level
        send(hub, make_message(1500, subject=SECRET))
    wait_for(lambda: warned("beta") == ["Mailbox of site beta is 50% full"])
    wait_for(lambda: warned("alpha") == ["Mailbox of site beta is 50% full"])  # the operator's copy
    for _ in range(2):  # 6 (the notice counts) + 2 = 8: no new level
        send(hub, make_message(1500))
    run(hub, lifecycle(hub).check_quotas())  # what the hub does a second after a change, now
    assert run(hub, lifecycle(hub).send_notices()) == 0
    assert len(warned("beta")) == 1
    send(hub, make_message(1500))  # 9 of 10: the 90 % level, once
    wait_for(lambda: len(warned("beta")) == 2)
    wait_for(lambda: len(warned("alpha")) == 2)
    text = quota_notices(hub, "beta", "90%")[0].get_payload()
    assert "9 of 10 mails" in text and SECRET not in text
    assert hub.query("SELECT level FROM quota_warnings ORDER BY level") == [(50,), (90,)]

    # a restart resends nothing (the crossings are recorded in the index)
    hub.stop()
    hub.start()
    run(hub, lifecycle(hub).check_quotas())  # (the first check looks at every site)
    assert run(hub, lifecycle(hub).send_notices()) == 0
    assert len(warned("beta")) == 2 and len(warned("alpha")) == 2

    # beta fetches and deletes everything: both levels are left; filling again warns again
    pop = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=30)
    pop.user("beta")
    pop.pass_(PASSWORD)
    for n in range(1, len(pop.list()[1]) + 1):
        pop.dele(n)
    pop.quit()
    wait_for(lambda: hub.query("SELECT count(*) FROM quota_warnings") == [(0,)])
    for _ in range(5):
        send(hub, make_message(1500))
    wait_for(lambda: warned("beta") == ["Mailbox of site beta is 50% full"])
    wait_for(lambda: len(warned("alpha")) == 3)
    assert metric(hub, "mailhub_quota_warnings_total", level="50") == 1  # since the restart
    # counted once store_generated returns to the hub's loop, after the notice shows in the mailbox
    wait_for(lambda: metric(hub, "mailhub_lifecycle_notices_total", kind="quota_operator", outcome="sent") == 1)


@pytest.mark.one_engine("the lifecycle loop's wake-up, not the index")
def test_a_mailbox_change_during_a_round_is_checked_without_waiting_for_the_interval(make_hub):
    # the loop's round is held in send_notices (after check_quotas took the sites to check) while
    # the mail that crosses the level is committed: its change must wake the next round, not wait
    # for lifecycle.check_interval (an hour here)
    hub = make_hub(
        sites=ALPHA_BETA,
        MAILHUB_QUOTAS_MAILBOX_MESSAGES="10",
        MAILHUB_LIFECYCLE_QUOTA_WARNING_LEVELS="50",
        MAILHUB_LIFECYCLE_CHECK_INTERVAL="3600",
    ).start()
    life = lifecycle(hub)
    for _ in range(3):
        send(hub, make_message(1500))
    release = asyncio.Event()

    async def hold_sending() -> None:
        # taken once the loop is between rounds (checked on the loop: a round holds one of the
        # locks from the moment it takes the dirty sites until it is over)
        await until(
            lambda: not (life._dirty or life._quotas.locked() or life._sending.locked()),
            timeout=30,
            interval=0.01,
            message="the lifecycle loop between rounds",
        )
        async with life._sending:
            holding.set()
            await release.wait()

    async def round_waits() -> bool:  # a round took the dirty sites and waits for the lock
        return not life._dirty and bool(life._sending._waiters)

    holding = threading.Event()  # (the lock alone could be a round's own, still sending mail 3's notices)
    holder = asyncio.run_coroutine_threadsafe(hold_sending(), hub._loop)
    wait_for(holding.is_set, message="the test holding the lifecycle's sending lock")
    send(hub, make_message(1500))  # 4 of 10: wakes a round, which takes beta and waits for the lock
    wait_for(lambda: run(hub, round_waits()), message="a round waiting for the sending lock")
    send(hub, make_message(1500))  # 5 of 10, committed during that round: the 50 % level
    hub._loop.call_soon_threadsafe(release.set)
    holder.result(10)
    wait_for(lambda: quota_notices(hub, "beta", "50%"), message="the 50% warning")


def gateway_mdn(original_message_id: str, original_header: bytes, disposition: str) -> bytes:
    """An RFC 8098 receipt as a DICOM gateway sends it once it has processed a mail: the human part,
    the machine-readable disposition-notification fields, and the original's header."""
    return (
        b"From: <beta@hub.test>\r\nTo: <alpha@hub.test>\r\nSubject: Disposition notification\r\n"
        b"Message-ID: <mdn-" + original_message_id.strip("<>").encode() + b">\r\n"
        b"Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=disposition-notification; boundary="mdn-1"\r\n\r\n'
        b"--mdn-1\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nThe study was received and processed.\r\n"
        b"--mdn-1\r\nContent-Type: message/disposition-notification\r\n\r\n"
        b"Reporting-UA: gateway.beta; DICOM gateway 3.1\r\nOriginal-Recipient: rfc822;beta@hub.test\r\n"
        b"Final-Recipient: rfc822;beta@hub.test\r\nOriginal-Message-ID: " + original_message_id.encode() + b"\r\n"
        b"Disposition: " + disposition.encode() + b"\r\n\r\n"
        b"--mdn-1\r\nContent-Type: text/rfc822-headers\r\n\r\n" + original_header + b"\r\n--mdn-1--\r\n"
    )


def test_receipt_passes_untouched_and_is_traced_to_its_study(lifecycle_hub):
    hub = lifecycle_hub
    set_id = "1.2.826.0.1.3680043.10.543.20261206.2"
    originals = [part(n, 2, set_id) for n in (1, 2)]
    queue_ids = [send(hub, m) for m in originals]
    # beta's gateway fetches both parts and answers each with a receipt
    pop = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=30)
    pop.user("beta")
    pop.pass_(PASSWORD)
    fetched = [b"\r\n".join(pop.retr(n)[1]) for n in (1, 2)]
    pop.dele(1)
    pop.dele(2)
    pop.quit()
    receipts = []
    for raw in fetched:
        header = raw[: raw.index(b"\r\n\r\n") + 2]
        original_id = email.message_from_bytes(raw)["Message-ID"]
        receipts.append(gateway_mdn(original_id, header, "automatic-action/MDN-sent-automatically; processed"))
    receipt_ids = [send(hub, r, rcpts=("alpha@hub.test",), login="beta", sender="beta@hub.test") for r in receipts[:1]]
    wait_for(lambda: hub.query("SELECT count(*) FROM events WHERE kind = 'receipt'") == [(1,)])

    # untouched: alpha gets the receipt as beta sent it (after the hub's Received: line)
    stored = hub.stored(receipt_ids[0])
    prefix = stored[: len(stored) - len(receipts[0])]
    assert stored.endswith(receipts[0]) and prefix.startswith(b"Received: ") and prefix.count(b"Received: ") == 1

    # traced: the study shows one of two parts acknowledged, the first part's path shows the receipt
    trace = json.loads(hub.cli("trace", "--study", set_id, "--json").stdout)
    (beta,) = trace["study"]["recipients"]
    assert (beta["downloaded"], beta["acknowledged"]) == (2, 1)
    assert beta["disposition"] == "automatic-action/MDN-sent-automatically; processed"
    first = next(m for m in trace["mails"] if m["queue_id"] == queue_ids[0])
    assert [r["disposition"] for r in first["recipients"][0]["receipts"]] == [beta["disposition"]]
    assert any(e["kind"] == "receipt" and receipt_ids[0] in e["detail"] for e in first["events"])
    text = hub.cli("trace", "--study", set_id).stdout
    assert "receipts for 1 of 2 part(s)" in text and "processed" in text

    # the stats per study, and the metric of fetched-but-unacknowledged studies past the threshold
    stats = json.loads(hub.cli("stats", "--json").stdout)
    (row,) = [s for s in stats["studies"] if s["set_id"] == set_id]
    assert (row["parts_accepted"], row["parts_fetched"], row["parts_acknowledged"]) == (2, 2, 1)
    lifecycle(hub).clock = lambda: time.time() + 2 * DAY
    assert run(hub, lifecycle(hub).update_study_metrics()) == (0, 1)
    assert metric(hub, "mailhub_studies_unacknowledged") == 1
    send(hub, receipts[1], rcpts=("alpha@hub.test",), login="beta", sender="beta@hub.test")
    wait_for(lambda: hub.query("SELECT count(*) FROM events WHERE kind = 'receipt'") == [(2,)])
    assert run(hub, lifecycle(hub).update_study_metrics()) == (0, 0)
    # the receipt's task counts it after its event's commit comes back from the index writer (a
    # child process), on the hub's loop: the event can be seen before the count, so wait for it
    wait_for(lambda: metric(hub, "mailhub_receipts_total", outcome="linked") == 2)
    # a receipt for a mail the hub never saw is still recorded, unlinked
    send(
        hub,
        gateway_mdn("<unknown@x>", b"Subject: x\r\n", "manual-action/MDN-sent-manually; displayed"),
        rcpts=("alpha@hub.test",),
        login="beta",
        sender="beta@hub.test",
    )
    wait_for(lambda: metric(hub, "mailhub_receipts_total", outcome="unlinked") == 1)

    # a complete study nobody fetches counts once it is older than lifecycle.study_alert_hours
    unfetched = "1.2.826.0.1.3680043.10.543.20261206.3"
    for n in (1, 2):
        send(hub, part(n, 2, unfetched))
    send(hub, part(1, 3, unfetched + ".9"))  # incomplete: not counted
    lifecycle(hub).clock = time.time
    assert run(hub, lifecycle(hub).update_study_metrics()) == (0, 0)  # not old enough yet
    lifecycle(hub).clock = lambda: time.time() + DAY + 60
    assert run(hub, lifecycle(hub).update_study_metrics()) == (1, 0)
    assert metric(hub, "mailhub_studies_unfetched") == 1


def test_dsn_to_a_sender_of_another_network_goes_to_the_outbound_queue(make_hub):
    with socket.socket() as closed:  # the next hop: a port that refuses (the notice stays queued)
        closed.bind(("127.0.0.1", 0))
        hub = make_hub(
            sites=ALPHA_BETA,
            MAILHUB_SMTP_PEER_NETWORKS="127.0.0.0/8",
            MAILHUB_RELAY_ROUTES=f"remote.test=127.0.0.1:{closed.getsockname()[1]}",
            MAILHUB_RELAY_CONNECT_TIMEOUT="2",
            MAILHUB_LIFECYCLE_CHECK_INTERVAL="3600",
        ).start()
        start = time.time()
        with smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30) as client:  # a peer network's MTA
            client.sendmail("doctor@remote.test", ["beta@hub.test"], part(1, 1, STUDY + ".7"))
        lifecycle(hub).clock = lambda: start + 15 * DAY
        assert run(hub, lifecycle(hub).expire_now())["notices_queued"] == 1
        rows = hub.query("SELECT o.rcpt, m.mail_from, m.queue_id FROM outbound o JOIN messages m USING (queue_id)")
        assert [(rcpt, sender) for rcpt, sender, _ in rows] == [("doctor@remote.test", "")]
        dsn = email.message_from_bytes(hub.stored(rows[0][2]))
        assert dsn.get_param("report-type") == "delivery-status" and dsn["To"] == "<doctor@remote.test>"
        assert SECRET not in hub.stored(rows[0][2]).decode()
        hub.stop()  # while the next hop's port is still held (refusing), not taken by another process


@pytest.mark.parametrize("point", ["op_before_commit", "op_after_commit"])
def test_an_expiry_cut_by_the_writers_death_happens_once_with_one_notice(make_hub, monkeypatch, tmp_path, point):
    # the index writer (a child process; it reads MAILHUB_FAULT at its start) is killed inside or
    # right after the expiry's transaction: afterwards the study expired exactly once, its parts all
    # together, with one notice to the sender and one expired audit record per part
    armed = tmp_path / "fault-armed"
    monkeypatch.setenv("MAILHUB_FAULT", f"writer:{point}:kill")
    monkeypatch.setenv("MAILHUB_FAULT_FILE", str(armed))
    hub = make_hub(sites=ALPHA_BETA, MAILHUB_LIFECYCLE_CHECK_INTERVAL="3600").start()
    start = time.time()
    study = [send(hub, part(n, 2, STUDY + ".5")) for n in (1, 2)]
    lifecycle(hub).clock = lambda: start + 15 * DAY
    armed.write_text("once")
    outcome = "cut"
    try:
        run(hub, lifecycle(hub).expire_now())
        outcome = "done"
    except Exception as exc:  # the writer died under it: the round fails, the next one tries again
        outcome = f"failed ({type(exc).__name__})"
    assert not armed.exists(), "the fault never fired"
    monkeypatch.delenv("MAILHUB_FAULT")

    def round_done() -> bool:  # the writer is started again by the next operation that needs it
        try:
            run(hub, lifecycle(hub).expire_now())
        except Exception:
            return False
        return True

    wait_for(round_done, timeout=30, message="a round after the writer's restart")
    left = [q for q, _ in mailbox(hub, "beta") if q in study]
    notices = stored_mails(hub, "alpha", set())
    expired = hub.query("SELECT count(*) FROM audit WHERE event = 'expired' AND queue_id IN (?, ?)", *study)
    print(
        f"\nwriter killed at {point}: first round {outcome}; acknowledged 2, left {len(left)}, notices"
        f" {len(notices)}, expired records {expired[0][0]}"
    )
    assert left == [] and len(notices) == 1 and expired == [(2,)]
    hub.stop()


def test_a_notice_another_node_stored_first_is_not_sent_again(make_hub):
    """Two leaders for a moment: node B's commit of notice 5 finds the notices' mark already at 7 (node
    A stored up to there); its copy is left out, logged, and nobody gets a second mail."""
    from storage import lifecycle as stored

    hub = make_hub(sites=ALPHA_BETA, MAILHUB_LIFECYCLE_CHECK_INTERVAL="3600").start()
    run(hub, hub._hub.storage.queue_op(stored.notice_done, 7))  # node A's notices up to 7
    facts = {"site": "beta", "level": 50, "percent": 50.0, "messages": 5, "messages_limit": 10}
    notice = stored.Notice(5, "quota_warning", time.time(), "beta@hub.test", facts)
    assert run(hub, lifecycle(hub)._send(notice)) == 0
    assert "quota_warning notice 5 already sent by another node" in hub.log_text()
    assert hub.query("SELECT count(*) FROM mailbox") == [(0,)]
    assert hub.query("SELECT value FROM meta WHERE key = ?", stored.NOTICE_MARK) == [(7,)]
    notice = stored.Notice(8, "quota_warning", time.time(), "beta@hub.test", facts)
    assert run(hub, lifecycle(hub)._send(notice)) == 1  # the next one is this node's to send
    assert hub.query("SELECT count(*) FROM mailbox") == [(1,)]
