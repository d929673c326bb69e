# Mail blobs on object storage (storage.blobs = "s3://BUCKET/PREFIX", storage/object_blobs.py)
# against a real SeaweedFS S3 gateway (tests/seaweedutil.py), with in-process hubs: after the 250
# the object is in the store with the bytes of the local file; with the node's cache emptied, POP3
# and IMAP serve the same bytes (downloaded once, checked); a 30 MB mail goes up in 5 MB parts and
# comes back with the memory held at the peak (tracemalloc) growing far less than the mail; with
# the store unreachable (a proxy in front of it refusing connections) a mail gets 451 4.3.0 and
# leaves nothing behind, a mail not cached is a temporary error, and mail is taken once the store
# is back; a deletion removes the object; a restart cleans what a crash left in the store; the
# cache alone (one download for many readers, LRU eviction, pins, orphans by age); two nodes on one
# PostgreSQL index share the bucket.
import asyncio
import dataclasses
import gc
import hashlib
import imaplib
import itertools
import poplib
import smtplib
import socket
import threading
import time
import tracemalloc

import pytest

from storage import envelope, object_blobs
from storage.metrics import REGISTRY
from storage.object_blobs import EVICT_IDLE, ObjectBlobs
from storage.records import MessageMeta
from storage.s3 import S3Client, S3Location

from conftest import ALPHA_BETA, PASSWORD, RawSMTP, make_message, queue_id_from, wait_for

MB = 1024 * 1024


class StoreProxy:
    """A TCP proxy in front of the object store; `up = False` makes it close every new connection
    at once (the store unreachable, as when it is stopped)."""

    def __init__(self, endpoint: str):
        host, port = endpoint.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.up = True
        self.mute = 0  # the next this many connections: the store's answers dropped (lost replies)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            server = socket.create_connection(self.target)
            muted, self.mute = self.mute > 0, max(0, self.mute - 1)
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, muted), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, muted: bool = False) -> None:
        try:
            while data := source.recv(256 * 1024):
                if not muted:
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


_buckets: dict[int, str] = {}
_prefixes = itertools.count(1)


def place(seaweedfs) -> tuple[str, str]:
    """A bucket (one for the module: SeaweedFS gives each bucket volumes of its own, and a test
    session's store has room for few) and a prefix of this test's own in it."""
    if id(seaweedfs) not in _buckets:
        _buckets[id(seaweedfs)] = seaweedfs.new_bucket()
    return _buckets[id(seaweedfs)], f"mail{next(_prefixes)}"


def object_hub(make_hub, seaweedfs, endpoint: str | None = None, **extra: str):
    bucket, prefix = place(seaweedfs)
    hub = make_hub(
        sites=ALPHA_BETA,
        MAILHUB_STORAGE_BLOBS=f"s3://{bucket}/{prefix}",
        MAILHUB_S3_ENDPOINT=endpoint or seaweedfs.endpoint,
        MAILHUB_S3_ACCESS_KEY=seaweedfs.access_key,
        MAILHUB_S3_SECRET_KEY=seaweedfs.secret_key,
        MAILHUB_S3_PART_SIZE="5M",
        MAILHUB_S3_TIMEOUT="5",
        **extra,
    )
    return hub.start(), (bucket, prefix)


def objects(seaweedfs, bucket: str, prefix: str) -> dict[str, int]:
    async def listing() -> dict[str, int]:
        return {o.key: o.size async for o in S3Client(seaweedfs.settings()).list_objects(bucket, prefix + "/")}

    return asyncio.run(listing())


def object_bytes(seaweedfs, bucket: str, key: str) -> bytes:
    got: list[bytes] = []

    async def sink(data: bytes) -> None:
        got.append(data)

    asyncio.run(S3Client(seaweedfs.settings()).get(bucket, key, sink))
    return b"".join(got)


def send(hub, message: bytes) -> tuple[int, bytes]:
    client = smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=60)
    try:
        client.login("alpha", PASSWORD)
        client.mail("alpha@hub.test")
        assert client.rcpt("beta@hub.test")[0] == 250
        try:
            return client.data(message)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error
    finally:
        client.quit()


def pop3_all(hub, delete: bool = False) -> list[bytes]:
    client = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=60)
    try:
        client.user("beta")
        client.pass_(PASSWORD)
        count = len(client.list()[1])
        got = [b"\r\n".join(client.retr(n)[1]) + b"\r\n" for n in range(1, count + 1)]
        if delete:
            for n in range(1, count + 1):
                client.dele(n)
        return got
    finally:
        client.quit()


def imap_all(hub) -> list[bytes]:
    client = imaplib.IMAP4("127.0.0.1", hub.ports["imap"], timeout=60)
    try:
        client.login("beta", PASSWORD)
        client.select("INBOX", readonly=True)
        typ, data = client.fetch("1:*", "(BODY.PEEK[])")
        assert typ == "OK", data
        return [item[1] for item in data if isinstance(item, tuple)]
    finally:
        client.logout()


def cached_files(hub) -> list:
    return hub.blob_files()


def peak_held(operation) -> int:
    """Octets allocated while `operation()` ran and alive at once at its peak, in every thread of
    the process (the in-process hub's too): Python's own count (tracemalloc), not the RSS. The peak
    RSS also counts what glibc keeps of memory already freed, in the arena of the thread that freed
    it, where another thread's allocation does not reuse it: on a loaded machine the ingest's freed
    buffers and the upload's parts added up (peak RSS growth 2 to 19.6 MB for the same 30 MB mail
    with the hub's memory budget at 9 MB every time). tests/test_memory.py bounds a hub's RSS."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        gc.collect()
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        operation()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        if started:
            tracemalloc.stop()


def test_mail_is_in_the_store_before_its_250_and_served_again_with_the_cache_emptied(make_hub, seaweedfs):
    hub, (bucket, prefix) = object_hub(make_hub, seaweedfs)
    sent = [make_message(2000, "small"), make_message(3 * MB, "large")]
    qids = []
    for message in sent:
        code, reply = send(hub, message)
        assert code == 250, reply
        qids.append(queue_id_from(reply))
    stored = objects(seaweedfs, bucket, prefix)
    blobs = dict(hub.query("SELECT queue_id, blob FROM messages"))
    assert sorted(stored) == sorted(f"{prefix}/{blobs[q]}" for q in qids)  # one object per mail, no packs
    for qid in qids:
        local = (hub.data_dir / "blobs" / blobs[qid]).read_bytes()
        assert object_bytes(seaweedfs, bucket, f"{prefix}/{blobs[qid]}") == local
    before_pop3, before_imap = pop3_all(hub), imap_all(hub)
    assert [len(m) for m in before_pop3] == [len(m) for m in before_imap]

    for path in cached_files(hub):  # another node took the mail, or the cache evicted it
        path.unlink()
    downloads = REGISTRY.get_sample_value("mailhub_object_store_downloads_total")
    assert pop3_all(hub) == before_pop3
    assert len(cached_files(hub)) == 2  # downloaded into the cache, once each
    assert REGISTRY.get_sample_value("mailhub_object_store_downloads_total") == downloads + 2
    for path in cached_files(hub):
        path.unlink()
    assert imap_all(hub) == before_imap
    assert not list((hub.data_dir / "spool").iterdir())

    for path in cached_files(hub):  # a changed object is refused, not served
        path.unlink()
    small_key = f"{prefix}/{blobs[qids[0]]}"
    original = object_bytes(seaweedfs, bucket, small_key)
    changed = original.replace(b"small", b"smell", 1)

    async def put_changed() -> None:
        data = [changed]

        async def read(n: int) -> bytes:
            return data.pop() if data else b""

        await S3Client(seaweedfs.settings()).put(bucket, small_key, read)

    asyncio.run(put_changed())
    client = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=60)
    try:
        client.user("beta")
        client.pass_(PASSWORD)
        with pytest.raises(poplib.error_proto, match="damaged"):
            client.retr(1)
    finally:
        client.quit()
    # the relay's reads (storage.cached without a SHA-256) check the download against the index's
    # SHA-256 too: a changed object never enters the cache, where every later reader would get it
    storage, small = hub._hub.storage, hub.data_dir / "blobs" / blobs[qids[0]]
    sizes = dict(hub.query("SELECT queue_id, size FROM messages"))
    problem = asyncio.run_coroutine_threadsafe(storage.cached(small, sizes[qids[0]]), hub._loop).result(30)
    assert "SHA-256" in (problem or ""), problem
    assert not small.exists()
    large = hub.data_dir / "blobs" / blobs[qids[1]]
    assert asyncio.run_coroutine_threadsafe(storage.cached(large, sizes[qids[1]]), hub._loop).result(30) is None
    assert large.exists()
    assert hub.stop() == 0


def test_a_30_mb_mail_goes_up_in_parts_and_comes_back_in_bounded_memory(make_hub, seaweedfs):
    hub, (bucket, prefix) = object_hub(make_hub, seaweedfs)
    chunk = b"".join(b"%075d\r\n" % i for i in range(MB // 77)).ljust(MB - 2, b"x") + b"\r\n"
    header = b"From: alpha@hub.test\r\nTo: beta@hub.test\r\nSubject: big\r\n\r\n"
    replies: list[bytes] = []

    def deliver(size_mb: int) -> None:
        client = RawSMTP(hub.smtp_port, timeout=120)
        client.ehlo()
        assert client.auth_plain("alpha").startswith(b"235")
        assert client.command("MAIL FROM:<alpha@hub.test>").startswith(b"250")
        assert client.command("RCPT TO:<beta@hub.test>").startswith(b"250")
        assert client.command("DATA").startswith(b"354")
        client.send(header)
        for _ in range(size_mb):
            client.send(chunk)
        client.send(b".\r\n")
        replies.append(client.reply())
        client.command("QUIT")
        client.close()

    deliver(10)  # the first big mail warms up the threads' memory (arenas, buffers): not measured
    growth_in = peak_held(lambda: deliver(30))
    assert all(r.startswith(b"250") for r in replies), replies
    qid = queue_id_from(replies[1])
    ((blob, stored_size, stored_sha),) = hub.query("SELECT blob, size, sha256 FROM messages WHERE queue_id = ?", qid)
    assert objects(seaweedfs, bucket, prefix)[f"{prefix}/{blob}"] == (hub.data_dir / "blobs" / blob).stat().st_size
    assert stored_size > 30 * MB

    for path in cached_files(hub):
        path.unlink()
    got = hashlib.sha256()

    def fetch(n: int) -> None:
        client = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=120)
        client.user("beta")
        client.pass_(PASSWORD)
        client._putcmd(f"RETR {n}")
        assert client._getresp().startswith(b"+OK")
        while (line := client.file.readline()) != b".\r\n":
            if n == 2:
                got.update(line[1:] if line.startswith(b"..") else line)
        client.quit()

    fetch(1)  # warm-up again
    growth_out = peak_held(lambda: fetch(2))
    print(f"\n30 MB mail: peak memory held in {growth_in / MB:.1f} MB, out {growth_out / MB:.1f} MB")
    assert got.hexdigest() == stored_sha  # the same bytes, downloaded into the cache and served
    # parts of 5 MB, two at most in memory: measured 11.1 MB in (also on a loaded machine), 1.5 MB
    # out; a mail held whole: 30 MB or more (30.1 MB held by the spool, 31.1 MB with 64 MB parts)
    assert growth_in < 15 * MB and growth_out < 15 * MB
    assert hub.stop() == 0


def test_no_250_while_the_store_is_down_and_mail_taken_once_it_is_back(make_hub, seaweedfs):
    proxy = StoreProxy(seaweedfs.endpoint)
    try:
        hub, (bucket, prefix) = object_hub(make_hub, seaweedfs, endpoint=proxy.endpoint)
        proxy.up = False
        code, reply = send(hub, make_message(2000, "while down"))
        assert (code, reply[:5]) == (451, b"4.3.0"), reply
        failures = REGISTRY.get_sample_value("mailhub_object_store_upload_failures_total")
        code, reply = send(hub, make_message(3 * MB, "large while down"))
        assert (code, reply[:5]) == (451, b"4.3.0"), reply
        assert REGISTRY.get_sample_value("mailhub_object_store_upload_failures_total") == failures + 1
        assert hub.query("SELECT count(*) FROM messages") == [(0,)]
        assert cached_files(hub) == [] and not list((hub.data_dir / "spool").iterdir())
        assert objects(seaweedfs, bucket, prefix) == {}

        proxy.up = True
        code, reply = send(hub, make_message(2000, "back"))
        assert code == 250, reply
        assert len(objects(seaweedfs, bucket, prefix)) == 1
        for path in cached_files(hub):
            path.unlink()
        proxy.up = False  # a mail not cached cannot be read now: a temporary error, nothing marked damaged
        client = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=60)
        try:
            client.user("beta")
            client.pass_(PASSWORD)
            with pytest.raises(poplib.error_proto, match=r"SYS/TEMP"):
                client.retr(1)
        finally:
            client.close()
        assert hub.query("SELECT count(*) FROM damaged") == [(0,)]
        assert hub.stop() == 0
        with pytest.raises(AssertionError, match="start-up check of s3://"):  # one line names the store
            hub.start()
        proxy.up = True
        hub.start()
        assert len(pop3_all(hub, delete=True)) == 1  # deleting it removes its object and its cached file
        wait_for(lambda: objects(seaweedfs, bucket, prefix) == {}, 20, message="the object of the deleted mail")
        wait_for(lambda: cached_files(hub) == [], 20, message="the cached file of the deleted mail")
        assert hub.stop() == 0
    finally:
        proxy.close()


def test_a_restart_keeps_serving_from_the_store_and_cleans_what_a_crash_left(make_hub, seaweedfs, monkeypatch):
    hub, (bucket, prefix) = object_hub(make_hub, seaweedfs)
    code, reply = send(hub, make_message(2000, "kept"))
    assert code == 250, reply
    served = pop3_all(hub)
    assert hub.stop() == 0
    for path in cached_files(hub):
        path.unlink()  # a new node, or a lost cache: not a missing blob

    # an object a crash left between its upload and its commit (an hour old), and an unfinished upload
    client = S3Client(seaweedfs.settings())
    made = int(time.time() * 1e6)
    orphan = f"{prefix}/{time.strftime('%Y%m%d%H', time.gmtime())}/{made:013X}000001"
    monkeypatch.setattr(object_blobs, "ORPHAN_AGE", 0.0)  # old enough at once (the age itself: below)

    async def leave() -> None:
        data = [b"x" * 100]

        async def read(n: int) -> bytes:
            return data.pop() if data else b""

        await client.put(bucket, orphan, read)
        await client._create_upload(bucket, f"{prefix}/2000010100/0000000000000000002")

    asyncio.run(leave())
    hub.start()
    assert pop3_all(hub) == served
    assert orphan in objects(seaweedfs, bucket, prefix)  # not this node's: reported, not deleted
    assert asyncio.run(client.pending_uploads(bucket, prefix + "/")) == []
    log = hub.log_text()
    assert "1 unfinished upload(s) aborted, 0 object(s) of uncommitted mail deleted, 1 no index row names left" in log
    assert f"object store: object {orphan.partition('/')[2]} has no index row; left" in log
    assert "1 newest mail(s) checked, 0 missing" in log
    for path in cached_files(hub):
        path.unlink()  # an operator's export of a mail not in the cache reads the object
    ((qid,),) = hub.query("SELECT queue_id FROM messages")
    exported = hub.data_dir.parent / "exported.eml"
    hub.cli("mailbox", "export", "beta", qid, "-o", str(exported))
    assert exported.read_bytes() + b"" == served[0]
    assert "kept" in hub.cli("mailbox", "show", "beta", qid).stdout
    assert not list((hub.data_dir / "spool").iterdir())
    # the commands that would take the node's cache for the whole store refuse, saying why
    for command in ("rebuild-index", "compact-ledger"):
        result = hub.cli("storage", command, check=False)
        assert result.returncode == 2 and "not built for storage.blobs = 's3://" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert hub.stop() == 0


def test_the_cache_downloads_a_missing_mail_once_and_evicts_the_least_recently_used(seaweedfs, tmp_path):
    """storage/object_blobs.py alone: concurrent readers of one missing mail share one download;
    past cache_bytes the least recently used files go, never one used within EVICT_IDLE seconds."""
    bucket, prefix = place(seaweedfs)
    (tmp_path / "blobs").mkdir()
    (tmp_path / "spool").mkdir()
    now = [1000.0]
    cache = ObjectBlobs(
        S3Client(seaweedfs.settings()),
        S3Location(bucket, prefix),
        tmp_path / "blobs",
        tmp_path / "spool",
        cache_bytes=3000,
        clock=lambda: now[0],
    )

    hour = time.strftime("%Y%m%d%H", time.gmtime())

    def blob_file(name: str, size: int) -> tuple[str, str]:
        """A blob file as the hub writes one (message, envelope record, trailer); (blob, sha256)."""
        message = bytes([65 + len(name) % 26]) * size
        sha = hashlib.sha256(message).hexdigest()
        record = envelope.record(name, size, 0.0, sha, MessageMeta("a@hub.test", None, False), [], [], "null")
        path = tmp_path / "blobs" / hour / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(message + envelope.trailer(record, size))
        return f"{hour}/{name}", sha

    async def scenario() -> None:
        names = [f"{n:019X}" for n in range(1, 5)]
        blobs = [blob_file(name, 1000) for name in names]
        for blob, _sha in blobs:
            await cache.upload(str(tmp_path / "blobs" / blob), blob)
        cache.committed(blobs[0][0], 1100)
        now[0] += EVICT_IDLE + 1
        for blob, _sha in blobs[1:3]:
            cache.committed(blob, 1100)  # 4400 bytes > 3000, but all but the first used just now
        assert not (tmp_path / "blobs" / blobs[0][0]).exists() and cache.evicted == 1
        assert all((tmp_path / "blobs" / b).exists() for b, _ in blobs[1:])

        (tmp_path / "blobs" / blobs[0][0]).unlink(missing_ok=True)
        answers = await asyncio.gather(*(cache.ready(blobs[0][0], 1000, blobs[0][1]) for _ in range(5)))
        assert answers == [None] * 5 and cache.downloads == 1  # five readers, one download
        assert (tmp_path / "blobs" / blobs[0][0]).read_bytes()[:1000] == bytes([65 + len(names[0]) % 26]) * 1000
        assert list((tmp_path / "spool").iterdir()) == []
        now[0] += EVICT_IDLE + 1
        cache.pin(blobs[1][0])  # being sent (Storage.serving), however long ago it was last looked at
        assert await cache.ready(blobs[3][0], 1000, blobs[3][1]) is None  # there: used, nothing downloaded
        cache.committed(blobs[3][0], 1100)  # the rest is idle now: the least recently used go first
        assert cache.cached_bytes <= 3000
        assert (tmp_path / "blobs" / blobs[3][0]).exists() and (tmp_path / "blobs" / blobs[1][0]).exists()
        assert not (tmp_path / "blobs" / blobs[2][0]).exists() and not (tmp_path / "blobs" / blobs[0][0]).exists()
        cache.unpin(blobs[1][0])  # sent: evicted once idle like any other
        now[0] += EVICT_IDLE + 1
        cache.cache_bytes = 1100
        cache.committed(blobs[3][0], 1100)
        assert not (tmp_path / "blobs" / blobs[1][0]).exists() and (tmp_path / "blobs" / blobs[3][0]).exists()

        (tmp_path / "blobs" / blobs[1][0]).unlink(missing_ok=True)
        assert "SHA-256" in (await cache.ready(blobs[1][0], 1000, "0" * 64) or "")  # not what was recorded
        assert not (tmp_path / "blobs" / blobs[1][0]).exists()
        assert "SHA-256" in (await cache.ready(blobs[1][0], 1000, "") or "")  # nothing to check it by: refused
        assert not (tmp_path / "blobs" / blobs[1][0]).exists()
        await cache.delete([blobs[2][0]])

        async def none_indexed(low: str, high: str) -> set[str]:
            return set()

        async def stored() -> list[str]:
            return sorted([o.key async for o in cache.client.list_objects(bucket, prefix + "/")])

        # objects no index row names: only reported by default, however old (one may be acknowledged
        # mail - another node's commit held up, another index on the same prefix, an older backup)
        report = await cache.start([], none_indexed)
        assert sorted(report.orphans_kept) == sorted(b for b, _ in blobs if b != blobs[2][0])
        assert report.orphans_deleted == []
        late = time.time() + object_blobs.ORPHAN_AGE + 60
        report = await cache.start([], none_indexed, now=late)
        assert report.orphans_deleted == [] and len(report.orphans_kept) == 3
        assert len(await stored()) == 3
        # storage.delete_orphan_objects: deleted once old enough by the store's clock, but not one
        # whose index row was committed while the listing ran (the index is asked again after it)
        cache.delete_orphans = True
        report = await cache.start([], none_indexed)
        assert report.orphans_deleted == [] and len(report.orphans_kept) == 3  # young: a commit may be in flight
        asked: list[tuple[str, str]] = []

        async def committed_meanwhile(low: str, high: str) -> set[str]:
            asked.append((low, high))
            # the row appears after the first look at its hour folder
            return {blobs[0][0]} if asked.count((hour + "/", hour + "0")) > 1 else set()

        report = await cache.start([], committed_meanwhile, now=late)
        assert report.orphans_kept == []  # committed mail now: no orphan at all
        assert sorted(report.orphans_deleted) == sorted([blobs[1][0], blobs[3][0]])
        assert await stored() == [f"{prefix}/{blobs[0][0]}"]
        # this node's own uncommitted upload (its file quarantined by recovery): deleted at once
        cache.delete_orphans = False
        report = await cache.start([], none_indexed, uncommitted=[blobs[0][0]])
        assert report.orphans_deleted == [blobs[0][0]] and report.orphans_kept == []
        assert await stored() == []
        assert (
            await cache.ready(blobs[2][0], 1000, blobs[2][1])
            == f"object {bucket}/{prefix}/{blobs[2][0]} missing from the object store"
        )

    asyncio.run(scenario())


def test_an_upload_whose_answer_is_lost_leaves_no_object(seaweedfs, tmp_path):
    """The store takes a mail's object but its answer never comes (a timeout after the body): the
    upload fails (451 for the sender) and the object is deleted - the start-up sweep only reports
    objects no index row names, so nothing else would remove it."""
    bucket, prefix = place(seaweedfs)
    for folder in ("blobs", "spool"):
        (tmp_path / folder).mkdir()
    proxy = StoreProxy(seaweedfs.endpoint)
    settings = dataclasses.replace(seaweedfs.settings(timeout=1.0), endpoint=proxy.endpoint, attempts=1)
    cache = ObjectBlobs(S3Client(settings), S3Location(bucket, prefix), tmp_path / "blobs", tmp_path / "spool")
    blob = time.strftime("%Y%m%d%H", time.gmtime()) + "/" + "0" * 18 + "9"
    path = tmp_path / "blobs" / blob
    path.parent.mkdir()
    path.write_bytes(b"x" * 5000)

    async def scenario() -> list[str]:
        proxy.mute = 1
        with pytest.raises(object_blobs.ObjectStoreError, match="did not take mail"):
            await cache.upload(str(path), blob)
        await asyncio.gather(*cache._discarding)  # deleted in the background (the 451 does not wait)
        return [o.key async for o in cache.client.list_objects(bucket, prefix + "/")]

    try:
        assert asyncio.run(scenario()) == []
    finally:
        proxy.close()


def test_a_download_leaves_min_free_bytes_on_the_node_disk(seaweedfs, tmp_path):
    """A mail downloaded into the cache must not take the room new mail and the index need: short
    of storage.min_free_bytes after it, idle cached files go first (even recently used ones, never
    one being sent); still short, the reader gets a temporary error and nothing is written."""
    bucket, prefix = place(seaweedfs)
    for folder in ("blobs", "spool"):
        (tmp_path / folder).mkdir()
    cache = ObjectBlobs(
        S3Client(seaweedfs.settings()), S3Location(bucket, prefix), tmp_path / "blobs", tmp_path / "spool"
    )
    cache.min_free_bytes = 1_000_000
    free = [500_000]
    cache.free_bytes = lambda: free[0]
    hour = time.strftime("%Y%m%d%H", time.gmtime())
    (tmp_path / "blobs" / hour).mkdir()
    made = {}
    for name in ("0" * 18 + "1", "0" * 18 + "2"):
        message = name.encode() * 100
        record = envelope.record(name, len(message), 0.0, "", MessageMeta("a@hub.test", None, False), [], [], "null")
        (tmp_path / "blobs" / hour / name).write_bytes(message + envelope.trailer(record, len(message)))
        made[f"{hour}/{name}"] = (len(message), hashlib.sha256(message).hexdigest())
    (kept, _), (wanted, (size, sha)) = made.items()

    async def scenario() -> None:
        for blob in made:
            await cache.upload(str(tmp_path / "blobs" / blob), blob)
            cache.committed(blob, (tmp_path / "blobs" / blob).stat().st_size)
        cache.scrubbed(wanted, "dropped")  # not in the cache now
        cache.pin(kept)  # being sent: never evicted for room
        with pytest.raises(object_blobs.ObjectStoreError, match="no room on the node's disk"):
            await cache.ready(wanted, size, sha)
        assert (tmp_path / "blobs" / kept).exists() and not (tmp_path / "blobs" / wanted).exists()
        assert list((tmp_path / "spool").iterdir()) == []
        cache.unpin(kept)
        with pytest.raises(object_blobs.ObjectStoreError, match="no room"):  # used just now, evicted all the same
            await cache.ready(wanted, size, sha)
        assert not (tmp_path / "blobs" / kept).exists() and cache.cached_bytes == 0
        free[0] = 2_000_000
        assert await cache.ready(wanted, size, sha) is None and (tmp_path / "blobs" / wanted).exists()

    asyncio.run(scenario())


def test_an_upload_has_an_overall_deadline(seaweedfs, tmp_path, monkeypatch):
    """A store that takes the connection and the body and never answers: each try ends at
    s3.timeout, but all the tries together end at UPLOAD_DEADLINE (8 minutes: before an SMTP
    client stops waiting for its reply), the upload refused (451) - here 0.5 s against 3 x 5 s."""
    bucket, prefix = place(seaweedfs)
    silent = socket.create_server(("127.0.0.1", 0))
    taken: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                taken.append(silent.accept()[0])  # kept open, never read, never answered
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
    settings = dataclasses.replace(seaweedfs.settings(timeout=5.0), endpoint=endpoint)
    (tmp_path / "blobs").mkdir()
    cache = ObjectBlobs(S3Client(settings), S3Location(bucket, prefix), tmp_path / "blobs", tmp_path / "spool")
    path = tmp_path / "blobs" / "mail"
    path.write_bytes(b"x" * 50_000)
    monkeypatch.setattr(object_blobs, "UPLOAD_DEADLINE", 0.5)

    async def upload() -> float:
        started = time.monotonic()
        with pytest.raises(object_blobs.ObjectStoreError, match="not confirmed within 0.5 s"):
            await cache.upload(str(path), "2026010100/" + "0" * 19)
        return time.monotonic() - started

    try:
        assert asyncio.run(upload()) < 5.0  # the first try alone would take 5 s, all three 16.5 s
        # (the object's deletion goes on in the background: the 451 does not wait for it)
    finally:
        silent.close()
        for conn in taken:
            conn.close()


def test_start_up_aborts_only_its_own_unfinished_uploads(seaweedfs, tmp_path):
    """Several nodes on one prefix: a node's start aborts the multipart uploads it began (a crash
    cut them short), not another node's upload of a big mail in flight (its sender got 451), nor
    an upload of another program under the prefix (a backup, with prefix "" the whole bucket)."""
    bucket, prefix = place(seaweedfs)
    client = S3Client(seaweedfs.settings())
    cache = ObjectBlobs(client, S3Location(bucket, prefix), tmp_path, tmp_path)
    cache.node_number = 1
    made = int(time.time() * 1e6)
    own, other = (f"{prefix}/2026010100/{made:013X}{n:02X}0001" for n in (1, 2))
    foreign = f"{prefix}/backups/index.sqlite3"

    async def scenario() -> list[str]:
        for key in (own, other, foreign):
            await client._create_upload(bucket, key)
        report = await cache.start([], lambda low, high: asyncio.sleep(0, set()))
        assert report.aborted_uploads == 1
        left = await client.pending_uploads(bucket, prefix + "/")
        for key, upload_id in left:
            await client.abort_upload(bucket, key, upload_id)
        return sorted(key for key, _ in left)

    assert asyncio.run(scenario()) == sorted([other, foreign])


def test_odd_prefixes_are_refused_or_kept_as_they_are(seaweedfs):
    """storage.blobs = "s3://BUCKET/PREFIX": '..', control characters (a listing's XML cannot carry
    them: the start-up sweep would fail) and prefixes too long for S3's keys are refused at start;
    other characters are kept as they are (the client encodes them)."""
    for url in ("s3://mail/a/../b", "s3://mail/a\nb", "s3://mail/a\x7fb", "s3://mail/" + "p" * 901, "s3://mail/a//b"):
        with pytest.raises(ValueError):
            S3Location.parse(url)
    odd = S3Location.parse("s3://mail/a b/ü?x=%2e#/")
    assert odd.prefix == "a b/ü?x=%2e#" and odd.key("2026010100/Q") == "a b/ü?x=%2e#/2026010100/Q"
    bucket, prefix = place(seaweedfs)
    odd = S3Location(bucket, f"{prefix}/a b+ü?x=%2e#&")
    client = S3Client(seaweedfs.settings())

    async def round_trip() -> list[str]:
        data = [b"mail"]

        async def read(n: int) -> bytes:
            return data.pop() if data else b""

        await client.put(bucket, odd.key("2026010100/Q"), read)
        return [o.key async for o in client.list_objects(bucket, odd.key(""))]

    assert asyncio.run(round_trip()) == [odd.key("2026010100/Q")]  # signed, stored, listed by that key
    assert object_bytes(seaweedfs, bucket, odd.key("2026010100/Q")) == b"mail"


def test_a_cached_copy_of_freed_mail_is_removed_at_start_not_quarantined(make_hub, seaweedfs):
    """A node's cached copy of a mail freed since (another node emptied the trash: object and row
    gone) is removed at the next start - it was moved to the quarantine as an uncommitted blob,
    keeping a deleted mail on the node; a file whose object is there (a crash between upload and
    commit) still goes to the quarantine (test below)."""
    hub, (bucket, prefix) = object_hub(make_hub, seaweedfs, MAILHUB_STORAGE_RELEASE_FREED_AFTER="0")
    code, reply = send(hub, make_message(2000, "freed"))
    assert code == 250, reply
    ((blob,),) = hub.query("SELECT blob FROM messages")
    kept = (hub.data_dir / "blobs" / blob).read_bytes()  # as another node's cache would hold it
    pop3_all(hub, delete=True)
    wait_for(lambda: objects(seaweedfs, bucket, prefix) == {}, 30, message="the freed mail's object deleted")
    assert hub.stop() == 0
    (hub.data_dir / "blobs" / blob).write_bytes(kept)
    hub.start()
    assert not (hub.data_dir / "blobs" / blob).exists()
    assert "uncommitted_blob" not in hub.cli("storage", "quarantine").stdout
    assert "no index row names it and its object is gone" in hub.log_text()
    assert hub.stop() == 0


def test_two_nodes_on_one_postgresql_index_share_the_bucket(pg_index, make_hub, seaweedfs):
    """Node A takes a mail (its object up before the 250), node B, with an empty cache, serves it
    from the object store and deletes it (object gone); queue IDs carry each node's number."""
    url, reset = pg_index
    reset()
    bucket, prefix = place(seaweedfs)
    common = {
        "MAILHUB_STORAGE_INDEX": url,
        "MAILHUB_STORAGE_BLOBS": f"s3://{bucket}/{prefix}",
        "MAILHUB_S3_ENDPOINT": seaweedfs.endpoint,
        "MAILHUB_S3_ACCESS_KEY": seaweedfs.access_key,
        "MAILHUB_S3_SECRET_KEY": seaweedfs.secret_key,
        "MAILHUB_S3_PART_SIZE": "5M",
    }
    a = make_hub(sites=ALPHA_BETA, MAILHUB_NODE_NAME="node-a", **common).start()
    b = make_hub(MAILHUB_NODE_NAME="node-b", **common).start()
    mail = make_message(3000, "across nodes")
    code, reply = send(a, mail)
    assert code == 250, reply
    qid = queue_id_from(reply)
    ((key, size),) = objects(seaweedfs, bucket, prefix).items()
    assert key.endswith("/" + qid) and size > len(mail)
    assert a._hub.storage.layout.number != b._hub.storage.layout.number  # each node its own queue IDs
    assert cached_files(b) == []
    got = pop3_all(b, delete=True)
    assert got[0].endswith(mail)
    wait_for(lambda: objects(seaweedfs, bucket, prefix) == {}, 20, message="the object of the mail node B deleted")
    assert cached_files(b) == []
    assert a.stop() == 0 and b.stop() == 0


def test_a_crash_between_the_upload_and_the_commit_leaves_no_mail_behind(make_hub, seaweedfs, monkeypatch):
    """The hub killed (SIGKILL) after a mail's object is in the store and before its index commit:
    the sender got no 250; the restart moves the local file to the quarantine and deletes the
    object at once (the node's own uncommitted upload: no age needed, its bytes are in the
    quarantine); the mail sent again is stored once."""
    hub, (bucket, prefix) = object_hub(make_hub, seaweedfs, MAILHUB_FAULT="hub:object_uploaded:kill")
    assert hub.process
    mail = make_message(2000, "cut short")
    with pytest.raises(smtplib.SMTPServerDisconnected):
        send(hub, mail)
    assert len(objects(seaweedfs, bucket, prefix)) == 1  # uploaded, never committed
    hub.stop()
    hub.in_process_from_now_on().start()
    assert objects(seaweedfs, bucket, prefix) == {}
    assert hub.query("SELECT count(*) FROM messages") == [(0,)]
    assert "uncommitted_blob" in hub.cli("storage", "quarantine").stdout
    code, reply = send(hub, mail)
    assert code == 250, reply
    assert len(objects(seaweedfs, bucket, prefix)) == 1
    assert [m.endswith(mail) for m in pop3_all(hub)] == [True]
    assert hub.stop() == 0
