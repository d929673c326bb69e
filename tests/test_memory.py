# Bounded memory: while the hub receives one very large mail, its peak RSS (with its index writer
# process) grows by less than RSS_GROWTH_LIMIT over what it had at start, and stays under 150 MB in
# all (issue 24's bound). The growth is what the mail's size could drive; what the hub holds at start
# is its code and libraries (87 MiB at 9b16d02 and 91 MiB now with this machine's library versions,
# where a fixed 100 MB for both had become a test of numpy's and cryptography's sizes).
# The mail is streamed from one repeated 1 MB chunk of base64 lines over a raw socket (neither the
# test nor the hub may hold the whole message), then the stored blob is checked byte for byte.
import base64
import hashlib
import os
import shutil
import time

from bench.ingest_benchmark import hub_peak_rss
from storage import envelope

from conftest import ALPHA_BETA, RawSMTP, queue_id_from

MB = 1024 * 1024
MAIL_MB = int(os.environ.get("MAILHUB_TEST_BIG_MAIL_MB", "1024"))  # 1 GB, as in issue 2
RSS_LIMIT = 150 * MB
RSS_GROWTH_LIMIT = 40 * MB  # measured: 16 MiB for a 1 GiB mail


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def _base64_chunk() -> bytes:
    """1 MiB of 76-character base64 lines (whole lines, so the chunk can be repeated)."""
    lines_per_chunk = MB // 78
    text = base64.b64encode(b"\0" * 3 + os.urandom(57 * lines_per_chunk - 3))  # never an archive's magic
    chunk = b"".join(text[i : i + 76] + b"\r\n" for i in range(0, len(text), 76))
    return chunk + b"A" * (MB - len(chunk) - 2) + b"\r\n"


def test_peak_rss_stays_bounded_while_receiving_a_huge_mail(make_hub):
    hub = make_hub(sites=ALPHA_BETA, process=True)
    hub.start()
    assert shutil.disk_usage(hub.data_dir).free > 3 * MAIL_MB * MB, "not enough disk for the big mail"
    pid = hub.proc.pid
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert b"mailhub.cli\0serve" in f.read()  # the hub itself, not a wrapper
    rss_before = hub_peak_rss(pid)  # VmHWM plus the index writer's and its launcher's Pss

    header = (
        b"From: alpha@hub.test\r\nTo: beta@hub.test\r\nSubject: whole study\r\n"
        b"Message-ID: <big-study@hub.test>\r\nX-TELEMEDICINE-SETID: 1.2.840.99\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    )  # passes the policy as text
    chunk = _base64_chunk()
    assert len(chunk) == MB and chunk.endswith(b"\r\n") and b"\r\n." not in chunk
    size = len(header) + MAIL_MB * len(chunk)
    digest = hashlib.sha256(header)

    client = RawSMTP(hub.smtp_port, timeout=120)
    client.ehlo()
    assert client.auth_plain("alpha").startswith(b"235")
    assert client.command(f"MAIL FROM:<alpha@hub.test> SIZE={size}").startswith(b"250")
    assert client.command("RCPT TO:<beta@hub.test>").startswith(b"250")
    assert client.command("DATA").startswith(b"354")
    started = time.monotonic()
    client.send(header)
    for _ in range(MAIL_MB):
        client.send(chunk)
        digest.update(chunk)
    client.send(b".\r\n")
    reply = client.reply()
    elapsed = time.monotonic() - started
    qid = queue_id_from(reply)
    peak = hub_peak_rss(pid)
    assert client.command("QUIT").startswith(b"221")
    client.close()
    print(
        f"\n{MAIL_MB} MiB mail in {elapsed:.1f} s ({MAIL_MB / elapsed:.0f} MiB/s); hub peak RSS "
        f"{peak / MB:.1f} MiB (at start {rss_before / MB:.1f} MiB)"
    )
    assert peak - rss_before < RSS_GROWTH_LIMIT, f"hub RSS grew {(peak - rss_before) / MB:.1f} MiB"
    assert peak < RSS_LIMIT, f"hub peak RSS {peak / MB:.1f} MiB"

    (blob, stored_size, stored_sha, set_id, message_id) = hub.query(
        "SELECT blob, size, sha256, set_id, message_id FROM messages WHERE queue_id = ?", qid
    )[0]
    path = hub.data_dir / "blobs" / blob
    with open(path, "rb") as f:  # the mail, then its envelope record (storage/envelope.py)
        record = envelope.read_trailer(f.fileno(), path.stat().st_size)
    assert record.size == stored_size and record.record["q"] == qid and record.record["sha256"] == stored_sha
    assert (set_id, message_id) == ("1.2.840.99", "<big-study@hub.test>")
    # The blob is the Received: header followed by exactly the sent bytes.
    whole = hashlib.sha256()
    tail = hashlib.sha256()
    with open(path, "rb") as f:
        prefix = f.read(stored_size - size)
        whole.update(prefix)
        assert prefix.startswith(b"Received: ") and prefix.endswith(b"\r\n") and b"\r\n\r\n" not in prefix
        left = stored_size - len(prefix)
        while left and (block := f.read(min(left, 8 * MB))):
            whole.update(block)
            tail.update(block)
            left -= len(block)
    assert tail.hexdigest() == digest.hexdigest()
    assert whole.hexdigest() == stored_sha
    assert stored_size == len(prefix) + size
    assert not list((hub.data_dir / "spool").iterdir())
    assert hub.stop() == 0
    path.unlink()  # pytest keeps the last runs' temp folders; do not leave 1 GB behind
