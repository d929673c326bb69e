# Fault injection along the commit path (issue 21, "one outcome per transaction"): the hub and its
# index writer are killed (SIGKILL) or fail (EIO, ENOSPC) at each named point (storage/faults.py)
# while senders deliver small (packed) and large (a file of their own) mails. A sender that gets a
# 4xx or loses its connection sends the same mail again, as SMTP clients do. Afterwards every mail
# acknowledged with a 250 is stored once and intact (lost = 0, duplicated = 0); a 4xx leaves no
# trace (no row, no blob or pack bytes, no mailbox usage); the only copies beyond one come from a
# connection lost after the commit (SMTP cannot tell the sender: counted, not hidden). Also: damage
# found at start (truncated blob files and packs), and a receiver's deletion cut by the writer's
# death before or after its commit.
import hashlib
import os
import poplib
import re
import smtplib
import urllib.request

import pytest

from conftest import ALPHA_BETA, PASSWORD, make_message, wait_for

SMALL, LARGE = 5_000, 2_600_000
MAILS = 4
MID_RE = re.compile(rb"^Message-ID: <([^>]+)>", re.M | re.I)

PACK_POINTS = ["before_pack", "pack_written", "pack_synced"]  # the hub writes packs (storage/packs.py)
WRITER_POINTS = ["before_commit", "after_commit"]  # the index writer process: rows only
CASES = (
    [("writer", point, "kill", size) for point in WRITER_POINTS for size in ("small", "large")]
    + [("hub", point, "kill", "small") for point in PACK_POINTS]
    + [
        ("hub", "pack_written", "eio", "small"),
        ("hub", "pack_synced", "enospc", "small"),
        ("writer", "before_commit", "eio", "small"),
        ("writer", "before_commit", "eio", "large"),
    ]
    + [("hub", point, "kill", size) for point in ("before_batch", "committed") for size in ("small", "large")]
    + [("hub", "blob_synced", "kill", "large")]
)


def deliver(hub, message: bytes) -> str:
    """'250 <qid>', the 4xx reply, or 'dropped' (the connection went without a reply)."""
    try:
        client = smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30)
        client.login("alpha", PASSWORD)
        client.mail("alpha@hub.test")
        client.rcpt("beta@hub.test")
        code, reply = client.data(message)
    except (smtplib.SMTPServerDisconnected, ConnectionError, OSError):
        return "dropped"
    try:
        client.quit()
    except (smtplib.SMTPException, OSError):
        pass
    return f"{code} {reply.decode()}"


def no_trace(hub) -> list[str]:
    """What a transaction that was refused must not leave: blob files or pack bytes no index row
    explains, spool files, or mailbox usage beyond the mailbox's rows."""
    problems = []
    indexed = {b for (b,) in hub.query("SELECT DISTINCT blob FROM messages")}
    ends = dict(hub.query("SELECT blob, committed_end FROM packs"))
    for path in hub.blob_files():
        name = str(path.relative_to(hub.data_dir / "blobs"))
        if name not in indexed:
            problems.append(f"blob file without a row: {name}")
        elif name in ends and path.stat().st_size != ends[name]:
            problems.append(f"pack {name} has {path.stat().st_size - ends[name]} bytes past its committed end")
    problems += [f"spool file {p.name}" for p in (hub.data_dir / "spool").iterdir()]
    ((held,),) = hub.query("SELECT coalesce(sum(held_messages), 0) FROM mailbox_usage")
    ((rows,),) = hub.query("SELECT count(*) FROM mailbox")
    if held != rows:
        problems.append(f"mailbox usage counts {held} mails, the mailbox holds {rows}")
    return problems


def stored_by_message_id(hub) -> dict[str, list[str]]:
    """Message-ID -> SHA-256 of each stored copy (the hub's Received: line stripped)."""
    found: dict[str, list[str]] = {}
    for _qid, blob, offset, size in hub.query("SELECT queue_id, blob, blob_offset, size FROM messages"):
        with open(hub.data_dir / "blobs" / blob, "rb") as f:
            data = os.pread(f.fileno(), size, offset)
        body = data[data.index(b"\r\nFrom: ") + 2 :]
        found.setdefault(MID_RE.search(body).group(1).decode(), []).append(hashlib.sha256(body).hexdigest())
    return found


def arm_fault(make_hub, monkeypatch, armed, fault: str, **overrides: str):
    """A hub with `fault` (process:point:action) armed while the file `armed` exists. A fault of the
    index writer needs only the writer child to read it: the hub runs in this process and the
    writer it spawns inherits this process's environment. A fault of the hub itself needs a
    `mailhub serve` process (its fault points are read at import)."""
    settings = {"MAILHUB_FAULT": fault, "MAILHUB_FAULT_FILE": str(armed)}
    if fault.startswith("writer:"):
        for name, value in settings.items():
            monkeypatch.setenv(name, value)
        return make_hub(sites=ALPHA_BETA, **overrides)
    return make_hub(sites=ALPHA_BETA, **settings, **overrides)


@pytest.mark.parametrize("process,point,action,size", CASES, ids=["-".join(c) for c in CASES])
def test_one_outcome_per_transaction(make_hub, monkeypatch, tmp_path, process, point, action, size):
    armed = tmp_path / "fault-armed"
    hub = arm_fault(make_hub, monkeypatch, armed, f"{process}:{point}:{action}")
    assert hub.process == (process == "hub")
    hub.start()
    armed.write_text("once")
    mails = [make_message(SMALL if size == "small" else LARGE, subject=f"fault {i}") for i in range(MAILS)]
    outcomes = {"acknowledged": 0, "refused_4xx": 0, "dropped": 0, "retries": 0}
    after_4xx, after_drop, acknowledged = set(), set(), {}
    for message in mails:
        mid = MID_RE.search(message).group(1).decode()
        for _attempt in range(3):
            reply = deliver(hub, message)
            if reply.startswith("250"):
                outcomes["acknowledged"] += 1
                acknowledged[mid] = hashlib.sha256(message).hexdigest()
                break
            outcomes["retries"] += 1
            if reply == "dropped":
                outcomes["dropped"] += 1
                after_drop.add(mid)
                assert process == "hub", "a connection dropped but the hub lives on"
                wait_for(lambda: hub.proc.poll() is not None, message="the hub exits after dropping a connection")
                hub.stop()
                hub.in_process_from_now_on().start()  # start-up recovery; the fault is spent (its file is gone)
                continue
            assert reply[:1] == "4", reply
            outcomes["refused_4xx"] += 1
            after_4xx.add(mid)
            assert reply.startswith(("451", "452")), reply
            problems = no_trace(hub)
            assert not problems, f"a refused transaction left a trace: {problems}"
    assert not armed.exists(), "the fault never fired"
    monkeypatch.delenv("MAILHUB_FAULT", raising=False)  # spent: the CLI below may run in this process
    assert hub.stop() == 0
    hub.in_process_from_now_on().start()  # recovery once more, then count
    copies = stored_by_message_id(hub)
    lost = [mid for mid in acknowledged if mid not in copies]
    damaged = [mid for mid, digest in acknowledged.items() if any(d != digest for d in copies.get(mid, ()))]
    duplicated = [mid for mid in acknowledged if len(copies.get(mid, ())) > 1 and mid not in after_drop]
    drop_copies = sum(len(copies.get(mid, ())) - 1 for mid in after_drop)
    quarantined = len(hub.cli("storage", "quarantine", "--json").stdout.split('"reason"')) - 1
    print(
        f"\n{process}:{point}:{action} {size}: {len(mails)} mails, {outcomes}, stored"
        f" {sum(map(len, copies.values()))}, lost {len(lost)}, duplicated {len(duplicated)}, damaged"
        f" {len(damaged)}, extra copies after a lost connection {drop_copies}, quarantined {quarantined}"
    )
    assert len(acknowledged) == len(mails)
    assert lost == [] and duplicated == [] and damaged == []
    assert not no_trace(hub)
    if process == "writer" or point != "committed":
        assert drop_copies == 0  # only a hub killed after its commit leaves the sender in doubt
    if process == "writer" and action == "kill" and point == "after_commit":
        assert outcomes["refused_4xx"] == 0, "committed, so the sender must get its 250"
        assert "after committing" in hub.log_text()
    if action != "kill" or (process == "writer" and point == "before_commit"):
        assert outcomes["refused_4xx"] == 1
    assert hub.stop() == 0


def test_truncated_blobs_and_packs_found_at_start(make_hub):
    hub = make_hub(sites=ALPHA_BETA).start()
    qids = []
    for i, size in enumerate([SMALL] * 4 + [LARGE] * 2):
        reply = deliver(hub, make_message(size, subject=f"t {i}"))
        qids.append(reply.split()[-1])
    assert hub.stop() == 0
    rows = {q: (b, o, s) for q, b, o, s in hub.query("SELECT queue_id, blob, blob_offset, size FROM messages")}
    large_blob, _, large_size = rows[qids[4]]
    os.truncate(hub.data_dir / "blobs" / large_blob, large_size // 2)  # a file of its own, cut in two
    pack, offset, small_size = rows[qids[3]]  # the pack's last mail, cut
    os.truncate(hub.data_dir / "blobs" / pack, offset + small_size // 2)
    hub.start()
    left = {q for (q,) in hub.query("SELECT queue_id FROM messages")}
    assert left == set(qids) - {qids[3], qids[4]}
    for qid in left:
        blob, offset, size = rows[qid]
        with open(hub.data_dir / "blobs" / blob, "rb") as f:
            data = os.pread(f.fileno(), size, offset)
        (sha,) = hub.query("SELECT sha256 FROM messages WHERE queue_id = ?", qid)[0]
        assert hashlib.sha256(data).hexdigest() == sha
    entries = hub.cli("storage", "quarantine", "--json").stdout
    assert entries.count('"short_blob"') == 3, entries  # two records of rows, and what was left of the file
    assert qids[3] in entries and qids[4] in entries
    client = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=30)
    client.user("beta")
    client.pass_(PASSWORD)
    assert len(client.list()[1]) == 4  # the four intact ones, served
    client.quit()
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{hub.ports['metrics']}/metrics", timeout=10).read().decode()
    assert 'mailhub_quarantine_entries{reason="short_blob"} 3.0' in metrics
    print("\n6 mails, 2 truncated at start: 2 quarantined (index rows), 4 served intact, lost 0")
    assert hub.cli("storage", "check").returncode == 0


@pytest.mark.parametrize("point", ["delete_before_commit", "delete_after_commit"])
def test_a_deletion_cut_by_the_writers_death_is_done_once_or_not_at_all(make_hub, monkeypatch, tmp_path, point):
    # before its commit: the deletion never happened (the gateway is told so and deletes again);
    # after it, before its ledger line: it stays done, even through a rebuild from the blobs
    armed = tmp_path / "fault-armed"
    hub = arm_fault(
        make_hub, monkeypatch, armed, f"writer:{point}:kill", MAILHUB_STORAGE_RELEASE_FREED_AFTER="3600"
    ).start()
    for i in range(3):
        assert deliver(hub, make_message(SMALL, subject=f"d {i}")).startswith("250")
    armed.write_text("once")
    client = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=30)
    client.user("beta")
    client.pass_(PASSWORD)
    client.dele(1)
    try:
        reply = client.quit().decode()
    except poplib.error_proto as exc:  # after the commit the gateway may be told -ERR: it looks again
        reply = str(exc)
    assert not armed.exists()
    monkeypatch.delenv("MAILHUB_FAULT")
    left = 3 if point == "delete_before_commit" else 2
    if left == 3:
        assert "-ERR" in reply, f"a deletion that never happened was confirmed: {reply}"
    assert hub.query("SELECT count(*) FROM mailbox") == [(left,)]
    assert hub.stop() == 0
    for suffix in ("", "-wal", "-shm"):  # the index is lost: only the blobs and the ledger are left
        (hub.data_dir / f"index.sqlite3{suffix}").unlink(missing_ok=True)
    hub.cli("storage", "rebuild-index")
    assert hub.query("SELECT count(*) FROM mailbox") == [(left,)], "a deleted mail came back, or one was lost"
    print(
        f"\nwriter killed at {point}: 3 stored, mailbox after a rebuild {left} (deleted"
        f" {3 - left}, resurrected 0, lost 0)"
    )
