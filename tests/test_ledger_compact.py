# Ledger compaction (`mailhub storage compact-ledger`, storage/ledger_compact.py): the lines of mails
# whose bytes are gone are dropped, what rebuild-index needs about the mails still stored is kept;
# a rebuild from the compacted ledger (index lost) gives the same mailboxes as before; killing the
# command at each step of its file replacement loses nothing and brings nothing back. Counts printed.
import json
import signal
import smtplib

from conftest import ALPHA_BETA, PASSWORD, make_message, queue_id_from


def send(hub, sizes: list[int]) -> list[str]:
    qids = []
    with smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=60) as client:
        client.login("beta", PASSWORD)
        for i, size in enumerate(sizes):
            client.mail("beta@hub.test")
            client.rcpt("alpha@hub.test")
            code, reply = client.data(make_message(size, subject=f"mail {i}"))
            assert code == 250, reply
            qids.append(queue_id_from(reply))
    return qids


def pop3_delete(hub, qids: list[str]) -> None:
    import poplib

    order = [
        q
        for (q,) in hub.query(
            "SELECT b.queue_id FROM mailbox b JOIN sites s ON s.id = b.site_id WHERE s.name = 'alpha' ORDER BY b.uid"
        )
    ]
    client = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=30)
    client.user("alpha")
    client.pass_(PASSWORD)
    for qid in qids:
        client.dele(order.index(qid) + 1)
    assert client.quit().startswith(b"+OK")


def mailboxes(hub) -> set[tuple[str, str]]:
    return set(hub.query("SELECT s.name, b.queue_id FROM mailbox b JOIN sites s ON s.id = b.site_id"))


def rebuild_from_blobs(hub) -> set[tuple[str, str]]:
    """Lose the index, rebuild it from the blobs and the ledger; the mailboxes it holds."""
    for suffix in ("", "-wal", "-shm"):
        (hub.data_dir / f"index.sqlite3{suffix}").unlink(missing_ok=True)
    hub.cli("storage", "rebuild-index")
    return mailboxes(hub)


def ledger_files(hub) -> list[str]:
    return sorted(p.name for p in (hub.data_dir / "ledger").glob("*.jsonl"))


def test_compaction_keeps_what_rebuild_needs_and_survives_a_kill_at_each_step(make_hub):
    hub = make_hub(sites=ALPHA_BETA, MAILHUB_STORAGE_SCRUB_RATE="0").start()
    small = send(hub, [3_000, 4_000, 5_000, 6_000])  # one pack
    large = send(hub, [2_500_000, 2_600_000, 2_700_000])  # files of their own
    pop3_delete(hub, small[:2] + large[:2])  # packed: a hole, the records stay; files: unlinked
    expected = mailboxes(hub)
    assert expected == {("alpha", q) for q in small[2:] + large[2:]}
    hub.stop()
    hub.start()  # start-up empties the trash: the deleted files are gone
    hub.stop()
    assert not any(p.name in large[:2] for p in hub.blob_files())
    before = ledger_files(hub)
    lines_before = sum(len(p.read_bytes().splitlines()) for p in (hub.data_dir / "ledger").glob("*.jsonl"))

    lost = resurrected = 0
    for point in ("snapshot_written", "snapshot_renamed", "old_file_removed"):
        env = dict(hub.env, MAILHUB_FAULT=f"compact:{point}:kill")
        saved, hub.env = hub.env, env
        try:
            result = hub.cli("storage", "compact-ledger", check=False)
        finally:
            hub.env = saved
        assert result.returncode == -signal.SIGKILL, (point, result.returncode, result.stderr)
        got = rebuild_from_blobs(hub)
        lost += len(expected - got)
        resurrected += len(got - expected)
        assert got == expected, point

    report = json.loads(hub.cli("storage", "compact-ledger", "--json").stdout)
    assert report["today_included"] and ledger_files(hub) == ["00000000.jsonl"]
    # the lines still speak of 3 stored mails: the 2 deleted packed ones (removals) and large[2] (its
    # file mark); the killed runs that got past the rename already dropped the 2 deleted files' lines
    assert report["mails_kept"] == 3
    assert report["lines_after"] < lines_before
    lines = [json.loads(line) for line in (hub.data_dir / "ledger" / "00000000.jsonl").read_text().splitlines()]
    assert not any(str(doc.get("q")) in large[:2] for doc in lines)
    assert not any(q in large[:2] for doc in lines for q in doc.get("f", ()))
    assert {doc["q"] for doc in lines if "d" in doc} == set(small[:2])  # their records are still in the pack
    got = rebuild_from_blobs(hub)
    lost += len(expected - got)
    resurrected += len(got - expected)
    assert got == expected
    again = json.loads(hub.cli("storage", "compact-ledger", "--json").stdout)
    assert again["lines_after"] == report["lines_after"] and again["mails_dropped"] == 0

    for site in ("alpha", "beta"):  # sites made again from the mails' records have no password
        hub.cli("site", "passwd", site, "--password-stdin", stdin=PASSWORD + "\n")
    hub.start()  # the hub starts on a compacted ledger and goes on appending to it
    new = send(hub, [7_000])
    pop3_delete(hub, [large[2]])
    hub.stop()
    expected = (expected - {("alpha", large[2])}) | {("alpha", new[0])}
    assert rebuild_from_blobs(hub) == expected
    print(
        f"ledger compaction: files {len(before)} -> 1, lines {lines_before} -> {report['lines_after']},"
        f" kills at 3 steps: lost={lost} brought back={resurrected}"
    )


def test_compaction_beside_a_running_hub_leaves_todays_file_alone(make_hub):
    hub = make_hub(sites=ALPHA_BETA, MAILHUB_STORAGE_SCRUB_RATE="0").start()
    send(hub, [3_000])
    today = ledger_files(hub)
    past = hub.data_dir / "ledger" / "20000101.jsonl"  # a past day's file: a commit and a removal of a gone mail
    past.write_text('{"c":0,"a":1,"f":["GONE1"],"at":1}\n{"d":1,"q":"GONE1","s":1,"n":"alpha","u":1,"at":1}\n')
    report = json.loads(hub.cli("storage", "compact-ledger", "--json").stdout)
    assert not report["today_included"] and report["files_before"] == 1 and report["mails_dropped"] == 1
    assert ledger_files(hub) == sorted(["00000000.jsonl"] + today)
    send(hub, [3_000])  # the hub goes on
    result = hub.cli("storage", "check")
    assert "no problems found" in result.stdout, result.stdout
    hub.stop()
