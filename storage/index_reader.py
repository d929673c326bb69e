# The event loop's reads of the index (Storage: mailbox listings, UIDNEXT, structures, the quotas'
# usage snapshot), on either engine, without blocking the loop: SQLite through aiosqlite (its own
# thread, as before); PostgreSQL through a few read-only PgConnections used from a small thread pool
# (one statement per borrowed connection; a connection that failed is dropped and the next read
# connects again, so a restarted server is used again without a restart of the hub).
# Must never write (the index writer process does every write), nor hold a whole large result that
# the caller did not ask for.
import asyncio
import concurrent.futures
import sqlite3
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import aiosqlite

from . import db
from .errors import StorageError
from .index import IndexLocation
from .sql import Connection

POOL_SIZE = 4  # PostgreSQL: connections (and threads) at most for the event loop's reads
# PostgreSQL: a read taking longer is cancelled by the server (the session gets a temporary error):
# a read stuck behind a lock (an ALTER TABLE, a VACUUM FULL run by hand) or a runaway query held a
# pool thread forever, and with POOL_SIZE of them every session's reads waited behind them
STATEMENT_TIMEOUT = 30.0
# PostgreSQL: a read that has not got its answer this long after it was asked (all POOL_SIZE
# connections busy with slow reads, many sessions queued behind them) fails with one line, a
# temporary error for its session, instead of queueing without end
READ_WAIT = 60.0


class AsyncReader(Protocol):
    async def fetchall(self, sql: str, parameters: Sequence[Any] = ()) -> list[Any]: ...

    async def close(self) -> None: ...


async def open_reader(location: IndexLocation) -> AsyncReader:
    """The event loop's read access to the index at `location`."""
    if location.is_postgresql:
        reader = _PgReader(location)
        await reader.fetchall("SELECT 1")  # fails here, with one line, if the server cannot be reached
        return reader
    conn = await aiosqlite.connect(db.index_path(location.data_dir), isolation_level=None)
    for pragma in db.pragma_statements():
        await conn.execute(pragma)
    return _SqliteReader(conn)


class _SqliteReader:
    def __init__(self, conn: aiosqlite.Connection):
        self._conn = conn

    async def fetchall(self, sql: str, parameters: Sequence[Any] = ()) -> list[Any]:
        return list(await self._conn.execute_fetchall(sql, parameters))

    async def close(self) -> None:
        await self._conn.close()


class _PgReader:
    def __init__(self, location: IndexLocation, size: int = POOL_SIZE):
        self._location = location
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=size, thread_name_prefix="index-read")
        self._size = size
        self._idle: list[Any] = []  # PgConnections not in use
        self._lock = threading.Lock()
        self._closed = False

    async def fetchall(self, sql: str, parameters: Sequence[Any] = ()) -> list[Any]:
        read = asyncio.get_running_loop().run_in_executor(self._executor, self._fetchall, sql, parameters)
        # (a read still queued is taken off the queue; one running ends within STATEMENT_TIMEOUT).
        # asyncio.timeout, not wait_for: Python 3.11's wait_for returns a read that finished just as
        # the task was cancelled and drops the cancellation (a leader's scrub cancelled at shutdown
        # then slept on, and the hub's stop waited for it for ever).
        try:
            async with asyncio.timeout(READ_WAIT):
                return await read
        except TimeoutError:
            raise StorageError(
                f"index: no answer within {READ_WAIT:g} s: all {self._size} read connections to"
                f" {self._location.where()} are busy with slow reads"
            ) from None

    def _fetchall(self, sql: str, parameters: Sequence[Any]) -> list[Any]:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        fresh = conn is None
        if conn is None:
            conn = self._connect()
        try:
            rows = conn.execute(sql, parameters).fetchall()
        except sqlite3.Error:
            conn.close()  # broken, or in a failed state: the next read connects anew
            if fresh or not getattr(getattr(conn, "raw", None), "broken", False):
                raise
            # a pooled connection the server ended meanwhile (a restart, pg_terminate_backend): the
            # read is tried once more on a new one (reads change nothing)
            conn = self._connect()
            try:
                rows = conn.execute(sql, parameters).fetchall()
            except sqlite3.Error:
                conn.close()
                raise
        with self._lock:
            if not self._closed:
                self._idle.append(conn)
                return rows
        conn.close()
        return rows

    def _connect(self) -> Connection:
        conn = self._location.connect_readonly(any_thread=True)
        try:
            conn.execute("SELECT set_config('statement_timeout', ?, false)", (f"{int(STATEMENT_TIMEOUT * 1000)}ms",))
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    async def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)
