# Directory mails: the signed participant list as a reply to a site that mailed directory@<domain>,
# as an update to every site when the list changed (sites added or removed, addresses or keys
# changed; changes within directory.update_delay go out as one update carrying only what changed
# since the version sent before, docs/gateway-guide.md), and as the announcement of a rotation of
# the hub's key (signed by both keys). Each carries the hub's public key(s) as an
# application/pgp-keys part inside the signed part. Each mail
# is stored through the normal spool -> sync -> commit path; an update or announcement is committed
# together with the mark "this directory version / this hub key was sent", so a restart neither
# sends it twice nor loses it; the commit claims the mark (only one that changes it stores its mail),
# so two leaders for a moment send it once. A site is answered at most once per directory.min_request_interval
# (each answer is a signed mail in its mailbox: a gateway asking in a loop must not fill it, nor
# keep the hub signing).
# Its work off the event loop (index reads and marks, signing, writing the record of what was sent)
# runs in its own threads, and the update loop's end waits for whatever of it is under way (at most
# _STOP_WAIT): a hub that stopped writes nothing more into its data folder.
import asyncio
import concurrent.futures
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from email.utils import formatdate
from pathlib import Path

from storage import AlreadyMarked, Delivery, MessageMeta, Site, Storage, StorageError, directory_index
from storage.directory_index import directory_version
from storage.sites import list_sites

from . import metrics
from .document import UPDATE_FORMAT, participants, read_document, to_json, to_text, update_document
from .hub_key import HubKeys, HubKeySource
from .signing import mixed_part, signed_body

log = logging.getLogger("mailhub.directory")
_POLL_SECONDS = 1.0
_STOP_WAIT = 10.0  # seconds the end of the update loop waits for the mailer's work under way
_FIRST_LOOK_WAIT = 5.0  # seconds the hub's start waits for the mailer's first look at the index
SENT_VERSION = "directory_sent_version"
ANNOUNCED_KEY = "hub_key_announced"  # key_stamp() of the last hub key the sites were told of
KEY_PART_NAME = "hub-key.asc"
SENT_FILE = "directory-sent.json"  # the participants as the last update sent them (what the next one compares with)


def _new_threads() -> tuple[ThreadPoolExecutor, ThreadPoolExecutor]:
    """The mailer's index thread (its one connection) and its threads for signing and the record."""
    return (
        ThreadPoolExecutor(1, thread_name_prefix="directory-index"),
        ThreadPoolExecutor(2, thread_name_prefix="directory"),
    )


def key_stamp(fingerprint: str) -> int:
    """A hub key as an index integer (the meta table holds integers): its last 60 bits."""
    return int(fingerprint[-15:], 16)


def directory_mail(
    document: dict,
    keys: HubKeys,
    sender: str,
    to: str,
    subject: str,
    in_reply_to: str | None = None,
    now: float | None = None,
    announcement: bool = False,
) -> bytes:
    """A whole RFC 5322 message (CRLF) holding the signed directory and the hub's public key(s);
    signed by the current key, and by the previous one during the grace period of a rotation (an
    announcement of the rotation by both, always)."""
    now = time.time() if now is None else now
    armored, _ = keys.published(now, announcement)
    inner = mixed_part(
        to_text(document),
        [
            ("application/json", "directory.json", to_json(document).encode("ascii")),
            ("application/pgp-keys", KEY_PART_NAME, armored.encode("ascii")),
        ],
    )
    content_type, body = signed_body(inner, lambda data: keys.sign_detached(data, now, announcement))
    domain = sender.rpartition("@")[2]
    headers = [
        f"From: DICOM Mail Hub directory <{sender}>",
        f"To: {to}",
        f"Subject: {subject}",
        f"Date: {formatdate(now, localtime=False)}",
        f"Message-ID: <directory-{document['version']}-{os.urandom(8).hex()}@{domain}>",
        *([f"In-Reply-To: {in_reply_to}"] if in_reply_to else []),
        "Auto-Submitted: " + ("auto-replied" if in_reply_to is not None else "auto-generated"),
        f"X-DICOM-Mail-Hub-Directory-Version: {document['version']}",
        *(
            [f"X-DICOM-Mail-Hub-Directory-Base-Version: {document['base_version']}"]
            if document["format"] == UPDATE_FORMAT
            else []
        ),
        *(
            [f"X-DICOM-Mail-Hub-Key-Rotation: {keys.previous_fingerprint} -> {keys.fingerprint}"]
            if announcement
            else []
        ),
        "MIME-Version: 1.0",
        f"Content-Type: {content_type}",
    ]
    return ("\r\n".join(headers) + "\r\n\r\n").encode("ascii") + body


class DirectoryMailer:
    """Server side: answers directory requests and sends updates after changes."""

    def __init__(self, cfg, storage: Storage, hub_keys: HubKeySource, clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.clock = clock
        self._pending_since: float | None = None  # when a change waiting for its update was first seen
        self._sent_path = Path(cfg.data_dir) / SENT_FILE
        self._sent: tuple[int, dict[str, dict]] | None = None  # (version, participants by name) last sent
        self.storage = storage
        self.hub_keys = hub_keys
        self.local_part = cfg.directory.address
        self._asked_at: dict[int, float] = {}  # site id -> when its last request was taken (monotonic)
        self._checking = asyncio.Lock()
        self._conn: sqlite3.Connection | None = None  # the update loop's, used in _index_thread only
        self._index_thread, self._work_threads = _new_threads()
        self._jobs: set[concurrent.futures.Future] = set()  # submitted to either, not yet done
        # several hub nodes on one index: only the cluster's leader sends updates (mailhub/leadership.py)
        self.is_leader: Callable[[], bool] = lambda: True
        self._known_key = ""  # the hub key the sites know when nothing is recorded yet

    def is_directory_address(self, address: str) -> bool:
        local, _, domain = address.rpartition("@")
        return local.lower() == self.local_part and domain.lower() in self.cfg.domain

    def take_request(self, site_id: int, now: float) -> float:
        """0 if the site may be answered now (the request is then counted, answered or not), else
        the seconds until it may ask again."""
        interval = self.cfg.directory.min_request_interval
        last = self._asked_at.get(site_id)
        if last is not None and now - last < interval:
            return interval - (now - last)
        self._asked_at[site_id] = now
        return 0.0

    async def reply(self, site: Site, address: str, request_id: str | None) -> str:
        """Store the signed directory in the requesting site's mailbox; returns the queue ID."""
        sender = f"{self.local_part}@{address.rpartition('@')[2].lower()}"
        data = await self._in_thread(
            self._mail, self.hub_keys.get(), sender, address, "Participant directory", request_id or "", False
        )
        queue_id = await self.storage.store_generated(data, _meta(data), [Delivery(site.id, address, site.name)])
        metrics.directory_mail("reply")
        return queue_id

    async def start_updates(self) -> asyncio.Task:
        """Start the loop that sends updates (when configured) and rotation announcements (always).
        The first start of an index records the present version and hub key as already sent, so
        that only later changes are sent. That record is made here, before the hub says it is
        ready: a site added once it is ready is a change, sent as an update. An index that does not
        answer within _FIRST_LOOK_WAIT seconds is left to the loop (it retries; what is there when
        it gets through counts as sent), so that a slow index server does not hold up the start."""
        keys = self.hub_keys.get()
        # nothing recorded yet: the sites know this key, or the previous one if it was rotated lately
        previous = keys.previous_fingerprint if keys.in_grace() else None
        self._known_key = keys.fingerprint if previous is None else previous
        try:
            await asyncio.wait_for(self._first_look(), _FIRST_LOOK_WAIT)
        except TimeoutError:
            log.warning("directory: the index did not answer within %g s of the start; retrying", _FIRST_LOOK_WAIT)
        return asyncio.create_task(self._update_loop())

    async def _first_look(self) -> None:
        """Open the index (on its first start, what is there counts as sent: _index); a failure is
        one line, and the next look tries again."""
        try:
            await self._on_index(lambda conn: None)
        except (StorageError, sqlite3.Error) as exc:  # the index unreachable (PostgreSQL down): one line
            log.error("directory index not opened (retrying): %s", exc)
        except Exception:
            log.exception("directory index not opened; retrying")

    def _index(self) -> sqlite3.Connection:
        """Index thread: the mailer's connection, opened at first use with the present directory
        version and hub key recorded as sent unless a mark is there already."""
        if self._conn is None:
            conn = self.cfg.index_location.connect()
            first_start = directory_index.mark(conn, SENT_VERSION) is None
            directory_index.set_mark_to_version_if_unset(conn, SENT_VERSION)
            note_hub_key_announced(conn, self._known_key)
            self._sent = _load_sent(self._sent_path)
            if (
                first_start
                or self._sent is None
                and directory_index.mark(conn, SENT_VERSION) == directory_version(conn)
            ):
                # what the sites have is what is there now (without a record, the next update is whole)
                self._save_sent({"version": directory_version(conn), "participants": participants(conn)})
            self._conn = conn
        return self._conn

    def _save_sent(self, document: dict) -> None:
        """Record the participants the sites now have (written whole, then renamed into place)."""
        sent = {entry["name"]: entry for entry in document["participants"]}
        temporary = self._sent_path.with_suffix(".tmp")
        with open(temporary, "w", encoding="ascii") as f:
            json.dump({"version": document["version"], "participants": sent}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, self._sent_path)
        self._sent = (document["version"], sent)

    async def _on_index(self, function, *args):
        """function(connection, *args) in the mailer's index thread: SQLite never blocks the event loop.
        A failed connection is closed: the next call opens a new one (a PostgreSQL server restarted)."""

        def call():
            try:
                return function(self._index(), *args)
            except sqlite3.Error:
                self._close_index()
                raise

        return await self._run(self._index_thread, call)

    async def _in_thread(self, function, *args):
        return await self._run(self._work_threads, function, *args)

    def _submit(self, executor: ThreadPoolExecutor, function, *args) -> concurrent.futures.Future:
        job = executor.submit(function, *args)
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)
        return job

    async def _run(self, executor: ThreadPoolExecutor, function, *args):
        """function(*args) in one of the mailer's threads; a cancelled caller cancels it only if
        it has not begun (one under way runs to its end: _wait_for_work waits for it)."""
        return await asyncio.wrap_future(self._submit(executor, function, *args))

    async def _wait_for_work(self) -> None:
        """Wait (at most _STOP_WAIT) until no work of the mailer is under way in its threads."""
        jobs = list(self._jobs)
        if not jobs:
            return
        _done, late = await asyncio.wait([asyncio.wrap_future(job) for job in jobs], timeout=_STOP_WAIT)
        if late:
            log.warning("directory: %d job(s) still running in the mailer's threads after %g s", len(late), _STOP_WAIT)

    def _close_index(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _update_loop(self) -> None:
        try:
            await self._first_look()  # (open since the start, unless that failed or took too long)
            while True:
                await asyncio.sleep(_POLL_SECONDS)
                if not self.is_leader():
                    continue
                try:
                    await self._send_update_if_changed()
                except (StorageError, sqlite3.Error) as exc:
                    log.error("directory update failed (retrying): %s", exc)
                except Exception:
                    log.exception("directory update failed; retrying")
        finally:  # (cancelled: the hub stops, or in a cluster this node stopped leading)
            self._submit(self._index_thread, self._close_index)
            self._index_thread.shutdown(wait=False)
            self._work_threads.shutdown(wait=False)
            # new threads for the next loop: in a cluster the loop stops when this node stops being
            # the leader and starts again when it leads again (mailhub/leadership.py)
            self._index_thread, self._work_threads = _new_threads()
            await self._wait_for_work()

    async def announce_now(self, _request: dict) -> dict:
        """Control command: look for a new hub key now, and announce it (`mailhub directory
        rotate-key` asks right after a rotation), or send the update waiting for the end of
        directory.update_delay now; says what was sent."""
        sent = await self._send_update_if_changed(now=True)
        return {"fingerprint": self.hub_keys.get().fingerprint, **(sent or {"kind": None})}

    async def _send_update_if_changed(self, now: bool = False) -> dict | None:
        """Send a rotation announcement or an update if one is due (one check at a time: the loop
        and the control command must not both send it); returns what was sent."""
        async with self._checking:
            return await self._send_due(now)

    async def _send_due(self, now: bool) -> dict | None:
        keys = self.hub_keys.get()
        stamp = key_stamp(keys.fingerprint)
        due = await self._on_index(self._due, stamp)
        if due is None:
            self._pending_since = None
            return None
        version, announce, recipients = due
        if announce:
            return await self._announce_rotation(keys, recipients, stamp)
        if not now and self._wait_for_more(version):
            return None
        self._pending_since = None
        document, recipients = await self._on_index(self._document_and_recipients, keys)
        base = self._sent
        update = document if base is None else update_document(base[0], base[1], document)
        if update is None or not recipients:  # nothing a site sees changed, or nobody to tell
            await self._on_index(directory_index.set_mark, SENT_VERSION, version)
            await self._in_thread(self._save_sent, document)
            return None
        sender = f"{self.local_part}@{self.cfg.domain[0]}"
        data = await self._in_thread(
            directory_mail, update, keys, sender, "undisclosed-recipients:;", "Participant directory update"
        )
        try:
            queue_id = await self.storage.store_generated(
                data,
                _meta(data),
                [Delivery(site.id, address, site.name) for site, address in recipients],
                mark=(SENT_VERSION, version),
            )
        except AlreadyMarked:  # a second leader for a moment: its commit claimed the mark first
            log.info("directory version %d already sent by another node", version)
            await self._in_thread(self._save_sent, document)
            return None
        await self._in_thread(self._save_sent, document)  # after the commit: a crash between resends more, never less
        metrics.directory_mail("update")
        changes = (
            {"whole": len(document["participants"])}
            if update is document
            else {k: len(update[k]) for k in ("added", "changed", "removed")}
        )
        log.info(
            "directory version %d sent to %d site(s) as qid=%s (%d bytes; %s)",
            version,
            len(recipients),
            queue_id,
            len(data),
            ", ".join(f"{k} {n}" for k, n in changes.items()),
        )
        return {"kind": "update", "sites": len(recipients), "queue_id": queue_id, "bytes": len(data), **changes}

    def _wait_for_more(self, version: int) -> bool:
        """True while directory.update_delay has not passed since the change was first seen:
        changes made meanwhile go out in the same update."""
        delay = self.cfg.directory.update_delay
        at = self.clock()
        if self._pending_since is None:
            self._pending_since = at
            if delay > 0:
                log.info("directory version %d: the update goes out in %.0f s (directory.update_delay)", version, delay)
        return at - self._pending_since < delay

    def _document_and_recipients(self, conn: sqlite3.Connection, keys: HubKeys) -> tuple[dict, list]:
        """Index thread: the directory now and the sites to tell, read one after the other."""
        document = read_document(conn, keys, self.cfg.domain, self.local_part)
        recipients = [(s, s.addresses[0]) for s in list_sites(conn) if s.addresses]
        return document, recipients

    def _due(self, conn: sqlite3.Connection, stamp: int) -> tuple[int, bool, list] | None:
        """Index thread: None, or (directory version, whether a rotation is to be announced, the
        recipients) when an announcement or an update is due; the version and the sites it counts
        are read together."""

        def due(marks: dict) -> tuple[bool, bool]:
            announce = marks.get(ANNOUNCED_KEY) != stamp
            return announce, announce or (
                self.cfg.directory.notify_on_change and marks.get(SENT_VERSION) != marks["directory_version"]
            )

        if not due(directory_index.marks(conn, SENT_VERSION, ANNOUNCED_KEY))[1]:
            return None
        marks, sites = directory_index.marks_and_sites(conn, SENT_VERSION, ANNOUNCED_KEY)
        announce, any_due = due(marks)
        if not any_due:
            return None
        return marks["directory_version"], announce, [(s, s.addresses[0]) for s in sites if s.addresses]

    async def _announce_rotation(self, keys: HubKeys, recipients: list, stamp: int) -> dict | None:
        if keys.previous is None:  # replaced by hand, or the previous key's file is missing
            log.warning(
                "hub key %s is not certified by a previous hub key on file: no rotation to announce;"
                " the sites must learn its fingerprint out of band",
                keys.fingerprint,
            )
        elif recipients:
            try:
                queue_id = await self._store_for_all(
                    keys, recipients, "Hub signing key rotation (participant directory)", True, (ANNOUNCED_KEY, stamp)
                )
            except AlreadyMarked:  # a second leader for a moment: its commit claimed the mark first
                log.info("hub key %s already announced by another node", keys.fingerprint)
                return None
            metrics.directory_mail("key_rotation")
            log.info(
                "hub key rotation %s -> %s announced to %d site(s) as qid=%s",
                keys.previous_fingerprint,
                keys.fingerprint,
                len(recipients),
                queue_id,
            )
            return {"kind": "key_rotation", "sites": len(recipients), "queue_id": queue_id}
        await self._on_index(directory_index.set_mark, ANNOUNCED_KEY, stamp)
        return None

    async def _store_for_all(
        self, keys: HubKeys, recipients: list, subject: str, announcement: bool, mark: tuple[str, int]
    ) -> str:
        """One mail signed by `keys` for every site, committed with the meta row `mark`."""
        sender = f"{self.local_part}@{self.cfg.domain[0]}"
        data = await self._in_thread(self._mail, keys, sender, "undisclosed-recipients:;", subject, None, announcement)
        return await self.storage.store_generated(
            data, _meta(data), [Delivery(site.id, address, site.name) for site, address in recipients], mark=mark
        )

    def _mail(
        self, keys: HubKeys, sender: str, to: str, subject: str, in_reply_to: str | None, announcement: bool
    ) -> bytes:
        """Worker thread: read the index, build and sign the mail."""
        conn = self.cfg.index_location.connect()
        try:
            document = read_document(conn, keys, self.cfg.domain, self.local_part)
        finally:
            conn.close()
        return directory_mail(document, keys, sender, to, subject, in_reply_to, time.time(), announcement)


def note_hub_key_announced(conn, fingerprint: str) -> None:
    """Record `fingerprint` as the hub key the sites know, unless one is recorded already."""
    directory_index.set_mark_if_unset(conn, ANNOUNCED_KEY, key_stamp(fingerprint))


def announced_key_stamp(conn) -> int | None:
    return directory_index.mark(conn, ANNOUNCED_KEY)


def _load_sent(path: Path) -> tuple[int, dict[str, dict]] | None:
    """The participants the last update sent, or None when there is no usable record (the next
    update is then the whole directory)."""
    try:
        with open(path, encoding="ascii") as f:
            record = json.load(f)
        return int(record["version"]), dict(record["participants"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s unusable (%s); the next directory update is the whole directory", path, exc)
        return None


def _meta(data: bytes) -> MessageMeta:
    return MessageMeta(mail_from="", sender_site=None, dot_lines=b"\r\n." in b"\r\n" + data)
