# Where this node's blobs live: in its data folder (storage.blobs = "", today's layout), or in a
# SHARED POSIX folder (NFS v4, CephFS) that several nodes, each with its own node-local data folder
# and index writer, all writing one index, store and serve mail from (storage.blobs = PATH).
# Shared layout:
#   <root>/.mailhub-blobs          marker: this folder is a hub's shared blob store (made once)
#   <root>/<node>/<YYYYMMDDHH>/<queue ID>   blob files and packs, exactly today's layout inside
#   <root>/<node>/spool/           the node's spool (it must be on the blobs' file system: a
#                                  spool file becomes a blob by one atomic rename, never by a copy)
#   <root>/<node>/ledger/          the node's ledger lines (storage/ledger.py)
#   <root>/<node>/mailhub.lock     held by the node's serving hub (two nodes with one name: refused)
# In the data folder, blobs -> <root>, spool -> <root>/<node>/spool and ledger -> <root>/<node>/ledger
# are symbolic links (made by the hub at start), so that every path the code and the command-line
# tools build (data_dir/blobs/<blob name>) reaches the shared file; the index records blob names
# with the node part ('<node>/<hour>/<queue ID>'), so any node serves any node's mail by its name.
# What the hub relies on of the shared file system: fsync (of files and folders), atomic rename,
# O_EXCL creation of new files, and flock on the node's lock file (NFS v4 and CephFS have them).
# Dangers designed out here and in the modules named:
# - Names: queue IDs carry a node number from 1 to 255 the index records for the node's name
#   (meta rows 'blob_node:<name>' and 'blob_node_number:<n>', claimed once, never given to another
#   name): two nodes never make the same queue ID, hence never the same blob name (spool.py).
# - A node writes only under <root>/<node>/; start-up recovery (recovery.py) looks only there and
#   at its own spool: a blob of another node renamed into place but not yet committed is never
#   quarantined nor removed by this node.
# - Freeing (store.py, releasable()): a freed blob file of its own (a big mail) is removed by any
#   node, release_freed_after seconds after it saw it freed (on NFS a removed file is gone for a
#   node still sending it: no 'unlinked but open' across clients); a freed PACK of another node is
#   left to that node (it may be its open pack, which it may still append to); freed ranges of any
#   pack are punched by any node (committed bytes, never appended to again). A freed name is never
#   used again (names are queue IDs): unlinking it cannot hit a newer reference.
# - An unmounted or unreachable shared folder is never taken for an empty store: without the marker
#   the hub does not start if the index refers to shared blobs, and a missing blob is not marked
#   damaged while the marker cannot be seen (reads fail cleanly, SMTP answers 451). A folder with a
#   marker but none of the index's newest mails (another cluster's, an old copy) stops the start.
# - Mixed layouts: a shared node on an index with mail of the data-folder layout, a node without
#   storage.blobs on a cluster's index, a data folder of node A started as node B whose folder
#   holds mail (names swapped): each refused at start with one line saying the way out.
# Must never remove a file (the callers do, as said above) nor create the root folder itself.
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import db, envelope, sql
from .errors import StorageError
from .files import fsync_dir
from .folder_lock import DataFolderInUse, lock_data_folder

MARKER = ".mailhub-blobs"
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_HOUR_LIKE = re.compile(r"\d{10}")
LINKED = ("blobs", "spool", "ledger")  # the data folder's entries that point into the shared folder
MAX_NODES = 255  # node numbers 1..255: two hex digits of a queue ID


class SharedBlobsUnavailable(StorageError):
    """The shared blob folder is missing, not mounted, or not the one the index refers to."""


def node_name_problem(name: str) -> str | None:
    """Why `name` cannot name a node (it names its folder), or None."""
    if not NODE_NAME.fullmatch(name) or _HOUR_LIKE.fullmatch(name) or name in ("spool", "ledger"):
        return (
            f"a node name is 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit, and not"
            f" 10 digits (an hour folder's name), got {name!r}"
        )
    return None


def default_node_name() -> str:
    """The host name's first label, made a valid node name."""
    label = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname().split(".")[0])[:63].lstrip("._-")
    return label if label and node_name_problem(label) is None else "node"


@dataclass
class BlobLayout:
    """The layout in use. `prefix` starts every blob name this node makes ("" in a data folder)."""

    data_dir: Path
    root: Path | None = None  # the shared folder, or None
    node: str = ""
    number: int | None = None  # the node number in queue IDs (shared only)
    lock: int | None = None  # fd holding <root>/<node>/mailhub.lock
    _foreign_packs: set[str] = field(default_factory=set)  # other nodes' freed packs seen (left to them)

    @property
    def shared(self) -> bool:
        return self.root is not None

    @property
    def prefix(self) -> str:
        return f"{self.node}/" if self.root is not None else ""

    def available(self) -> bool:
        """Whether the blob store can be seen (always in a data folder; the marker, shared)."""
        return self.root is None or os.path.exists(self.root / MARKER)

    def releasable(self, blobs: list[str]) -> list[str]:
        """Of freed blobs (blob_trash), those this node may unlink now: its own, and other nodes'
        files of one mail each (never appended to); another node's pack stays (it may be the open
        pack that node still appends to: it frees its own). A file already gone is listed (to be
        forgotten). Runs in a worker thread (reads a header per foreign file)."""
        if self.root is None:
            return blobs
        self._foreign_packs.intersection_update(blobs)  # those freed by their node are forgotten
        mine = []
        for blob in blobs:
            if blob.startswith(self.prefix):
                mine.append(blob)
            elif blob not in self._foreign_packs:  # a pack stays a pack: read once
                pack = _is_pack(self.root / blob)
                if pack:
                    self._foreign_packs.add(blob)
                elif pack is not None:
                    mine.append(blob)
        return mine

    def close(self) -> None:
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None


def _is_pack(path: Path) -> bool | None:
    """Whether the file is a pack; False if it is gone, None if it cannot be read now (left alone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        return envelope.is_pack(fd)
    except OSError:
        return None
    finally:
        os.close(fd)


def prepare(
    data_dir: Path, shared: Path | None, node: str, connect: Callable[[], sql.Connection] | None = None
) -> BlobLayout:
    """Check the layout before start-up recovery (the data folder's lock is held). Shared: the
    root must hold the marker (made here if the index refers to no shared blob yet), the node's
    folders and lock are taken, the data folder's links made, and the node number read from or
    claimed in the index (connect() opens it). Raises SharedBlobsUnavailable, StorageError."""
    data_dir = Path(data_dir)
    if shared is None:
        _refuse_links(data_dir)
        return BlobLayout(data_dir)
    if node_name_problem(node) is not None:
        raise StorageError(f"node.name: {node_name_problem(node)}")
    root = Path(shared).absolute()
    if not root.is_dir():
        raise SharedBlobsUnavailable(
            f"storage.blobs {root} is not a folder (is the shared file system mounted?); the hub never"
            " creates it: mount it, or create it once for a new cluster"
        )
    conn = (connect or (lambda: db.connect(data_dir)))()
    try:
        _refuse_own_layout_mail(conn, data_dir)
        if not (root / MARKER).exists():
            _mark_new_store(conn, root)
        else:
            _refuse_foreign_store(conn, root)
        number = register_node(conn, node)
    finally:
        conn.close()
    own = root / node
    for folder in (own, own / "spool", own / "ledger"):
        if not folder.is_dir():
            folder.mkdir(mode=0o750, exist_ok=True)
            fsync_dir(folder.parent)
    try:
        lock = lock_data_folder(own)
    except DataFolderInUse:
        raise StorageError(
            f"the node folder {own} is in use by another hub: node.name {node!r} must be unique in the cluster"
            " (after a node's machine died, its lock on a shared file system stays until the file server"
            " ends its lease: about 90 s on NFS v4 - try again then)"
        ) from None
    try:
        _refuse_taking_over(data_dir, own, node)
        for name, target in (("blobs", root), ("spool", own / "spool"), ("ledger", own / "ledger")):
            _link(data_dir / name, target)
    except BaseException:
        os.close(lock)
        raise
    return BlobLayout(data_dir, root, node, number, lock)


def _refuse_taking_over(data_dir: Path, own: Path, node: str) -> None:
    """A data folder that was another node's (its links point to <root>/<previous>/) given the name
    of a node whose folder holds mail: two nodes' names swapped, most likely. With an index of its
    own (SQLite) its start-up recovery would take that node's committed mail for orphans of its own
    and move it to its quarantine. A renamed node takes a name no node has used (an empty folder)."""
    previous = own_node(data_dir)
    if previous is None or previous == node:
        return
    if any(_HOUR_LIKE.fullmatch(entry.name) for entry in os.scandir(own)):
        raise StorageError(
            f"{data_dir} was node {previous!r} (its spool links to {os.readlink(Path(data_dir) / 'spool')}), now"
            f" node.name is {node!r}, whose folder {own} holds mail: were two nodes' names swapped? Set"
            f" node.name back to {previous!r} (a renamed node takes a name no node has used)"
        )


def _refuse_own_layout_mail(conn: sql.Connection, data_dir: Path) -> None:
    """The index still holds mail of the data-folder layout ('<hour>/<queue ID>', a hub that ran
    with storage.blobs empty): on a shared folder its blobs would be looked for under the shared
    root, found missing and marked damaged (gateways told to delete them). Nothing is moved."""
    row = conn.execute("SELECT blob FROM messages WHERE blob NOT LIKE '%/%/%' LIMIT 1").fetchone()
    if row is not None:
        raise StorageError(
            f"the index holds mail of the data-folder layout (e.g. {row[0]} in {Path(data_dir) / 'blobs'}):"
            " storage.blobs can be set only on an index without it - set storage.blobs back to empty until"
            " that mail is fetched, deleted or expired (docs/storage.md, a shared blob folder)"
        )


def _mark_new_store(conn: sql.Connection, root: Path) -> None:
    """No marker: a new shared store, unless the index already refers to shared blobs (then the
    folder is most likely not mounted: starting would show every mailbox's mail as missing)."""
    row = conn.execute("SELECT blob FROM messages WHERE blob LIKE '%/%/%' LIMIT 1").fetchone()
    if row is not None:
        nodes = sorted(e.name for e in os.scandir(root) if e.is_dir() and (Path(e.path) / "spool").is_dir())
        if nodes:  # the node folders are there: it is mounted, the marker was removed
            raise SharedBlobsUnavailable(
                f"storage.blobs {root} has no {MARKER} but holds node folders ({', '.join(nodes[:5])}) and the"
                f" index refers to shared blobs (e.g. {row[0]}): if this is the mounted shared folder, its"
                f" marker was removed - put it back with: touch {root / MARKER}"
            )
        raise SharedBlobsUnavailable(
            f"storage.blobs {root} has no {MARKER} but the index refers to shared blobs (e.g. {row[0]}):"
            " is the shared file system mounted?"
        )
    temporary = root / f"{MARKER}.{os.getpid()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        os.write(fd, b"DICOM Mail Hub shared blob folder: <node>/<hour>/<queue ID> (docs/storage.md)\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temporary, root / MARKER)
    fsync_dir(root)


SAMPLE = 20  # the index's newest mails looked for in the shared folder at start


def _refuse_foreign_store(conn: sql.Connection, root: Path) -> None:
    """A marker, but none of the index's newest mails in the folder: another cluster's folder, an
    old copy, a stale marker on the mount point. A node with no mail of its own yet (a new one)
    would start and mark every mail it serves damaged (gateways told to delete it); start-up
    recovery's 'most blobs missing' looks at the node's own blobs only."""
    rows = conn.execute(
        "SELECT blob FROM messages WHERE blob LIKE '%/%/%' AND queue_id NOT IN (SELECT queue_id FROM damaged)"
        " ORDER BY queue_id DESC LIMIT ?",
        (SAMPLE,),
    ).fetchall()
    if len(rows) >= 5 and not any(os.path.exists(root / blob) for (blob,) in rows):
        raise SharedBlobsUnavailable(
            f"storage.blobs {root} holds none of the index's {len(rows)} newest mails (e.g. {rows[0][0]}):"
            " is it the cluster's shared folder, and is the shared file system mounted there? (If those"
            " mails are lost, `mailhub storage verify` on a running node marks them damaged.)"
        )


class _NamedMeanwhile(Exception):
    """Another hub claimed a number for the same name while this one claimed one."""


def register_node(conn: sql.Connection, node: str) -> int:
    """The node's number (1..255) recorded in the index, claimed now if the name has none: the
    claim row's key is unique, so two nodes starting at once never get the same number."""
    key = f"blob_node:{node}"
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    if row is not None:
        return int(row[0])
    try:
        with db.transaction(conn):
            taken = {
                int(k.rpartition(":")[2])
                for (k,) in conn.execute("SELECT key FROM meta WHERE key LIKE 'blob_node_number:%'").fetchall()
            }
            for number in range(1, MAX_NODES + 1):
                if number in taken:
                    continue
                claimed = conn.execute(
                    "INSERT INTO meta (key, value) VALUES (?, 0) ON CONFLICT (key) DO NOTHING RETURNING key",
                    (f"blob_node_number:{number}",),
                ).fetchone()
                if claimed is not None:
                    named = conn.execute(
                        "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING RETURNING key",
                        (key, number),
                    ).fetchone()
                    if named is None:  # a hub with this name claimed one meanwhile: this claim is undone
                        raise _NamedMeanwhile
                    return number
    except _NamedMeanwhile:
        (value,) = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(value)
    raise StorageError(f"no node number left for node {node!r}: {MAX_NODES} node names are recorded in the index")


def _link(path: Path, target: Path) -> None:
    """Make `path` a symbolic link to `target`: an empty folder is replaced, a folder with files is
    refused (it holds this node's data-folder layout: nothing is moved by the hub)."""
    if path.is_symlink():
        if os.readlink(path) == str(target):
            return
    elif path.is_dir():
        try:
            path.rmdir()
        except OSError:
            raise StorageError(
                f"{path} holds files of the data-folder layout: storage.blobs cannot be used over them - set"
                " storage.blobs back to empty; only once the index holds no mail of this layout (every mail"
                " fetched, deleted or expired) move blobs/, spool/ and ledger/ away (docs/storage.md)"
            ) from None
    elif path.exists():
        raise StorageError(f"{path} is in the way of the link to {target}: move it away")
    temporary = path.with_name(f".{path.name}.link")
    if temporary.is_symlink():
        temporary.unlink()
    os.symlink(target, temporary)
    os.rename(temporary, path)  # replaces an old link in one step
    fsync_dir(path.parent)


def refuse_cluster_index(conn: sql.Connection) -> None:
    """storage.blobs is empty (and the mail is not on object storage): the index must not be a
    cluster's whose mail is in a shared blob folder. This node would serve none of that mail (looked
    for in its data folder: missing, marked damaged), take mail no other node could serve, and
    number its group commits over the other nodes' (storage/ledger.py streams)."""
    if conn.execute("SELECT 1 FROM meta WHERE key LIKE 'blob_node:%' LIMIT 1").fetchone() is None:
        return  # no node ever ran on a shared folder with this index: nothing to scan
    row = conn.execute("SELECT blob FROM messages WHERE blob LIKE '%/%/%' LIMIT 1").fetchone()
    if row is not None:
        raise StorageError(
            f"storage.blobs is empty but the index holds mail of a shared blob folder (e.g. {row[0]}): set"
            " storage.blobs to the cluster's shared folder (docs/storage.md, a shared blob folder)"
        )


def _refuse_links(data_dir: Path) -> None:
    """storage.blobs is empty: the data folder must not still point into a shared folder."""
    blobs = data_dir / "blobs"
    if not blobs.is_symlink():
        return
    # the links this module makes, or a marker there; an operator's own link (blobs/ on another
    # disk of a single hub) is left alone
    if own_node(data_dir) is not None or (blobs / MARKER).exists():
        raise StorageError(
            f"storage.blobs is empty but {blobs} links to the shared blob folder {os.readlink(blobs)}: set"
            " storage.blobs to it (this node's mail is there)"
        )


def shared_root(data_dir: Path) -> Path | None:
    """The shared folder a data folder links to (for the command-line tools), or None."""
    blobs = Path(data_dir) / "blobs"
    return Path(os.readlink(blobs)) if blobs.is_symlink() and (blobs / MARKER).exists() else None


def own_node(data_dir: Path) -> str | None:
    """This data folder's node name in a shared folder (from the links prepare() makes: spool ->
    <root>/<node>/spool, blobs -> <root>), or None (an operator's own links are not a node's)."""
    spool, blobs = Path(data_dir) / "spool", Path(data_dir) / "blobs"
    if not (spool.is_symlink() and blobs.is_symlink()):
        return None
    target = Path(os.readlink(spool))
    return target.parent.name if target.name == "spool" and target.parent.parent == Path(os.readlink(blobs)) else None
