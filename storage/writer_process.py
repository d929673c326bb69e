# The index writer process: runs storage.index_writer.IndexWriter in a child process and calls
# it from the event loop. A process, not a thread: a thread shares the GIL with the event loop,
# and each call that lets go of the GIL (a write, an fdatasync, every SQLite step) then waits to
# get it back while the loop runs (up to the 5 ms switch interval); measured, a group commit of
# five 10 KB mails took 4.3 ms on the writer thread against about 2 ms in a process of its own.
# The writer is forked by this hub process's launcher (storage/writer_launcher.py), which has the
# writer's code imported already. Requests go over a socket pair, one at a time in order (wire
# format: storage/writer_child.py). Message bytes never go there (the hub writes them:
# storage/store.py); bytes a request may carry (wrapped with `out_of_band`) would follow it raw, as
# pickle protocol 5 buffers. The writer dies with the launcher, which dies with the hub, and ends
# when the socket closes; both ignore SIGINT and SIGTERM so that a signal to the whole process group
# leaves the hub's graceful shutdown its commits.
import asyncio
import collections
import contextlib
import logging
import os
import pickle
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import WriterDied
from .index_writer import IndexWriter
from .writer_child import INDEX_URL_VARIABLE, LENGTH, encode_request, out_of_band
from .writer_launcher import LAUNCHER, Launched

__all__ = ["WriterProcess", "out_of_band"]
log = logging.getLogger("mailhub.storage")
_SOCKET_BUFFER = 4 * 1024 * 1024


class WriterProcess:
    """The parent's side: `await start()`, `await call(IndexWriter.method, *args)`, `await close()`.
    A writer that died is started again by the next call (what it was doing fails with StorageError)."""

    def __init__(self, data_dir: Path, release_freed_after: float, index_url: str = ""):
        self._index_url = index_url  # "" (SQLite in data_dir) or PostgreSQL's, given in the environment
        self._args = [str(data_dir), repr(release_freed_after)]
        self._launched: Launched | None = None
        self._stream: asyncio.StreamWriter | None = None
        self._waiting: collections.deque[asyncio.Future[tuple[bool, Any]]] = collections.deque()
        self._reading: asyncio.Task[None] | None = None
        self._restarting: asyncio.Future[None] | None = None  # one restart, however many callers notice
        self.node = ""  # this hub node's name, given to each writer it starts (cluster events name it)
        self.commit_stream: int | None = None  # its group commits' stream (several nodes on one index)

    @property
    def pid(self) -> int | None:
        """The writer process's (the last one started)."""
        return self._launched.pid if self._launched is not None else None

    async def start(self) -> None:
        ours, theirs = socket.socketpair()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
        environment = _child_environment(self._index_url)
        launching = asyncio.ensure_future(asyncio.to_thread(LAUNCHER.launch, self._args, environment, theirs))
        try:  # (the launch closes `theirs`)
            self._launched = await asyncio.shield(launching)
        except BaseException:  # cancelled, say: a writer launched all the same ends (its socket
            ours.close()  # closes), and is waited for, as close() does, before another may start
            with contextlib.suppress(Exception):
                await asyncio.wrap_future((await launching).ended)
            raise
        reader, self._stream = await asyncio.open_unix_connection(sock=ours, limit=1 << 20)
        self._reading = asyncio.create_task(self._read_replies(reader))
        await self.call(IndexWriter.ready)  # the child opened the index
        if self.node:
            await self.call(IndexWriter.set_node, self.node)
        if self.commit_stream is not None:
            await self.call(IndexWriter.set_commit_stream, self.commit_stream)

    async def call(self, method: Callable[..., object], *args: object) -> Any:
        """method(index writer, *args) run in the writer process; its result (pickled back)."""
        if self._reading is None or self._reading.done():
            if self._restarting is None or self._restarting.done():
                self._restarting = asyncio.ensure_future(self._restart())
            await asyncio.shield(self._restarting)
        request = encode_request(method, args)  # raises here if it does not pickle
        done = asyncio.get_running_loop().create_future()
        self._waiting.append(done)
        assert self._stream is not None  # started
        self._stream.writelines(request)
        ok, result = await done
        if not ok:
            raise result
        return result

    async def _restart(self) -> None:
        if self._launched is not None:
            status = await asyncio.wrap_future(self._launched.ended)
            log.error("index writer process ended (status %s); starting a new one", status)
            if self._stream is not None:
                self._stream.close()
        await self.start()

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                header = await reader.readexactly(LENGTH.size)
                reply = pickle.loads(await reader.readexactly(LENGTH.unpack(header)[0]))
                done = self._waiting.popleft()
                if not done.done():
                    done.set_result(reply)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            failure = WriterDied("index writer process ended")
            while self._waiting:
                done = self._waiting.popleft()
                if not done.done():
                    done.set_result((False, failure))

    async def close(self) -> None:
        """Let the child finish what it was asked, then end it."""
        if self._stream is None:
            return
        self._stream.close()
        self._stream = None
        if self._reading is not None:
            await self._reading
        launched, self._launched = self._launched, None
        if launched is not None:
            await asyncio.wrap_future(launched.ended)


def _child_environment(index_url: str = "") -> dict[str, str]:
    """The hub's environment, with this code's folder first on the path: the writer runs the very
    `storage` package the hub runs (installed or not), in the hub's working folder. A PostgreSQL
    index's URL goes in the environment (INDEX_URL_VARIABLE), never on the command line, which
    every local user can read (`ps`): it may hold a password."""
    root = str(Path(__file__).resolve().parent.parent)
    paths = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    env.pop(INDEX_URL_VARIABLE, None)
    if index_url:
        env[INDEX_URL_VARIABLE] = index_url
    return env
