# The ledger: an append-only record, outside the index, of what rebuilding the index from the blob
# store must know beyond the blobs' own envelope records (storage/envelope.py):
#   {"c": seq, "a": attempt, "f": [queue IDs], "x": [queue IDs], "at": t}  group commit `seq`
#        (attempt id `a`) is committed; "f" lists its mails stored as files of their own, "x" those
#        it left out (a mailbox had no room: their frames stay in the pack, uncommitted)
#   {"u": uid, "at": t}   the highest mailbox UID issued so far (with each batch of lines)
#   {"d": id, "q": qid, "s": site id, "n": site name, "u": uid, "at": t}   a mailbox entry removed
#        (a receiver's deletion, or its site's removal): rebuild must not bring it back
#   {"o": id, "q": qid, "r": rcpt, "at": t}   an outbound recipient done (relayed, bounced, dropped)
# Files <data>/ledger/<YYYYMMDD>.jsonl (UTC day of writing), one JSON object per line. Only the
# index writer process appends, after the transaction it describes has committed (removals come
# from the index's ledger_pending rows, filled by triggers, so also those the command line makes);
# start-up recovery appends what a crash kept it from writing. Commit lines are written at once
# and made durable lazily (the index holds the truth meanwhile); removals are fdatasynced before
# the writer answers. A torn last line (a crash mid-write) is ignored. Must never be rewritten in
# place: lines are only ever appended (storage/ledger_compact.py replaces whole files by a snapshot).
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import sql
from .files import fsync_dir

LEDGER_DIR = "ledger"


def ledger_dir(data_dir: Path) -> Path:
    return Path(data_dir) / LEDGER_DIR


class LedgerWriter:
    """Appends lines to the current day's file; `sync()` makes them durable."""

    def __init__(self, data_dir: Path):
        self._folder = ledger_dir(data_dir)
        self._fd = -1
        self._day = ""
        self.dirty = False  # lines written since the last sync
        self._torn = False  # a write failed: the file may end in part of a line

    def append(self, docs: list[dict[str, Any]]) -> None:
        """Write lines (not yet durable: see sync). Raises OSError (a full disk)."""
        if not docs:
            return
        day = time.strftime("%Y%m%d", time.gmtime())
        if day != self._day:
            self._open(day)
        data = b"".join(json.dumps(doc, separators=(",", ":")).encode() + b"\n" for doc in docs)
        if self._torn:
            data = b"\n" + data  # end the torn line: it is skipped, not glued to the next one
        self.dirty = True
        self._torn = True
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self._torn = False

    def sync(self) -> None:
        if self.dirty and self._fd >= 0:
            os.fdatasync(self._fd)
            self.dirty = False

    def close(self) -> None:
        if self._fd >= 0:
            try:
                self.sync()
            finally:
                os.close(self._fd)
                self._fd = -1

    def _open(self, day: str) -> None:
        if self._fd >= 0:
            self.sync()
            os.close(self._fd)
            self._fd = -1
        self._folder.mkdir(mode=0o750, exist_ok=True)
        path = self._folder / f"{day}.jsonl"
        new = not path.exists()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        if new:  # the file's own entry must outlive a crash, like its lines
            fsync_dir(self._folder)
        self._day = day


@dataclass
class LedgerState:
    """What the ledger says (all of it, or only its newest file's worth: see `read`)."""

    commits: dict[int, int] = field(default_factory=dict)  # seq -> attempt id
    file_mails: set[str] = field(default_factory=set)  # committed mails stored as files
    left_out: set[str] = field(default_factory=set)  # mails their commit left out
    removed: set[tuple[str, int | str]] = field(default_factory=set)  # (queue ID, site id), (queue ID, site name)
    outbound_done: set[tuple[str, str]] = field(default_factory=set)  # (queue ID, recipient)
    max_seq: int = 0
    max_removal_id: int = 0
    max_uid: int = 0
    lines: int = 0
    torn: int = 0  # unreadable lines (a torn last line is expected after a crash)

    def was_removed(self, queue_id: str, site_id: int | None, site_name: str | None) -> bool:
        """Whether the ledger holds the removal of this mail's entry in this site's mailbox."""
        return (queue_id, site_id) in self.removed or (site_name is not None and (queue_id, site_name) in self.removed)


def files(data_dir: Path) -> list[Path]:
    folder = ledger_dir(data_dir)
    return sorted(folder.glob("*.jsonl")) if folder.is_dir() else []


def every_nodes_files(shared_root: Path) -> list[Path]:
    """The ledger files of every node of a shared blob folder (<root>/<node>/ledger/, see
    storage/blob_layout.py): their lines describe one index (one numbering of group commits and
    removals), so together they say what one node's say for a single hub."""
    return sorted(Path(shared_root).glob(f"*/{LEDGER_DIR}/*.jsonl"), key=lambda p: (p.name, str(p)))


def read(data_dir: Path, newest_only: bool = False, paths: list[Path] | None = None) -> LedgerState:
    """Read the ledger (or the files `paths`); `newest_only`: just the newest files, back to the
    one with a commit line (its highest seq, cheaply, for start-up)."""
    state = LedgerState()
    paths = files(data_dir) if paths is None else paths
    if newest_only:
        for path in reversed(paths):
            _read_file(path, state)
            if state.max_seq:
                break
    else:
        for path in paths:
            _read_file(path, state)
    return state


def _read_file(path: Path, state: LedgerState) -> None:
    with open(path, "rb") as f:
        for line in f:
            try:
                doc = json.loads(line)
                _apply(doc, state)
            except (ValueError, TypeError, KeyError, AttributeError):
                state.torn += 1
                continue
            state.lines += 1


def _apply(doc: dict[str, Any], state: LedgerState) -> None:
    if "c" in doc:
        seq = int(doc["c"])
        state.commits[seq] = int(doc["a"])
        state.file_mails.update(doc.get("f", ()))
        state.left_out.update(doc.get("x", ()))
        state.max_seq = max(state.max_seq, seq)
    elif "d" in doc:
        state.removed.add((str(doc["q"]), int(doc["s"])))
        if doc.get("n"):
            state.removed.add((str(doc["q"]), str(doc["n"])))
        state.max_removal_id = max(state.max_removal_id, int(doc["d"]))
        state.max_uid = max(state.max_uid, int(doc.get("u") or 0))
    elif "o" in doc:
        state.outbound_done.add((str(doc["q"]), str(doc["r"])))
        state.max_removal_id = max(state.max_removal_id, int(doc["o"]))
    elif "u" in doc:
        state.max_uid = max(state.max_uid, int(doc["u"]))
    else:
        raise KeyError("unknown ledger line")


# ---- what the index writer and start-up recovery append -----------------------------------------

PENDING_SQL = (
    "SELECT id, kind, queue_id, site_id, site_name, rcpt, uid, at FROM ledger_pending WHERE id > ? ORDER BY id"
)


def pending_lines(conn: sql.Connection, after: int) -> list[dict[str, Any]]:
    """The index's removals not yet in the ledger (ledger_pending rows with an id above `after`)."""
    docs = []
    for id_, kind, qid, site_id, site_name, rcpt, uid, at in sql.rows(conn, PENDING_SQL, (after,)):
        if kind == "d":
            docs.append({"d": id_, "q": qid, "s": site_id, "n": site_name, "u": uid, "at": at})
        else:
            docs.append({"o": id_, "q": qid, "r": rcpt, "at": at})
    return docs


def catch_up(conn: sql.Connection, writer: LedgerWriter, written: list[int] | None = None) -> int:
    """Append, durably, what the index holds that the ledger may lack: its commits and removals
    not yet pruned (lines the ledger already has come again: harmless, reading is idempotent).
    Returns the highest removal id appended; `written` gets the ids of every removal appended."""
    docs = []
    for seq, attempt, mails in sql.rows(conn, "SELECT seq, attempt, mails FROM commits ORDER BY seq"):
        mails = json.loads(mails) if mails else {}
        docs.append(commit_line(seq, attempt, mails.get("f", []), mails.get("x", [])))
    removals = pending_lines(conn, 0)
    writer.append(docs + removals + [uid_line(conn)])
    writer.sync()
    if written is not None:
        written.extend(int(doc["d"] if "d" in doc else doc["o"]) for doc in removals)
    return max((int(doc["d"] if "d" in doc else doc["o"]) for doc in removals), default=0)


def last_commit(conn: sql.Connection) -> tuple[int, int]:
    """(seq, attempt id) of the index's last group commit, (0, 0) before the first."""
    row = conn.execute("SELECT seq, attempt FROM commits ORDER BY seq DESC LIMIT 1").fetchone()
    return (row[0], row[1]) if row else (0, 0)


# Several nodes writing one index (a shared blob folder, storage/blob_layout.py) number their group
# commits each in a stream of its own: node N's are the numbers k * STREAMS + N, each after its own
# last one, so two index writers never pick the same number, and each node's packed records name
# its own previous commit. One hub (stream None) numbers 1, 2, 3... as ever.
STREAMS = 256


def stream_last(conn: sql.Connection, stream: int | None) -> tuple[int, int]:
    """(seq, attempt) the next group commit of `stream` follows: its own last one still in the
    index; a stream with none (a new node, or an index rebuilt) follows the index's last commit, so
    that it never takes a number in use."""
    if stream is None:
        return last_commit(conn)
    row = conn.execute(
        "SELECT seq, attempt FROM commits WHERE seq % ? = ? ORDER BY seq DESC LIMIT 1", (STREAMS, stream)
    ).fetchone()
    return (row[0], row[1]) if row else last_commit(conn)


def next_seq(last: int, stream: int | None) -> int:
    """The number of the group commit after `last` in `stream` (None: last + 1)."""
    if stream is None:
        return last + 1
    return (last // STREAMS + 1) * STREAMS + stream


def uid_line(conn: sql.Connection) -> dict[str, Any]:
    (uid,) = conn.execute(sql.id_high_water(conn, "mailbox", "uid")).fetchone()
    return {"u": uid, "at": round(time.time(), 3)}


def commit_line(seq: int, attempt: int, file_mails: list[str], left_out: list[str]) -> dict[str, Any]:
    doc: dict[str, Any] = {"c": seq, "a": attempt, "f": file_mails, "at": round(time.time(), 3)}
    if left_out:
        doc["x"] = left_out
    return doc
