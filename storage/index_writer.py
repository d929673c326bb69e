# Every write to the SQLite index, on one connection, one request at a time: the group commit of
# a batch of messages (made durable by the hub beforehand: files of their own, or frames in packs),
# deletions with download totals, IMAP flags, throttle states, outbound queue operations, and the
# trash. Runs in the index writer process (storage/writer_process.py); plain blocking code that
# knows nothing of the event loop, and never sees message bytes. One writer means no SQLite lock
# contention and no interleaved transactions.
# Each group commit with messages is numbered (table commits; the hub picks the next number and a
# random attempt id after asking last_commit()); its packed messages' envelope records name both,
# and the previous commit's, and after the COMMIT a ledger line says it committed
# (storage/ledger.py): what lets a rebuild of the index tell committed mails from the leftovers of
# a commit that failed. Removals are appended to the ledger (fdatasync) before the writer answers.
# On PostgreSQL (storage.index) a transient failure - a deadlock (40P01), a serialization failure
# (40001), the connection lost (a restart, pg_terminate_backend) - rolls the transaction back and
# runs it again, RETRIES times at most (never half of one: each try is a whole transaction); a
# COMMIT whose answer was lost is looked up before anything is redone (a group commit by its
# `commits` row, once the old server session is over: ended by the writer if it still ran the
# COMMIT), else reported unknown (CommitUnknown: the hub keeps the files, sends no 250). A
# server that stays down fails each request with one line (451 4.3.0 at SMTP) until it is back.
import collections
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, TypeVarTuple

from . import audit, cluster_events, db, events, faults, ledger, sql, verify
from .errors import (
    REFUSED_MAILBOX,
    REFUSED_MARKED,
    REFUSED_RECEIVED,
    REFUSED_SUBMITTED,
    CommitUnknown,
    StorageError,
)
from .files import unlink_quietly
from .index import IndexLocation
from .lifecycle import NOTICE_MARK
from .packs import truncate_durably
from .records import Delivery, Downloads, MessageMeta, Removal, pickled_by_fields
from .usage import write_throttle_states

LEDGER_SYNC_INTERVAL = 1.0  # seconds: under steady load, commit lines are made durable this often
RETRIES = 4  # PostgreSQL: a transaction redone at most this many times after a transient failure
RETRY_PAUSE = 0.05  # seconds before the first redo, doubled for each next one
RECONNECT_TIMEOUT = 5  # seconds a new connection to PostgreSQL may take (a request waits that long)
SESSION_END_TIMEOUT = 5  # seconds a lost COMMIT's session may take to end before its lookup
# PostgreSQL session settings of the writer's connection: a row lock another node's transaction
# holds (a stopped or cut-off node) is waited for LOCK_TIMEOUT at most (then retried, then 451);
# its own transaction left open (this process stopped, the network cut) is ended by the server
# after IDLE_IN_TRANSACTION_TIMEOUT, freeing what it locked for every other node
LOCK_TIMEOUT = 10.0
IDLE_IN_TRANSACTION_TIMEOUT = 60.0
log = logging.getLogger("mailhub.storage")


T = TypeVar("T")
Args = TypeVarTuple("Args")


@pickled_by_fields
@dataclass(slots=True)
class BatchItem:
    """A message of a group commit. In the hub a small message comes with its `data` (received
    chunks) and `spool_path`, the file a pack it begins starts as; the hub's pack writer appends it
    to the open pack and sets `blob`, `offset`, `sha256` and `crc32`, and the writer process gets
    it without its data (`packed`). Any other one is already durable as `blob`. Paths are plain
    strings: cheaper to send and to make than pathlib's."""

    queue_id: str
    size: int
    received_at: float
    meta: MessageMeta
    deliveries: list[Delivery]
    remote: list[str]
    mark: tuple[str, int] | None
    blob: str  # '<hour folder>/<name>' (a packed one: the name a pack it begins takes)
    sha256: str | None = None
    data: list[Any] | None = None  # bytes; pickle.PickleBuffers to the writer process, bytearrays in it
    spool_path: str | None = None
    offset: int = 0
    structure: str | None = None  # meta.structure as JSON (set by the writer, for the record and the row)
    crc32: int | None = None  # zlib CRC-32 of the message
    packed: bool = False  # a frame in a pack (written by the hub: `data` stays in the hub)


class IndexWriter:
    def __init__(self, data_dir: Path, release_freed_after: float, index_url: str = "", node: str = ""):
        self.location = IndexLocation(data_dir, index_url)
        self.conn = self.location.connect(migrate=False)  # (the hub migrated it before it started this writer)
        _set_session(self.conn)
        self._lost = False  # PostgreSQL: the connection failed; the next request connects again
        self._session: tuple[object, tuple[int, Any] | None] = (None, None)  # (raw connection, _session_of)
        # this hub node's name: on PostgreSQL each mailbox change is NOTIFYed to the other nodes
        # (storage/cluster_events.py) in its transaction, naming the node (its own skip it)
        self.node = node
        self.blob_dir = str(data_dir / "blobs")
        self.release_freed_after = release_freed_after
        # (monotonic, Unix time) at the start of this process's transactions of the last
        # release_freed_after seconds (one per second at most): a range freed by one of them is
        # not released before that many seconds have really passed, whatever the wall clock does
        # (freed_at is Unix time, written by the trigger; a step forward would release it early,
        # while a reader may still be sending it)
        self._recent: collections.deque[tuple[float, float]] = collections.deque()
        self.ledger = ledger.LedgerWriter(data_dir)
        self.stream: int | None = None  # the node's stream of group commit numbers (ledger.next_seq)
        self.seq, self.attempt = ledger.last_commit(self.conn)
        self._pruned = (0, 0)  # (seq, removal id) up to which the index's ledger rows were deleted
        # what the ledger holds durably: commits up to synced_seq, removals up to flushed_removal
        self.synced_seq = self.flushed_removal = 0
        # ids of the ledger_pending rows this writer has made durable in its ledger and not yet
        # deleted: only these are pruned. Ids are taken when a transaction inserts the row, not when
        # it commits: on PostgreSQL another writer (node) or the command line may commit a lower id
        # after this writer read past it; deleting 'id <= the highest written' would drop that
        # removal before any ledger held it (a rebuild would bring the deleted mail back)
        self._written_removals: set[int] = set()
        self._ledger_behind = True  # an append failed (or none yet): catch up from the index first
        self._synced_at = time.monotonic()
        self._to_ledger([], sync=True)

    def ready(self) -> None:
        """Answers once the writer has opened the index."""

    def set_node(self, node: str) -> None:
        self.node = node

    def set_commit_stream(self, stream: int | None) -> None:
        """Number this node's group commits in a stream of its own (several nodes writing one index:
        ledger.stream_last); None: 1, 2, 3... (one hub)."""
        self.stream = stream
        self.seq, self.attempt = ledger.stream_last(self.conn, stream)

    def close(self) -> None:
        try:
            self.sync_ledger()
        finally:
            self.ledger.close()
            self.conn.close()

    def in_transaction(self, function: Callable[[sqlite3.Connection, *Args], T], *args: *Args) -> T:
        """function(conn, *args) in one transaction (also storage.outbound functions, by queue_op)."""
        self._note_time()

        pruning = set(self._written_removals)

        def body(conn: sql.Connection) -> T:
            self._prune_removals(conn, pruning)
            result = function(conn, *args)  # type: ignore[arg-type]  # both engines' connections
            faults.hit("writer", "op_before_commit")
            return result

        result = self._write(body)
        self._written_removals -= pruning
        faults.hit("writer", "op_after_commit")
        self.flush_removals()
        return result

    def remove_with(
        self, function: Callable[[sqlite3.Connection, *Args], tuple[list[Any], T]], *args: *Args
    ) -> tuple[list[Any], T]:
        """function(conn, *args) in one transaction, where it removes mailbox entries (expiry) and
        returns ([(site_id, uid, sender_site, size, was_waiting)] removed, result); on PostgreSQL
        the other nodes hear of the removals at its commit."""

        def removing(conn: sqlite3.Connection, *inner: *Args) -> tuple[list[Any], T]:
            removed, result = function(conn, *inner)
            cluster_events.notify(conn, cluster_events.Changes(self.node, removed=[tuple(r) for r in removed]))
            return removed, result

        return self.in_transaction(removing, *args)

    def reconnect_if_lost(self) -> None:
        """PostgreSQL: a new connection if the last one failed (StorageError with one line if the
        server cannot be reached); the group commit numbers are read again from the index."""
        if not self.location.is_postgresql:
            return
        raw = getattr(self.conn, "raw", None)
        if not self._lost and raw is not None and not raw.closed and not raw.broken:
            return
        try:
            self.conn.close()
        except sqlite3.Error:
            pass
        self.conn = self.location.connect(RECONNECT_TIMEOUT, migrate=False)
        _set_session(self.conn)
        self._lost = False
        self.seq, self.attempt = ledger.stream_last(
            self.conn, self.stream
        )  # a COMMIT whose answer was lost may be there
        self._ledger_behind = True  # its ledger line too: caught up from the index's rows
        log.warning("index writer: connected to the index at %s again", self.location.where())

    def _write(
        self, body: Callable[[sql.Connection], T], committed: Callable[[sql.Connection], bool] | None = None
    ) -> T:
        """body(conn) in one write transaction. On PostgreSQL, a transient failure rolls it back and
        runs it again (RETRIES times at most, pausing RETRY_PAUSE doubled each time); if the answer
        to COMMIT itself was lost, `committed(conn)` on a new connection tells whether it took
        (no `committed`: CommitUnknown). On SQLite one try, as ever."""
        for attempt in range(RETRIES + 1):
            self.reconnect_if_lost()
            conn = self.conn
            body_done = False
            try:
                session = self._session_of(conn)
                with db.transaction(conn):
                    result = body(conn)
                    body_done = True  # what fails from here on is the COMMIT
                return result
            except sqlite3.DatabaseError as exc:
                if not self.location.is_postgresql:
                    raise
                # a server turned read-only (failover: the old primary now a standby) keeps the
                # connection and refuses every write: a new connection finds the primary
                lost = _connection_lost(conn) or _sqlstate(exc) == "25006"
                if not (lost or (isinstance(exc, sqlite3.OperationalError) and _transient(exc))):
                    raise
                self._lost = self._lost or lost
                if body_done and lost:
                    if committed is None:
                        raise CommitUnknown(
                            f"index: the answer to COMMIT was lost ({exc}): whether it took is unknown"
                        ) from exc
                    try:
                        self.reconnect_if_lost()
                        # the old session may still be carrying the COMMIT out (a synchronous
                        # standby's answer, a slow disk): a lookup now could miss a commit that
                        # takes a moment later, and the redo would then fail on its rows (or a
                        # second commit be made). It is ended, and gone, before the lookup decides
                        if not self._ended(self.conn, session):
                            raise StorageError("the old session is still running on the server")
                        took = committed(self.conn)
                    except (StorageError, sqlite3.Error) as check_failed:
                        raise CommitUnknown(
                            f"index: the answer to COMMIT was lost ({exc}), and it cannot be checked: {check_failed}"
                        ) from None
                    if took:
                        return result
                if attempt == RETRIES:
                    raise StorageError(f"index: {exc} (tried {RETRIES + 1} times)") from exc
                log.warning("index writer: %s; the transaction is run again (try %d)", exc, attempt + 2)
                time.sleep(RETRY_PAUSE * 2**attempt)
        raise AssertionError("unreachable")

    def _session_of(self, conn: sql.Connection) -> tuple[int, Any] | None:
        """PostgreSQL: (pid, backend_start) of the server's session behind `conn` (asked once per
        connection): what tells, after a lost COMMIT answer, whether that session is over."""
        raw = getattr(conn, "raw", None)
        if raw is None:
            return None
        if self._session[0] is not raw:
            row = conn.execute(
                "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
            ).fetchone()
            self._session = (raw, (int(row[0]), row[1]) if row is not None else None)
        return self._session[1]

    @staticmethod
    def _ended(conn: sql.Connection, session: tuple[int, Any] | None) -> bool:
        """The server session `session` is over: ended now (pg_terminate_backend) if it still runs,
        waited for SESSION_END_TIMEOUT seconds at most (False: still there, or unknown)."""
        if session is None:
            return False
        deadline = time.monotonic() + SESSION_END_TIMEOUT
        while True:
            row = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ? AND backend_start = ?",
                session,
            ).fetchone()
            if row is None:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def _note_time(self) -> None:
        now = time.monotonic()
        if not self._recent or now - self._recent[-1][0] >= 1.0:
            self._recent.append((now, time.time()))

    def last_commit(self) -> tuple[int, int]:
        """(seq, attempt) of the last group commit: the hub numbers the next one (its packed mails'
        envelope records name it and this one, written before the commit)."""
        return self.seq, self.attempt

    def commit_batch(
        self,
        batch: list[BatchItem],
        loose: list[tuple[Any, ...]],
        seq: int = 0,
        attempt: int = 0,
        ends: dict[str, int] | None = None,
    ) -> list[str | None]:
        """One transaction for a batch of messages, durable already (files of their own, or frames
        the hub appended to packs as group commit `seq` with attempt id `attempt`, the packs' new
        committed `ends`), with their tracking events and the queued refusal `loose` (event rows).
        Returns each one's SHA-256, or for a message left out because a receiving mailbox had no
        room for it or a volume quota was reached, its cause (errors.REFUSED_*: None for the
        mailbox; errors.refusal() makes its error). Its frame in a pack stays, named refused by the
        commit's ledger line; the caller removes its own blob file."""
        if not batch:
            self.in_transaction(_index_batch, batch, loose)
            return []
        if seq != ledger.next_seq(self.seq, self.stream):  # the hub numbered it from a commit it did not know of
            raise StorageError(f"group commit {seq} out of sequence (the last one is {self.seq})")
        self._note_time()

        def body(conn: sql.Connection) -> tuple[dict[int, str | None], list[str], list[str]]:
            refused = _index_batch(conn, batch, loose)  # type: ignore[arg-type]  # both engines'
            cluster_events.notify(
                conn,
                cluster_events.Changes(
                    self.node,
                    committed=[
                        (item.meta.sender_site, [d.site_id for d in item.deliveries], item.size, item.received_at)
                        for i, item in enumerate(batch)
                        if i not in refused
                    ],
                    seq=seq,  # (the other nodes tell by it a reservations snapshot older than this commit)
                ),
            )
            files = [item.queue_id for i, item in enumerate(batch) if not item.packed and i not in refused]
            left_out = [batch[i].queue_id for i in sorted(refused)]
            self._note_commit(seq, attempt, files, left_out, ends or {})
            faults.hit("writer", "before_commit")
            return refused, files, left_out

        def took(conn: sql.Connection) -> bool:  # the COMMIT's answer was lost: is the group commit there?
            return (
                conn.execute("SELECT 1 FROM commits WHERE seq = ? AND attempt = ?", (seq, attempt)).fetchone()
                is not None
            )

        pruning = set(self._written_removals)
        refused, files, left_out = self._write(body, took)
        self._written_removals -= pruning
        faults.hit("writer", "after_commit")
        self.seq, self.attempt = seq, attempt
        self._to_ledger([ledger.commit_line(seq, attempt, files, left_out)], sync=False)
        return [refused[i] if i in refused else item.sha256 for i, item in enumerate(batch)]

    def _note_commit(self, seq: int, attempt: int, files: list[str], refused: list[str], ends: dict[str, int]) -> None:
        """The group commit's own rows (in its transaction): its number, the packs' committed ends;
        rows the ledger already holds durably go."""
        conn = self.conn
        conn.execute(
            "INSERT INTO commits (seq, attempt, mails) VALUES (?, ?, ?)",
            (seq, attempt, json.dumps({"f": files, "x": refused}) if files or refused else ""),
        )
        if ends:
            conn.executemany(
                "INSERT INTO packs (blob, committed_end) VALUES (?, ?) ON CONFLICT (blob)"
                " DO UPDATE SET committed_end = excluded.committed_end",
                list(ends.items()),
            )
        if not self._ledger_behind and (self.synced_seq, self.flushed_removal) != self._pruned:
            if self.stream is None:
                conn.execute("DELETE FROM commits WHERE seq <= ?", (self.synced_seq,))  # (not this one)
            else:  # only its own stream's: another node's lines may not be durable in its ledger yet
                conn.execute(
                    "DELETE FROM commits WHERE seq <= ? AND seq % ? = ?", (self.synced_seq, ledger.STREAMS, self.stream)
                )
            self._pruned = (self.synced_seq, self.flushed_removal)
        self._prune_removals(conn, set(self._written_removals))

    @staticmethod
    def _prune_removals(conn: sql.Connection, ids: set[int]) -> None:
        """Delete the ledger_pending rows of `ids` (durable in this node's ledger): one statement per
        run of consecutive ids (a site's removal writes thousands), never a range with a gap in it."""
        runs: list[list[int]] = []
        for i in sorted(ids):
            if runs and runs[-1][1] == i - 1:
                runs[-1][1] = i
            else:
                runs.append([i, i])
        if runs:
            conn.executemany("DELETE FROM ledger_pending WHERE id >= ? AND id <= ?", [tuple(run) for run in runs])

    def sync_ledger(self, idle: bool = True) -> None:
        """Make the commit lines durable: when the writer is idle, or LEDGER_SYNC_INTERVAL after the last time."""
        if (self.ledger.dirty or self._ledger_behind) and (
            idle or time.monotonic() - self._synced_at >= LEDGER_SYNC_INTERVAL
        ):
            self._to_ledger([], sync=True)

    def flush_removals(self) -> None:
        """Append the removals the index noted (ledger_pending) to the ledger, durably. Never raises:
        what they describe is committed; an index that cannot be read now (PostgreSQL gone) leaves
        them for a later call (the ledger is caught up from the index)."""
        try:
            # every row still there but those written already (a lower id may commit after a higher)
            docs = [
                doc
                for doc in ledger.pending_lines(self.conn, 0)
                if doc.get("d", doc.get("o")) not in self._written_removals
            ]
        except (sqlite3.Error, StorageError):
            self._ledger_behind = True
            self._lost = self._lost or _connection_lost(self.conn)
            return
        if docs or self._ledger_behind:
            self._to_ledger(docs, sync=True)

    def _to_ledger(self, docs: list[dict[str, Any]], sync: bool) -> None:
        """Append to the ledger; never raises (what it describes is committed already). After a
        failure (a full disk) the index keeps the lines' rows (commits, ledger_pending) until a
        later call appends them all again."""
        try:
            if self._ledger_behind:
                written: list[int] = []
                self.flushed_removal = max(self.flushed_removal, ledger.catch_up(self.conn, self.ledger, written))
                self._written_removals.update(written)
                self._ledger_behind = False
            else:
                self.ledger.append(docs + [ledger.uid_line(self.conn)] if sync else docs)
                if sync:
                    self.ledger.sync()
                    ids = [int(d["d"] if "d" in d else d["o"]) for d in docs if "d" in d or "o" in d]
                    self.flushed_removal = max([self.flushed_removal, *ids])
                    self._written_removals.update(ids)
            if not self.ledger.dirty:
                self.synced_seq = self.seq
                self._synced_at = time.monotonic()
        except OSError:
            self._ledger_behind = True
        except (sqlite3.Error, StorageError):  # PostgreSQL unreachable: caught up once it is back
            self._ledger_behind = True
            self._lost = self._lost or _connection_lost(self.conn)

    def settle(self, queue_ids: list[str], begun: list[str], own: str = "") -> dict[str, str] | None:
        """A writer died during a group commit of these mails (`begun`: the packs its small mails
        would have begun). If it committed: {queue ID: SHA-256} (the accepted events, which outlive
        a quick deletion). If not: None, after removing what it wrote (the frames past the packs'
        committed ends, the packs it began): the batch leaves no trace. Only packs whose name
        starts with `own` are cut back (a shared blob folder: another node's open pack holds its
        batch in flight past its committed end)."""
        marks = ",".join("?" * len(queue_ids))
        found = dict(
            self.conn.execute(
                f"SELECT queue_id, detail FROM events WHERE kind = '{events.ACCEPTED}' AND queue_id IN ({marks})",
                queue_ids,
            )
        )
        if found:
            return found
        for blob, end in self.conn.execute(
            "SELECT blob, committed_end FROM packs WHERE substr(blob, 1, ?) = ?", (len(own), own)
        ).fetchall():
            try:
                truncate_durably(f"{self.blob_dir}/{blob}", end)
            except FileNotFoundError:
                pass
        for blob in begun:
            if (
                self.conn.execute(
                    "SELECT 1 FROM messages WHERE blob = ? UNION ALL SELECT 1 FROM packs WHERE blob = ?", (blob, blob)
                ).fetchone()
                is None
            ):
                unlink_quietly(f"{self.blob_dir}/{blob}")
        return None

    def delete_entries(
        self,
        site_id: int,
        uids: list[int],
        downloads: Downloads | None,
        site_name: str | None,
        removal: Removal | None = None,
    ) -> tuple[list[Any], list[Any]]:
        """Remove mailbox entries, mark downloads, add the session's totals, with the tracking events
        and the audit records (deleted by the site, or as `removal` says: expired, by an operator).
        Returns what changed: ([(uid, sender_site, size)] newly marked downloaded,
        [(uid, sender_site, size, was_waiting)] removed)."""

        def body(conn: sql.Connection) -> tuple[list[Any], list[Any]]:
            result = _delete_entries(conn, site_id, uids, downloads, site_name, removal)  # type: ignore[arg-type]
            fetched, removed = result
            cluster_events.notify(
                conn,
                cluster_events.Changes(
                    self.node,
                    fetched=[(site_id, *row) for row in fetched],
                    removed=[(site_id, *row) for row in removed],
                ),
            )
            faults.hit("writer", "delete_before_commit")
            return result

        result = self._write(body)
        faults.hit("writer", "delete_after_commit")
        self.flush_removals()
        return result

    def update_flags(self, site_id: int, uids: list[int], add: int, remove: int) -> None:
        def body(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE mailbox SET flags = (flags | ?) & ~? WHERE site_id = ? AND uid = ?",
                [(add, remove, site_id, uid) for uid in uids],
            )
            cluster_events.notify(conn, cluster_events.Changes(self.node, flagged=[site_id]))

        self.in_transaction(body)

    def mark_damaged(self, queue_id: str, reason: str, found_by: str, at: float, entry: str | None) -> bool:
        """A mail found damaged (storage/verify.py); False if it was known already."""
        return self.in_transaction(verify.note_damaged, queue_id, reason, found_by, at, entry)

    def save_throttle_states(self, states: dict[int, dict[str, Any]], now: float) -> None:
        self.in_transaction(write_throttle_states, states, now)

    def prune_events(self, before: float) -> int:
        return events.prune_batch(self.conn, before)

    def prune_audit(self, before: float) -> int:
        return audit.prune_batch(self.conn, before)

    def freed(self) -> tuple[list[str], list[tuple[str, int, int]]]:
        """The freed blobs, and the ranges of packs that live on freed at least release_freed_after
        seconds ago (a reader may still be sending a message freed meanwhile: a hole would turn its
        bytes into zeros, while an unlinked file stays readable). The hub closes its open pack if it
        is listed (Storage.empty_trash) before any more messages could go into it."""
        self.flush_removals()  # those the command line made (site remove, queue delete)
        blobs = [blob for (blob,) in self.conn.execute("SELECT blob FROM blob_trash")]
        now = time.monotonic()
        while self._recent and now - self._recent[0][0] >= self.release_freed_after:
            self._recent.popleft()
        wall = time.time()
        # freed_at is the clock of the index's triggers: on PostgreSQL the server's, shared by every
        # node; a node whose own clock runs ahead of it released other nodes' freed ranges early
        offset = self.conn.execute("SELECT unix_now()").fetchone()[0] - wall if self.location.is_postgresql else 0.0
        young_from = self._recent[0][1] + offset if self._recent else float("inf")
        holes = self.conn.execute(
            "SELECT blob, start, size FROM blob_holes WHERE freed_at <= ? AND freed_at < ?",
            (wall + offset - self.release_freed_after, young_from),
        ).fetchall()
        return blobs, holes

    def forget_freed(self, blobs: list[str], holes: list[tuple[str, int, int]]) -> None:
        self.conn.executemany("DELETE FROM blob_trash WHERE blob = ?", [(b,) for b in blobs])
        self.conn.executemany(
            "DELETE FROM blob_holes WHERE blob = ? AND start = ?", [(blob, start) for blob, start, _size in holes]
        )


# Two-key advisory locks on PostgreSQL (storage/postgres/cluster.py has the others): a mailbox with a
# limit is checked and filled by one node's commit at a time (SQLite's writer holds its one lock).
LIMIT_LOCK_SPACE = 0x6D680003

_HELD_SQL = (
    "SELECT coalesce(sum(held_bytes), 0), coalesce(sum(held_messages), 0) FROM mailbox_usage WHERE receiver_id = ?"
)


_VOLUME_SQL = "SELECT submitted_bytes, received_bytes FROM site_volume WHERE site_id = ? AND period = ?"


def _over_mailbox_limits(conn: sqlite3.Connection, batch: list[BatchItem]) -> dict[int, str | None]:
    """The batch's messages that would take a receiving mailbox over its byte or message limit
    (Delivery.max_bytes/max_messages), a receiver over its received volume of the UTC day or month
    (Delivery.max_received_day/month) or the sender over its submitted volume (MessageMeta.
    max_submitted_day/month), counting what the index holds and the batch's messages before them:
    {index: its errors.REFUSED_* cause}. The server reserved room before it commits, so this refuses
    nothing unless something else filled the mailbox or the volume meanwhile (another node's mail
    admitted at the same moment): it is the check that holds whatever the server believed."""
    limited: set[int] = set()  # mailboxes with a byte or message limit
    volumes: set[int] = set()  # sites with a volume quota
    for item in batch:
        for d in item.deliveries:
            if d.max_bytes is not None or d.max_messages is not None:
                limited.add(d.site_id)
            if d.max_received_day is not None or d.max_received_month is not None:
                volumes.add(d.site_id)
        m = item.meta
        if item.deliveries and m.sender_site is not None:
            if m.max_submitted_day is not None or m.max_submitted_month is not None:
                volumes.add(m.sender_site)
    refused: dict[int, str | None] = {}
    if not (limited or volumes):
        return refused
    if sql.dialect(conn) == sql.POSTGRESQL:  # several nodes' writers: one at a time per limited site
        for site in sorted(limited | volumes):  # (in one order: no deadlock) until the commit
            conn.execute("SELECT pg_advisory_xact_lock(?, ?)", (LIMIT_LOCK_SPACE, site))
    held = {site: list(conn.execute(_HELD_SQL, (site,)).fetchone()) for site in limited}
    used: dict[tuple[int, str], list[int]] = {}  # (site, period) -> [submitted, received], as read

    def volume(site: int, period: str) -> list[int]:
        found = used.get((site, period))
        if found is None:
            row = conn.execute(_VOLUME_SQL, (site, period)).fetchone()
            found = used[(site, period)] = [row[0], row[1]] if row else [0, 0]
        return found

    def over(site: int, at: float, size: int, per_day: int | None, per_month: int | None, column: int) -> bool:
        t = time.gmtime(at)
        day, month = time.strftime("%Y-%m-%d", t), time.strftime("%Y-%m", t)
        return (per_day is not None and volume(site, day)[column] + size > per_day) or (
            per_month is not None and volume(site, month)[column] + size > per_month
        )

    for i, item in enumerate(batch):
        size, at, m = item.size, item.received_at, item.meta
        sender = m.sender_site if item.deliveries else None
        if any(
            (d.max_bytes is not None and held[d.site_id][0] + size > d.max_bytes)
            or (d.max_messages is not None and held[d.site_id][1] + 1 > d.max_messages)
            for d in item.deliveries
            if d.site_id in limited
        ):
            refused[i] = REFUSED_MAILBOX
            continue
        if any(
            over(d.site_id, at, size, d.max_received_day, d.max_received_month, 1)
            for d in item.deliveries
            if d.site_id in volumes
        ):
            refused[i] = REFUSED_RECEIVED
            continue
        if sender in volumes and over(sender, at, size, m.max_submitted_day, m.max_submitted_month, 0):
            refused[i] = REFUSED_SUBMITTED
            continue
        for d in item.deliveries:
            if d.site_id in held:
                held[d.site_id][0] += size
                held[d.site_id][1] += 1
        t = time.gmtime(at)
        periods = (time.strftime("%Y-%m-%d", t), time.strftime("%Y-%m", t))
        for d in item.deliveries:
            if d.site_id in volumes:
                for period in periods:
                    volume(d.site_id, period)[1] += size
        if sender is not None and sender in volumes:
            for period in periods:
                volume(sender, period)[0] += size
    return refused


_CLAIM_FORWARD = (
    "INSERT INTO meta AS m (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value"
    " WHERE m.value < excluded.value RETURNING key"
)
_CLAIM_CHANGE = (
    "INSERT INTO meta AS m (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value"
    " WHERE m.value <> excluded.value RETURNING key"
)


def _index_batch(
    conn: sqlite3.Connection, batch: list[BatchItem], loose: list[tuple[Any, ...]]
) -> dict[int, str | None]:
    """The batch's rows; returns the messages left out, by index, with their cause (_over_mailbox_limits)."""
    refused = _over_mailbox_limits(conn, batch)
    for i, item in enumerate(batch):
        # a message's mark "sent up to here" is claimed, not just set: only the transaction that moves
        # it stores its message (PostgreSQL: a second one waits on the row, then sees it moved and
        # skips), so two leaders for a moment store it once. The lifecycle notices' mark only moves
        # forward; the directory's (a version, a hub key's stamp: no counter) to any other value.
        if item.mark is not None and i not in refused:
            claim = _CLAIM_FORWARD if item.mark[0] == NOTICE_MARK else _CLAIM_CHANGE
            if conn.execute(claim, item.mark).fetchone() is None:
                refused[i] = REFUSED_MARKED
    if refused:
        batch = [item for i, item in enumerate(batch) if i not in refused]
    messages = []
    entries = []
    queued: list[tuple[Any, ...]] = []
    tracked = list(loose)
    accepted: list[tuple[Any, ...]] = []  # audit rows (storage.audit.record_accepted)
    for item in batch:
        m = item.meta
        qid, size, at = item.queue_id, item.size, item.received_at
        if item.structure is not None:  # made for its envelope record
            structure = None if item.structure == "null" else item.structure
        else:
            structure = None if m.structure is None else json.dumps(m.structure, separators=(",", ":"))
        messages.append(
            (
                qid,
                item.blob,
                item.offset,
                size,
                item.sha256,
                int(m.dot_lines),
                at,
                m.mail_from,
                m.sender_site,
                m.message_id,
                m.set_id,
                m.set_part,
                m.set_total,
                len(item.deliveries) + len(item.remote),
                structure,
                item.crc32,
            )
        )
        tracked.append(
            (
                at,
                events.ACCEPTED,
                qid,
                m.sender_name,
                None,
                m.mail_from,
                None,
                m.peer,
                size,
                m.message_id,
                m.set_id,
                m.set_part,
                m.set_total,
                item.sha256,
            )
        )
        actor = m.sender_name or m.mail_from or None
        for d in item.deliveries:
            entries.append((d.site_id, qid, d.rcpt, at))
            accepted.append((at, d.site_name, d.site_id, qid, m.message_id, m.set_id, size, item.sha256, actor))
            tracked.append(
                (
                    at,
                    events.DELIVERED,
                    qid,
                    d.site_name,
                    m.sender_name,
                    None,
                    d.rcpt,
                    None,
                    size,
                    None,
                    None,
                    None,
                    None,
                    None,
                )
            )
        queued.extend((qid, rcpt, at, at) for rcpt in item.remote)
    conn.executemany(
        "INSERT INTO messages (queue_id, blob, blob_offset, size, sha256, dot_lines, received_at,"
        " mail_from, sender_site, message_id, set_id, set_part, set_total, refs, structure, crc32)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        messages,
    )
    if entries and sql.dialect(conn) == sql.POSTGRESQL:
        # each receiving site's UID counter row locked (in site order: no deadlock) BEFORE its UIDs are
        # taken: a transaction of another writer (node) delivering to the site waits until this one
        # commits, so UIDs become visible in their order and UIDNEXT never passes one not yet seen
        conn.executemany(
            "INSERT INTO imap_uid_next AS n (site_id, uid_next) VALUES (?, 1)"
            " ON CONFLICT (site_id) DO UPDATE SET uid_next = n.uid_next",
            [(site,) for site in sorted({entry[0] for entry in entries})],
        )
    conn.executemany("INSERT INTO mailbox (site_id, queue_id, rcpt, delivered_at) VALUES (?, ?, ?, ?)", entries)
    conn.executemany(events.INSERT, tracked)
    audit.record_accepted(conn, accepted)
    if queued:
        conn.executemany(
            "INSERT INTO outbound (queue_id, rcpt, queued_at, next_attempt_at) VALUES (?, ?, ?, ?)", queued
        )
    # a pack that was freed while open is referenced again
    conn.executemany("DELETE FROM blob_trash WHERE blob = ?", [(blob,) for blob in {i.blob for i in batch if i.packed}])
    return refused


_ENTRY_SQL = (
    "SELECT b.uid, m.sender_site, m.size, CASE WHEN b.fetched_at IS NULL THEN 1 ELSE 0 END FROM mailbox b"
    " JOIN messages m ON m.queue_id = b.queue_id WHERE b.site_id = ? AND b.uid = ?"
)


def _delete_entries(
    conn: sqlite3.Connection,
    site_id: int,
    uids: list[int],
    downloads: Downloads | None,
    site_name: str | None,
    removal: Removal | None = None,
) -> tuple[list[Any], list[Any]]:
    fetched: list[Any] = []
    removed: list[Any] = []
    tracked: list[tuple[Any, ...]] = []
    now = time.time()
    protocol = downloads.protocol if downloads is not None else None
    peer = downloads.peer if downloads is not None else None
    if downloads is not None and downloads.retrieved:  # before the deletions, which may free the messages
        audit.record_downloads(conn, site_id, downloads.retrieved, " ".join(filter(None, (protocol, peer))) or None)
    how = protocol  # the deleted events' detail
    if removal is None:
        audit.record_entries(conn, audit.DELETED_BY_SITE, site_id, uids, None, protocol, now)
    else:
        audit.record_entries(conn, removal.event, site_id, uids, removal.actor, removal.detail, now)
        how = f"{removal.event} by {removal.actor}"[:300]
    for uid in downloads.fetched_uids if downloads is not None else ():
        row = conn.execute(_ENTRY_SQL, (site_id, uid)).fetchone()
        if row is not None and row[3]:
            conn.execute("UPDATE mailbox SET fetched_at = ? WHERE uid = ?", (now, uid))
            fetched.append(row[:3])
    for uid in uids:
        row = conn.execute(_ENTRY_SQL, (site_id, uid)).fetchone()
        if row is not None:
            gone = conn.execute("DELETE FROM mailbox WHERE uid = ? RETURNING queue_id", (uid,)).fetchall()
            removed.append(row)
            tracked.append(events.row(events.Event(now, events.DELETED, gone[0][0], site_name, peer=peer, detail=how)))
    if downloads is not None:
        _add_downloads(conn, site_id, downloads)
        tracked[:0] = [
            events.row(events.Event(at, events.DOWNLOADED, qid, site_name, peer=peer, size=size, detail=protocol))
            for qid, (at, size) in downloads.retrieved.items()
        ]
    conn.executemany(events.INSERT, tracked)
    return fetched, removed


def _add_downloads(conn: sqlite3.Connection, site_id: int, d: Downloads) -> None:
    fetched = max((at for at, _size in d.retrieved.values()), default=None)
    conn.execute(
        "INSERT INTO site_downloads AS d (site_id, sessions, messages, bytes, send_seconds, first_poll_at,"
        " last_poll_at, last_fetch_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (site_id) DO UPDATE SET"
        " sessions = d.sessions + excluded.sessions, messages = d.messages + excluded.messages,"
        " bytes = d.bytes + excluded.bytes, send_seconds = d.send_seconds + excluded.send_seconds,"
        # SQLite's max(a, b) (NULL if either is), and the later of the two ignoring NULL, on both engines
        " last_poll_at = CASE WHEN d.last_poll_at IS NULL OR excluded.last_poll_at IS NULL THEN NULL"
        "  WHEN d.last_poll_at >= excluded.last_poll_at THEN d.last_poll_at ELSE excluded.last_poll_at END,"
        " last_fetch_at = coalesce(CASE WHEN d.last_fetch_at >= excluded.last_fetch_at THEN d.last_fetch_at"
        "  ELSE excluded.last_fetch_at END, d.last_fetch_at, excluded.last_fetch_at)",
        (site_id, d.sessions, d.messages, d.bytes, d.send_seconds, d.polled_at, d.polled_at, fetched),
    )


def _set_session(conn: sql.Connection) -> None:
    """PostgreSQL: the writer's session settings (LOCK_TIMEOUT, IDLE_IN_TRANSACTION_TIMEOUT), and
    a COMMIT that waits for the disk: synchronous_commit 'off' (the database's, the role's or the
    server's default) answered before the WAL was flushed - a crash of PostgreSQL then lost mail
    acknowledged with 250. Any other value (local, remote_write, on, remote_apply) is kept."""
    if sql.dialect(conn) != sql.POSTGRESQL:
        return
    conn.execute("SELECT set_config('lock_timeout', ?, false)", (f"{int(LOCK_TIMEOUT * 1000)}ms",))
    conn.execute(
        "SELECT set_config('idle_in_transaction_session_timeout', ?, false)",
        (f"{int(IDLE_IN_TRANSACTION_TIMEOUT * 1000)}ms",),
    )
    if conn.execute("SHOW synchronous_commit").fetchone()[0] == "off":
        conn.execute("SET synchronous_commit = on")


def _connection_lost(conn: object) -> bool:
    """A PostgreSQL connection that is closed or broken (the server restarted or ended the session)."""
    raw = getattr(conn, "raw", None)
    return raw is not None and bool(raw.closed or raw.broken)


_TRANSIENT_STATES = ("40001", "40P01", "55P03", "57P01", "57P02", "57P03")  # serialization, deadlock, lock, shutdown


def _sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of the original psycopg error (chained: PgConnection maps it to sqlite3's)."""
    state = getattr(exc.__cause__, "sqlstate", None)
    return state if isinstance(state, str) else None


def _transient(exc: BaseException) -> bool:
    """A PostgreSQL failure that running the transaction again can cure (the original psycopg error
    is chained: PgConnection maps it to sqlite3.OperationalError)."""
    state = _sqlstate(exc)
    return state in _TRANSIENT_STATES or (state is not None and state.startswith("08"))  # 08: connection
