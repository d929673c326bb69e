# Tracking and reports (issue 7) against a real hub: a scripted study of 20 parts from alpha to two
# recipient sites (beta and gamma) over SMTP, gamma downloads and deletes half of it over POP3
# (poplib), one recipient is refused (550) and one part of another set is refused at the end of data
# (552). Then `mailhub trace` (by set, Message-ID, queue ID, address) and `mailhub stats`,
# `mailhub site show` are checked for exact figures. On a hub of their own: a quota deferral (452),
# a POP3 session ending without QUIT, site removal, escaping in reports, pruning by CLI and at start.
import imaplib
import json
import poplib
import re
import signal
import smtplib
import sqlite3
import time

import pytest

from mailhub.report_format import iso_time

from conftest import ALPHA_BETA, PASSWORD, Hub, hub_env, make_message, wait_for

SET_ID = "1.2.826.0.1.3680043.10.543.20261128.7"
BIG_SET = "1.2.826.0.1.3680043.10.543.20261128.8"
PARTS = 20
MAX_SIZE = 100_000


def part_message(n: int, set_id: str = SET_ID, size: int = 3000) -> bytes:
    headers = f"X-TELEMEDICINE-SETID: {set_id}\r\nX-TELEMEDICINE-SETPART: {n}\r\nX-TELEMEDICINE-SETTOTAL: {PARTS}\r\n"
    message = make_message(size + 100 * n, subject=f"part {n}", extra_headers=headers)
    return message.replace(b"Message-ID: <", f"Message-ID: <part{n}.".encode(), 1)


def message_id(message: bytes) -> str:
    start = message.index(b"Message-ID: ") + len(b"Message-ID: ")
    return message[start : message.index(b"\r\n", start)].decode()


def cli_json(hub: Hub, *args: str):
    return json.loads(hub.cli(*args, "--json").stdout)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The scripted traffic, once for the module; yields what the checks need to know."""
    data_dir = tmp_path_factory.mktemp("trace") / "data"
    hub = Hub(data_dir, hub_env(data_dir, MAILHUB_SMTP_MAX_MESSAGE_SIZE=str(MAX_SIZE)))
    hub.add_site("alpha", "alpha@hub.test")
    hub.add_site("beta", "beta@hub.test")
    hub.add_site("gamma", "gamma@hub.test")
    hub.start()
    try:
        started = time.time()
        messages = [part_message(n) for n in range(1, PARTS + 1)]
        queue_ids = []
        client = smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=60)
        client.ehlo("gateway.test")
        client.login("alpha", PASSWORD)
        for n, message in enumerate(messages, 1):
            client.mail("alpha@hub.test")
            assert client.rcpt("beta@hub.test")[0] == 250
            if n == 1:
                assert client.rcpt("nobody@hub.test") == (550, b"5.1.1 No such user here")
            assert client.rcpt("gamma@hub.test")[0] == 250
            code, reply = client.data(message)
            assert code == 250, reply
            queue_ids.append(reply.decode().rsplit(" ", 1)[1])
        big = part_message(1, BIG_SET, size=MAX_SIZE + 1000)
        client.mail("alpha@hub.test")
        client.rcpt("beta@hub.test")
        assert client.data(big)[0] == 552
        client.quit()

        sizes = dict(hub.query("SELECT queue_id, size FROM messages"))
        received = dict(hub.query("SELECT queue_id, received_at FROM messages"))
        before_download = time.time()
        pop = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=60)
        pop.user("gamma")
        pop.pass_(PASSWORD)
        for n in range(1, PARTS // 2 + 1):
            pop.retr(n)
            pop.dele(n)
        pop.quit()
        after_download = time.time()
        # the 552 refusal is queued without waiting for the disk: written within about a second
        wait_for(
            lambda: hub.query("SELECT count(*) FROM events WHERE kind = 'refused'") == [(2,)],
            interval=0.05,
            message="2 refused events",
        )
        yield dict(
            hub=hub,
            messages=messages,
            queue_ids=queue_ids,
            sizes=sizes,
            received=received,
            big_message_id=message_id(big),
            started=started,
            before_download=before_download,
            after_download=after_download,
        )
    finally:
        hub.stop(signal.SIGKILL)


def test_trace_of_the_set_gives_the_study_view(study):
    hub, qids, sizes = study["hub"], study["queue_ids"], study["sizes"]
    total = sum(sizes[q] for q in qids)
    result = cli_json(hub, "trace", SET_ID)
    assert result["looked_up_as"] == "set"
    view = result["study"]
    first_download, last_download = (
        view["recipients"][1].pop("first_download_at"),
        view["recipients"][1].pop("last_download_at"),
    )
    assert view == {
        "set_id": SET_ID,
        "parts_received": 20,
        "set_total": 20,
        "missing_parts": [],
        "mails_accepted": 20,
        "bytes": total,
        "senders": ["alpha"],
        "first_accepted_at": iso_time(study["received"][qids[0]]),
        "last_accepted_at": iso_time(study["received"][qids[-1]]),
        "recipients": [
            {
                "site": "beta",
                "delivered": 20,
                "downloaded": 0,
                "deleted": 0,
                "expired": 0,
                "waiting": 20,
                "first_download_at": None,
                "last_download_at": None,
                "acknowledged": 0,
                "last_receipt_at": None,
                "disposition": None,
            },
            {
                "site": "gamma",
                "delivered": 20,
                "downloaded": 10,
                "deleted": 10,
                "expired": 0,
                "waiting": 10,
                "acknowledged": 0,
                "last_receipt_at": None,
                "disposition": None,
            },
        ],
        "refusals": 0,
    }
    assert iso_time(study["before_download"]) <= first_download <= last_download <= iso_time(study["after_download"])
    assert [m["set_part"] for m in result["mails"]] == list(range(1, 21))
    assert [m["queue_id"] for m in result["mails"]] == qids
    assert [[(r["site"], r["state"]) for r in m["recipients"]] for m in result["mails"]] == (
        [[("beta", "waiting"), ("gamma", "deleted")]] * 10 + [[("beta", "waiting"), ("gamma", "waiting")]] * 10
    )

    text = hub.cli("trace", SET_ID).stdout
    assert text.startswith(f"study {SET_ID}: 20 of 20 part(s) received (20 mail(s), ")
    assert "\n  beta                     0 of 20          0        0       20  - / -\n" in text
    gamma = f"\n  gamma                   10 of 20         10        0       10  {first_download} / {last_download}\n"
    assert gamma in text
    assert text.count("\nmail ") == 20
    assert "still in the mailbox of: beta, gamma" in text


def test_trace_by_message_id_queue_id_and_address(study):
    hub, qids = study["hub"], study["queue_ids"]
    third_id = message_id(study["messages"][2])
    by_message_id = cli_json(hub, "trace", third_id)
    assert by_message_id["looked_up_as"] == "message-id"
    (mail,) = by_message_id["mails"]
    assert mail["queue_id"] == qids[2]
    assert [(e["kind"], e.get("site"), e.get("rcpt")) for e in mail["events"]] == [
        ("accepted", "alpha", None),
        ("delivered", "beta", "beta@hub.test"),
        ("delivered", "gamma", "gamma@hub.test"),
        ("downloaded", "gamma", None),
        ("deleted", "gamma", None),
    ]
    assert (mail["sender"], mail["client"], mail["size"], mail["set_part"], mail["set_total"]) == (
        "alpha@hub.test",
        "127.0.0.1",
        study["sizes"][qids[2]],
        3,
        20,
    )
    assert mail["recipients"][1]["downloads"][0]["protocol"] == "pop3"
    assert mail["recipients"][1]["downloads"][0]["client"] == "127.0.0.1"
    assert len(mail["sha256"]) == 64
    # without the angle brackets, and as a queue ID, and the same by explicit flags
    assert cli_json(hub, "trace", third_id.strip("<>"), "--message-id")["mails"] == [mail]
    assert cli_json(hub, "trace", qids[2])["mails"] == [mail]
    assert cli_json(hub, "trace", qids[2], "--queue-id")["looked_up_as"] == "queue-id"

    text = hub.cli("trace", qids[2]).stdout.splitlines()
    assert text[0] == f"mail {qids[2]} set {SET_ID} part 3/20 Message-ID {third_id}"
    assert [line.split()[1] for line in text[1:6]] == ["accepted", "delivered", "delivered", "downloaded", "deleted"]
    assert "from alpha <alpha@hub.test> [127.0.0.1]" in text[1]
    assert text[6] == "  still in the mailbox of: beta"

    by_address = cli_json(hub, "trace", "gamma@hub.test")
    assert by_address["looked_up_as"] == "address"
    assert sorted(m["queue_id"] for m in by_address["mails"]) == sorted(qids)
    assert len(cli_json(hub, "trace", "gamma@hub.test", "--limit", "5")["mails"]) == 5


def test_refusals_are_tracked(study):
    hub = study["hub"]
    by_sender = cli_json(hub, "trace", "alpha@hub.test", "--address")
    refused, too_big = by_sender["refusals"]
    assert (too_big["reply"][:3], too_big["rcpt"], len(too_big["queue_id"])) == ("552", "beta@hub.test", 19)
    assert {k: refused[k] for k in ("kind", "code", "reply", "site", "sender", "rcpt", "client", "queue_id")} == {
        "kind": "refused",
        "code": "550",
        "reply": "550 5.1.1 No such user here",
        "site": "alpha",
        "sender": "alpha@hub.test",
        "rcpt": "nobody@hub.test",
        "client": "127.0.0.1",
        "queue_id": None,
    }
    # an address the hub does not know, but the events do
    assert cli_json(hub, "trace", "nobody@hub.test")["refusals"] == [refused]
    assert (
        "refused     alpha <alpha@hub.test> [127.0.0.1] to <nobody@hub.test>: 550 5.1.1 No such user here"
        in hub.cli("trace", "nobody@hub.test").stdout
    )

    # the data of another set refused at the end of data: found by its set and by its Message-ID
    big = cli_json(hub, "trace", BIG_SET)
    (mail,) = big["mails"]
    assert mail["accepted_at"] is None and mail["recipients"] == []
    assert [(r["kind"], r["reply"], r["rcpt"]) for r in mail["refusals"]] == [
        ("refused", "552 5.3.4 Message size exceeds fixed maximum message size", "beta@hub.test")
    ]
    assert big["study"]["parts_received"] == 0 and big["study"]["refusals"] == 1
    assert cli_json(hub, "trace", study["big_message_id"])["mails"] == [mail]

    missing = hub.cli("trace", "no-such-set", check=False)
    assert (missing.returncode, missing.stdout) == (1, "")
    assert missing.stderr == "mailhub: nothing known about 'no-such-set' (looked up as a set)\n"


def test_stats_volumes_per_site_and_pair(study):
    hub, qids, sizes = study["hub"], study["queue_ids"], study["sizes"]
    total = sum(sizes[q] for q in qids)
    half = sum(sizes[q] for q in qids[:10])
    report = cli_json(hub, "stats", "--since", "1h")
    empty = {
        "submitted_messages": 0,
        "submitted_bytes": 0,
        "received_messages": 0,
        "received_bytes": 0,
        "downloaded_messages": 0,
        "downloaded_bytes": 0,
        "deleted_messages": 0,
        "refused": 0,
        "deferred": 0,
    }
    assert report["sites"] == [
        {**empty, "site": "alpha", "submitted_messages": 20, "submitted_bytes": total, "refused": 2},
        {**empty, "site": "beta", "received_messages": 20, "received_bytes": total},
        {
            **empty,
            "site": "gamma",
            "received_messages": 20,
            "received_bytes": total,
            "downloaded_messages": 10,
            "downloaded_bytes": half,
            "deleted_messages": 10,
        },
    ]
    assert report["totals"] == {
        "submitted_messages": 20,
        "submitted_bytes": total,
        "received_messages": 40,
        "received_bytes": 2 * total,
        "downloaded_messages": 10,
        "downloaded_bytes": half,
        "refused": 2,
        "deferred": 0,
    }
    assert report["pairs"] == [
        {"from": "alpha", "to": "beta", "messages": 20, "bytes": total},
        {"from": "alpha", "to": "gamma", "messages": 20, "bytes": total},
    ]
    assert [(r["kind"], r["site"], r["to_site"], r["reply"], r["count"]) for r in report["refusals"]] == [
        ("refused", "alpha", "-", "550 5.1.1 No such user here", 1),
        ("refused", "alpha", "beta", "552 5.3.4 Message size exceeds fixed maximum message size", 1),
    ]
    oldest = iso_time(study["received"][qids[0]])
    assert report["backlogs"] == [
        {"site": "beta", "messages": 20, "bytes": total, "oldest_at": oldest},
        {"site": "gamma", "messages": 10, "bytes": total - half, "oldest_at": iso_time(study["received"][qids[10]])},
    ]
    assert cli_json(hub, "stats", "--top", "1")["backlogs"] == report["backlogs"][:1]
    # per study and receiving site: parts accepted, fetched, acknowledged (no receipts here), waiting
    by_site = {s["site"]: s for s in report["studies"] if s["set_id"] == SET_ID}
    assert [
        (s["parts_accepted"], s["set_total"], s["parts_fetched"], s["parts_acknowledged"], s["parts_waiting"])
        for s in (by_site["beta"], by_site["gamma"])
    ] == [(20, 20, 0, 0, 20), (20, 20, 10, 0, 10)]
    assert by_site["gamma"]["last_fetched_at"] is not None and by_site["beta"]["last_fetched_at"] is None

    # a period before the traffic: no volumes, the backlogs are those of now
    earlier = cli_json(hub, "stats", "--since", "2020-01-01", "--until", "2020-01-02T00:00")
    assert (earlier["since"], earlier["until"]) == ("2020-01-01T00:00:00.000Z", "2020-01-02T00:00:00.000Z")
    assert earlier["sites"] == [] and earlier["pairs"] == [] and earlier["totals"]["submitted_messages"] == 0
    bad = hub.cli("stats", "--since", "yesterday", check=False)
    assert bad.returncode == 2 and "expected a span like 24h or 7d" in bad.stderr

    text = hub.cli("stats").stdout
    assert re.search(r"\nalpha +20 / [\d.]+ KiB +0 / 0 B +0 / 0 B +2 +0\n", text), text
    assert re.search(r"\ngamma +0 / 0 B +20 / [\d.]+ KiB +10 / [\d.]+ KiB +0 +0\n", text), text
    assert re.search(r"\nalpha +gamma +20 / [\d.]+ KiB\n", text), text
    assert "      1 x refused  alpha -> -: 550 5.1.1 No such user here" in text


def test_site_show_has_the_recent_activity(study):
    hub, qids, sizes = study["hub"], study["queue_ids"], study["sizes"]
    half = sum(sizes[q] for q in qids[:10])
    gamma = cli_json(hub, "site", "show", "gamma")
    assert gamma["activity"] == {
        "window_seconds": 3600.0,
        "oldest_waiting_at": iso_time(study["received"][qids[10]]),
        "downloaded_messages": 10,
        "downloaded_bytes": half,
        "download_rate_bytes_per_second": half / 3600,
        "refusals_as_sender": [],
        "refusals_as_recipient": [],
    }
    assert "throttle" in gamma  # the server's live throttle state stays beside it
    alpha = cli_json(hub, "site", "show", "alpha")["activity"]
    assert [(r["kind"], r["reply"], r["count"]) for r in alpha["refusals_as_sender"]] == [
        ("refused", "550 5.1.1 No such user here", 1),
        ("refused", "552 5.3.4 Message size exceeds fixed maximum message size", 1),
    ]
    beta = cli_json(hub, "site", "show", "beta")["activity"]
    assert [r["reply"][:3] for r in beta["refusals_as_recipient"]] == ["552"]
    text = hub.cli("site", "show", "gamma").stdout
    assert "\nactivity:  last 60 min: downloaded 10 mail(s), " in text
    assert f"\nactivity:  oldest waiting: {gamma['activity']['oldest_waiting_at']}\n" in text


def test_events_are_pruned_and_site_removal_is_tracked(make_hub):
    hub = make_hub(sites=ALPHA_BETA, MAILHUB_EVENTS_RETENTION_DAYS="10")
    hub.start()
    hub.cli("site", "set", "beta", "--mailbox-messages", "1")
    hub.sites_reloaded()
    client = smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=60)
    client.login("alpha", PASSWORD)
    client.sendmail(
        "alpha@hub.test", ["beta@hub.test"], make_message().replace(b"Message-ID: <", b"Message-ID: <\x1b[31mred.", 1)
    )
    ((qid,),) = hub.query("SELECT queue_id FROM messages")
    wait_for(
        lambda: hub.cli("site", "show", "beta", "--json").stdout.count('"used": 1') >= 1,
        interval=0.05,
        message="beta's mailbox shown as used",
    )
    client.mail("alpha@hub.test")  # beta's mailbox is full now: a deferral
    code, reply = client.rcpt("beta@hub.test")
    client.quit()
    assert (code, reply) == (452, b"4.2.2 Mailbox of the recipient site is full, try again later")
    deferred = wait_for(lambda: cli_json(hub, "stats")["refusals"], interval=0.05, message="a refusal in stats")
    assert [(d["kind"], d["site"], d["to_site"], d["reply"], d["count"]) for d in deferred] == [
        ("deferred", "alpha", "beta", "452 4.2.2 Mailbox of the recipient site is full, try again later", 1)
    ]
    assert cli_json(hub, "stats")["totals"]["deferred"] == 1
    assert [r["kind"] for r in cli_json(hub, "site", "show", "beta")["activity"]["refusals_as_recipient"]] == [
        "deferred"
    ]
    shown = hub.cli("trace", qid).stdout  # client-supplied text cannot drive the terminal
    assert "\x1b" not in shown and "Message-ID <\\x1b[31mred." in shown
    pop = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=60)  # a session that ends without QUIT
    pop.user("beta")
    pop.pass_(PASSWORD)
    pop.retr(1)
    pop.close()
    wait_for(
        lambda: hub.query("SELECT count(*) FROM events WHERE kind = 'downloaded'") == [(1,)],
        interval=0.05,
        message="a downloaded event",
    )
    hub.cli("site", "remove", "beta")
    mail = cli_json(hub, "trace", qid)["mails"][0]
    assert [(e["kind"], e.get("site"), e.get("detail")) for e in mail["events"]][1:] == [
        ("delivered", "beta", None),
        ("downloaded", "beta", "pop3"),
        ("deleted", "beta", "site removed"),
    ]

    def age(days: float, count: int) -> None:
        conn = sqlite3.connect(hub.data_dir / "index.sqlite3")
        conn.executemany(
            "INSERT INTO events (at, kind, site, size) VALUES (?, 'accepted', 'old', 1)",
            [(time.time() - days * 86400,)] * count,
        )
        conn.commit()
        conn.close()

    age(20, 7)
    age(5, 3)
    assert hub.cli("events", "prune").stdout == "pruned 7 event(s) older than 10 day(s)\n"
    assert hub.cli("events", "prune", "--older-than", "4").stdout == "pruned 3 event(s) older than 4 day(s)\n"
    assert hub.query("SELECT count(*) FROM events") == [(5,)]  # accepted, delivered, deferred, downloaded, deleted

    hub.stop()  # the server prunes by itself at start (then hourly)
    age(11, 6001)  # more than one pruning batch
    hub.start()
    wait_for(
        lambda: hub.query("SELECT count(*) FROM events WHERE site = 'old'") == [(0,)],
        interval=0.05,
        message="the old site's events pruned",
    )
    wait_for(
        lambda: "pruned 6001 tracking event(s) older than 10 days" in hub.log_text(),
        interval=0.05,
        message="the prune logged",
    )
    assert hub.query("SELECT count(*) FROM events") == [(5,)]


def test_reports_without_an_index_say_so(tmp_path):
    hub = Hub(tmp_path / "none", hub_env(tmp_path / "none"))
    for args in (("trace", "x"), ("stats",)):
        result = hub.cli(*args, check=False)
        assert result.returncode == 1 and result.stdout == ""
        assert (
            result.stderr == f"mailhub: cannot open the index at {tmp_path / 'none' / 'index.sqlite3'}: no index at"
            f" {tmp_path / 'none' / 'index.sqlite3'}\n"
        )
    assert not (tmp_path / "none").exists()  # reading creates nothing
    bad = hub.cli("trace", "x", "--limit", "0", check=False)
    assert bad.returncode == 2 and "--limit: expected a whole number >= 1, got '0'" in bad.stderr


def test_imap_downloads_are_tracked_with_their_protocol(hub):
    with smtplib.SMTP("127.0.0.1", hub.smtp_port) as smtp:
        smtp.login("alpha", PASSWORD)
        smtp.sendmail("alpha@hub.test", ["beta@hub.test"], part_message(1, "imap-set"))
    imap = imaplib.IMAP4("127.0.0.1", hub.ports["imap"])
    imap.login("beta", PASSWORD)
    imap.select("INBOX")
    assert imap.fetch("1", "(BODY[])")[0] == "OK"
    imap.logout()

    def downloaded():
        mails = cli_json(hub, "trace", "imap-set", "--set")["mails"]
        return mails and [d for r in mails[0]["recipients"] for d in r["downloads"]]

    wait_for(downloaded, interval=0.05, message="the IMAP download in the trace")
    (download,) = downloaded()
    assert (download["protocol"], download["client"]) == ("imap", "127.0.0.1")
