# Small mails committed together share one blob file (a pack; storage/spool.py write_batch): every
# mail still reads back byte-exact over POP3 and IMAP and is relayed byte-exact, a pack is freed with
# its last message and not before, and start-up recovery accepts packs. Real hub process, real
# loopback clients and next hop.
import hashlib
import imaplib
import poplib
import threading

from conftest import PASSWORD, make_message
from pop3util import send
from test_relay_outbound import CountingHop, relay_hub, wait_until

SENDERS = 8
MAILS_EACH = 15


def send_concurrently(hub, rcpt: str = "beta@hub.test") -> dict[str, bytes]:
    """SENDERS sessions at once, MAILS_EACH small mails each: queue ID -> the mail as sent."""
    sent: dict[str, bytes] = {}
    errors: list[BaseException] = []

    def sender(n: int) -> None:
        try:
            for i in range(MAILS_EACH):
                mail = make_message(3000 + 97 * n + i, subject=f"pack {n}.{i}")
                sent[send(hub, [rcpt], mail)] = mail
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(SENDERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(sent) == SENDERS * MAILS_EACH
    return sent


def packs_of(hub) -> dict[str, list[str]]:
    """Blob file -> queue IDs in it, for blob files holding more than one message."""
    rows = hub.query("SELECT blob, queue_id FROM messages ORDER BY blob, blob_offset")
    members: dict[str, list[str]] = {}
    for blob, qid in rows:
        members.setdefault(blob, []).append(qid)
    return {blob: qids for blob, qids in members.items() if len(qids) > 1}


def test_packed_mails_read_back_exactly_and_are_freed_with_their_last_message(hub):
    sent = send_concurrently(hub)
    packs = packs_of(hub)
    assert packs, "concurrent small mails were never committed together"
    for qid, mail in sent.items():
        data = hub.stored(qid)
        assert data.endswith(mail), qid
        (sha,), = hub.query("SELECT sha256 FROM messages WHERE queue_id = ?", qid)
        assert hashlib.sha256(data).hexdigest() == sha, qid

    # POP3: every message byte-exact (the trace header first, then the mail as sent)
    pop = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=60)
    pop.user("beta")
    pop.pass_(PASSWORD)
    numbers = {uid.decode(): int(n) for n, uid in (line.split() for line in pop.uidl()[1])}
    assert len(numbers) == len(sent)
    for qid, mail in sent.items():
        (uid,), = hub.query("SELECT uid FROM mailbox WHERE queue_id = ?", qid)
        lines = pop.retr(numbers[str(uid)])[1]
        assert b"\r\n".join(lines) + b"\r\n" == hub.stored(qid), qid
    pop.quit()

    # IMAP: the body of a packed message that is not first in its pack
    blob, members = next(iter(packs.items()))
    later = members[-1]
    imap = imaplib.IMAP4("127.0.0.1", hub.ports["imap"], timeout=60)
    imap.login("beta", PASSWORD)
    imap.select("INBOX")
    uid = hub.query("SELECT uid FROM mailbox WHERE queue_id = ?", later)[0][0]
    typ, data = imap.uid("FETCH", str(uid), "(BODY.PEEK[])")
    assert typ == "OK"
    assert data[0][1] == hub.stored(later) and data[0][1].endswith(sent[later])
    imap.logout()

    # deleting all but one message of a pack keeps its file; deleting the last one frees it
    path = hub.data_dir / "blobs" / blob
    delete_over_pop3(hub, members[:-1])
    assert path.exists()
    assert hub.stored(members[-1]).endswith(sent[members[-1]])
    delete_over_pop3(hub, members[-1:])
    assert not path.exists()

    # a restart's recovery finds every remaining pack whole: nothing to report
    hub.stop()
    mark = len(hub.log_text())
    hub.start()
    assert "recovery:" not in hub.log_text()[mark:]
    for qid in set(sent) - set(members):
        assert hub.stored(qid).endswith(sent[qid])


def delete_over_pop3(hub, queue_ids: list[str]) -> None:
    """Delete the mailbox entries of these messages in one POP3 session (UIDL is the mailbox UID)."""
    pop = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=60)
    pop.user("beta")
    pop.pass_(PASSWORD)
    numbers = {uid.decode(): n for n, uid in (line.split() for line in pop.uidl()[1])}
    for qid in queue_ids:
        (uid,), = hub.query("SELECT uid FROM mailbox WHERE queue_id = ?", qid)
        pop.dele(int(numbers[str(uid)]))
    pop.quit()


def test_packed_mails_are_relayed_intact(make_hub):
    hop = CountingHop(mode="450")   # deferred at first: the packs are still there to look at
    hub = relay_hub(make_hub, f"remote.test=127.0.0.1:{hop.port}", MAILHUB_RELAY_MIN_BACKOFF="3600",
                    MAILHUB_RELAY_MAX_BACKOFF="3600")
    try:
        sent = send_concurrently(hub, "someone@remote.test")
        assert packs_of(hub), "concurrent small mails were never committed together"
        hop.mode = "ok"
        wait_until(lambda: hub.query("SELECT count(*) FROM outbound WHERE attempts = 0") == [(0,)],
                   what="every first attempt", hub=hub)
        hub.cli("queue", "retry", "--all")
        wait_until(lambda: len(hop.messages) == len(sent), what="every mail at the next hop", hub=hub)
    finally:
        hop.shutdown()
        hop.server_close()
    assert hub.query("SELECT count(*) FROM outbound") == [(0,)]
    assert hub.query("SELECT count(*) FROM messages") == [(0,)]   # relayed, so freed
    assert not hub.blob_files()                                    # packs included
    delivered = {qid: m for qid, mail in sent.items() for m in hop.messages if f"id {qid}".encode() in m}
    assert len(delivered) == len(sent)
    for qid, mail in sent.items():
        assert delivered[qid].endswith(mail), qid
