# Keeps an in-memory copy of part of the index current for the running hub (the sites of
# SiteCache, the keys of directory.KeyRing): loads it once when made, then a thread of its own
# checks a version counter (moved by the triggers of schema.sql when the command line changes the
# rows) every `interval` seconds on a connection of its own and loads again when it moved. The
# event loop reads the copy only, so SQLite never holds it up. Its connections come from `connect`
# (default: the data folder's SQLite index; any storage.sql.Connection, e.g. a PgConnection).
# Must never: touch the event loop, stop watching after an index error (logged once, retried), or
# hand out a half-loaded copy (`load` builds the new copy and swaps it in with one assignment).
import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

from . import db, sql
from .errors import StorageError

log = logging.getLogger("mailhub.storage")


class IndexWatcher:
    def __init__(
        self,
        data_dir: Path,
        what: str,
        version: Callable[[sql.Connection], int],
        load: Callable[[sql.Connection], None],
        interval: float = 0.5,
        connect: Callable[[], sql.Connection] | None = None,
    ):
        """Load now (an unreadable or damaged index raises here, to the caller), then watch."""
        self._what, self._version_of, self._load = what, version, load
        self._connect: Callable[[], sql.Connection] = connect or (lambda: db.connect(data_dir))
        self.interval = interval
        conn = self._connect()
        try:
            self._version = -1
            self._reload(conn)
        finally:
            conn.close()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"watch-{what}", daemon=True)
        self._thread.start()

    @property
    def version(self) -> int:
        """The version counter of the copy loaded now."""
        return self._version

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _reload(self, conn: sql.Connection) -> None:
        version = self._version_of(conn)
        if version != self._version:
            self._load(conn)
            self._version = version

    def _watch(self) -> None:
        conn: sql.Connection | None = None
        failing = False
        try:
            while not self._stop.wait(self.interval):
                try:
                    if conn is None:
                        conn = self._connect()
                    self._reload(conn)
                except (sqlite3.Error, OSError, StorageError) as exc:
                    if not failing:
                        log.warning(
                            "%s not reloaded from the index (retrying every %.1f s): %s", self._what, self.interval, exc
                        )
                    failing = True
                    if conn is not None:
                        conn.close()
                        conn = None
                else:
                    if failing:
                        log.info("%s reloaded from the index again", self._what)
                    failing = False
        finally:
            if conn is not None:
                conn.close()
