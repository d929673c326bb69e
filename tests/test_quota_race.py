# Mailbox quotas under concurrency: 20 SMTP sessions at once into two nearly full mailboxes (one
# limited in bytes, one in messages), with and without SIZE=, packed and single-file mails. The
# limits hold exactly, every refusal is 452 4.2.2, every 250 is stored, and afterwards nothing is
# left reserved (the live usage equals the index's). Plus the index writer's own check, the last
# word, refusing a batch's message that a mailbox has no room for.
import hashlib
import os
import random
import smtplib
import threading
import time
import urllib.request

import pytest

from storage import Delivery, MessageMeta
from storage.index_writer import BatchItem, IndexWriter

from conftest import ALPHA, PASSWORD, make_message, queue_id_from, wait_for

# Every test that starts a hub runs on SQLite and again on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_engines

SENDERS = 20
PER_SENDER = 4
KB = 1024


def _usage(hub, site: str) -> tuple[int, int]:
    return hub.query(
        "SELECT coalesce(sum(u.held_bytes), 0), coalesce(sum(u.held_messages), 0)"
        " FROM mailbox_usage u JOIN sites s ON s.id = u.receiver_id WHERE s.name = ?",
        site,
    )[0]


def _ratio(port: int, site: str, quota: str) -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    prefix = f'mailhub_site_quota_usage_ratio{{quota="{quota}",site="{site}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return None


def _wait_for_ratio(port: int, site: str, quota: str, expected: float) -> None:
    wait_for(
        lambda: _ratio(port, site, quota) == expected,
        timeout=20,
        interval=0.05,
        message=lambda: f"{site}'s {quota} ratio {expected}, found {_ratio(port, site, quota)}",
    )


def test_parallel_senders_never_exceed_mailbox_limits(make_hub):
    hub = make_hub(sites=ALPHA, MAILHUB_THROTTLE_DRAIN_ADMISSION="false", MAILHUB_THROTTLE_INTERVAL="0.2")
    hub.add_site("bytes", "bytes@hub.test")
    hub.add_site("count", "count@hub.test")
    hub.start()
    prefill = make_message(50 * KB, subject="prefill")
    with smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=60) as client:
        client.login("alpha", PASSWORD)
        for _ in range(3):
            client.sendmail("alpha@hub.test", ["bytes@hub.test", "count@hub.test"], prefill)
    held_bytes, held_count = _usage(hub, "bytes")
    byte_limit = held_bytes + 3 * 1024 * KB  # room for about 3 MB more
    count_limit = held_count + 9  # room for 9 more mails
    hub.cli("site", "set", "bytes", "--mailbox-bytes", str(byte_limit))
    hub.cli("site", "set", "count", "--mailbox-messages", str(count_limit))
    _wait_for_ratio(hub.ports["metrics"], "bytes", "mailbox_bytes", held_bytes / byte_limit)  # the hub has them
    _wait_for_ratio(hub.ports["metrics"], "count", "mailbox_messages", held_count / count_limit)
    results = []  # (recipient, code, reply, queue ID)
    lock = threading.Lock()
    start = threading.Barrier(SENDERS)

    def sender(n: int) -> None:
        rng = random.Random(n)
        with smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=120) as client:
            client.login("alpha", PASSWORD)
            start.wait()
            for i in range(PER_SENDER):
                rcpt = "bytes@hub.test" if (n + i) % 2 else "count@hub.test"
                size = 2500 * KB if rng.random() < 0.1 else rng.randrange(20 * KB, 400 * KB)
                body = make_message(size, subject=f"race {n}/{i}")
                declared = rng.choice([None, len(body) + 600, len(body) * 2])  # with Received:, or more
                options = [f"SIZE={declared}"] if declared else []
                code, reply = client.mail("alpha@hub.test", options)
                assert code == 250, reply
                code, reply = client.rcpt(rcpt)
                if code == 250:
                    code, reply = client.data(body)
                else:
                    client.rset()
                with lock:
                    results.append((rcpt, code, reply, queue_id_from(reply) if code == 250 else None))

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(SENDERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert len(results) == SENDERS * PER_SENDER
    acknowledged = [r for r in results if r[1] == 250]
    refused = [r for r in results if r[1] != 250]
    assert all(code == 452 and reply.startswith(b"4.2.2") for _, code, reply, _ in refused), refused
    stored = {qid for (qid,) in hub.query("SELECT queue_id FROM messages")}
    lost = [r for r in acknowledged if r[3] not in stored]
    final_bytes, final_count = _usage(hub, "bytes")
    count_bytes, count_count = _usage(hub, "count")
    print(
        f"quota race: attempts={len(results)} acknowledged={len(acknowledged)} refused={len(refused)}"
        f" lost={len(lost)} bytes-site {final_bytes}/{byte_limit} B, count-site {count_count}/{count_limit} mails"
    )
    assert not lost
    assert final_bytes <= byte_limit and count_count <= count_limit
    assert count_count == count_limit, "the count-limited mailbox was not filled (more senders tried)"
    assert byte_limit - final_bytes < 400 * KB + 1000, "the byte-limited mailbox has room a refused mail needed"
    assert any(r[0] == "bytes@hub.test" for r in refused) and any(r[0] == "count@hub.test" for r in refused)
    # nothing left reserved: the live usage the throttle reports is the index's, exactly
    _wait_for_ratio(hub.ports["metrics"], "bytes", "mailbox_bytes", final_bytes / byte_limit)
    _wait_for_ratio(hub.ports["metrics"], "count", "mailbox_messages", count_count / count_limit)
    hub.stop()
    assert "Traceback" not in hub.log_text()


def _item(qid: str, site_id: int, size: int, max_bytes=None, max_messages=None) -> BatchItem:
    meta = MessageMeta("a@x", None, False)
    return BatchItem(
        qid,
        size,
        time.time(),
        meta,
        [Delivery(site_id, "b@x", "beta", max_bytes, max_messages)],
        [],
        None,
        f"2026112815/{qid}",
        sha256=hashlib.sha256(os.urandom(size)).hexdigest(),
    )


def test_index_writer_refuses_what_a_mailbox_has_no_room_for(tmp_path):
    """The writer's check inside the commit's transaction: whatever the server reserved, a
    message that takes a mailbox over its limit gets no rows; the others of the batch go in."""
    writer = IndexWriter(tmp_path, 0)
    try:
        writer.conn.execute("INSERT INTO sites (id, name, password_hash, created_at) VALUES (4, 'beta', 'x', 0)")
        batch = [_item(f"Q{i}", 4, 1000, max_bytes=2500) for i in range(3)]  # the third does not fit
        batch += [_item(f"R{i}", 4, 10, max_messages=3) for i in range(2)]  # a third message, not a fourth
        batch.append(_item("S0", 4, 10))  # unlimited (a bounce)
        digests = writer.commit_batch(batch, [], writer.seq + 1, 1)
        assert [d is not None for d in digests] == [True, True, False, True, False, True]
        rows = [qid for (qid,) in writer.conn.execute("SELECT queue_id FROM mailbox ORDER BY uid")]
        assert rows == ["Q0", "Q1", "R0", "S0"]
        assert writer.conn.execute("SELECT count(*) FROM events WHERE queue_id IN ('Q2', 'R1')").fetchone() == (0,)
    finally:
        writer.close()


def _volume_item(qid: str, at: float, size: int, to: int, sender: int | None, day=None, month=None, submitted=None):
    meta = MessageMeta("a@x", sender, False, max_submitted_day=submitted)
    to_ = [Delivery(to, "b@x", "beta", max_received_day=day, max_received_month=month)]
    return BatchItem(qid, size, at, meta, to_, [], None, f"2026112815/{qid}", sha256="cd" * 32)


def test_index_writer_refuses_what_a_volume_quota_has_no_room_for(tmp_path):
    """The same last check for the volume quotas: the receiver's received volume of the mail's UTC
    day and month, the sender's submitted volume of its day, counting the index's volumes (here
    left by mails this writer's ledger never saw, as another node's are) and the batch's earlier
    messages; each refused message says which quota (a SHA-256 otherwise)."""
    from storage.errors import REFUSED_RECEIVED, REFUSED_SUBMITTED, SubmittedVolumeLimitReached, refusal

    writer = IndexWriter(tmp_path, 0)
    try:
        for site_id, name in ((4, "beta"), (5, "alpha")):
            writer.conn.execute(
                "INSERT INTO sites (id, name, password_hash, created_at) VALUES (?, ?, 'x', 0)", (site_id, name)
            )
        day = 1_700_000_000.0  # 2023-11-14 22:13 UTC
        writer.commit_batch([_volume_item("P0", day, 600, 4, 5)], [], writer.seq + 1, 1)  # in the index
        batch = [
            _volume_item("Q0", day + 1, 300, 4, None, day=1000),  # 600 + 300 fits
            _volume_item("Q1", day + 2, 200, 4, None, day=1000),  # 1100: over the day
            _volume_item("Q2", day + 7200, 200, 4, None, day=1000, month=2000),  # the next UTC day: fits
            _volume_item("Q3", day + 7300, 1000, 4, None, month=2000),  # month 600+300+200+1000: over
            _volume_item("Q4", day + 3, 100, 4, 5, submitted=650),  # alpha submitted 600 + 100: over
            _volume_item("Q5", day + 4, 50, 4, 5, submitted=650),  # 650: fits
        ]
        digests = writer.commit_batch(batch, [], writer.seq + 1, 2)
        assert digests == ["cd" * 32, REFUSED_RECEIVED, "cd" * 32, REFUSED_RECEIVED, REFUSED_SUBMITTED, "cd" * 32]
        assert isinstance(refusal(digests[4]), SubmittedVolumeLimitReached)
        assert refusal(digests[1]).reply.startswith("452 4.2.1") and refusal(digests[0]) is None
        rows = [qid for (qid,) in writer.conn.execute("SELECT queue_id FROM mailbox ORDER BY uid")]
        assert rows == ["P0", "Q0", "Q2", "Q5"]
    finally:
        writer.close()


def test_index_writer_claims_a_sent_mark_on_sqlite(tmp_path):
    """The writer's claim of a message's "sent" mark on SQLite (one node: a restart's second try): a
    lifecycle notice at or below the notices' mark is left out (AlreadyMarked), a later one stored;
    a directory mark is claimed by changing it (the same value again is left out, a lower one stored)."""
    from storage.errors import REFUSED_MARKED, AlreadyMarked, refusal
    from storage.lifecycle import NOTICE_MARK

    def marked(qid: str, key: str, value: int) -> BatchItem:
        meta = MessageMeta("", None, False)
        to = [Delivery(4, "b@x", "beta")]
        return BatchItem(qid, 10, time.time(), meta, to, [], (key, value), f"2026112815/{qid}", sha256="ef" * 32)

    writer = IndexWriter(tmp_path, 0)
    try:
        writer.conn.execute("INSERT INTO sites (id, name, password_hash, created_at) VALUES (4, 'beta', 'x', 0)")
        batch = [
            marked("N1", NOTICE_MARK, 3),
            marked("N2", NOTICE_MARK, 3),  # the same notice again
            marked("N3", NOTICE_MARK, 2),  # one already past
            marked("N4", NOTICE_MARK, 4),
            marked("D1", "hub_key_announced", 9),
            marked("D2", "hub_key_announced", 9),
            marked("D3", "hub_key_announced", 5),
        ]
        digests = writer.commit_batch(batch, [], writer.seq + 1, 1)
        assert digests == ["ef" * 32, REFUSED_MARKED, REFUSED_MARKED, "ef" * 32, "ef" * 32, REFUSED_MARKED, "ef" * 32]
        assert isinstance(refusal(digests[1]), AlreadyMarked)
        rows = [qid for (qid,) in writer.conn.execute("SELECT queue_id FROM mailbox ORDER BY uid")]
        assert rows == ["N1", "N4", "D1", "D3"]
        marks = dict(
            writer.conn.execute("SELECT key, value FROM meta WHERE key IN (?, 'hub_key_announced')", (NOTICE_MARK,))
        )
        assert marks == {NOTICE_MARK: 4, "hub_key_announced": 5}
    finally:
        writer.close()
