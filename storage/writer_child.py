# The index writer process's side (see storage/writer_process.py for the hub's): read requests
# from the socket, run them on the IndexWriter one at a time, reply. The wire format is here too:
# a request is two 8-byte counts (pickle length, number of raw buffers), each buffer's length, the
# pickle (IndexWriter method, args; protocol 5) and the raw buffers; a reply is an 8-byte length
# and the pickle of (True, result) or (False, exception). Imports nothing of the event-loop side.
import ctypes
import os
import pickle
import select
import signal
import socket
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import StorageError
from .index_writer import IndexWriter

LENGTH = struct.Struct(">Q")
IDLE_SECONDS = 0.05  # no request for this long after a commit: its ledger line is made durable
_PR_SET_PDEATHSIG = 1
INDEX_URL_VARIABLE = "MAILHUB_WRITER_INDEX_URL"  # a PostgreSQL index's URL, from the hub (never in argv)


def out_of_band(chunks: Iterable[bytes]) -> list[pickle.PickleBuffer]:
    """Bytes to send to the writer raw, after the request (it gets them as bytearrays)."""
    return [pickle.PickleBuffer(chunk) for chunk in chunks]


def frame(obj: object) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return LENGTH.pack(len(data)) + data


def encode_request(method: Callable[..., object], args: tuple[object, ...]) -> list[bytes | memoryview]:
    """[lengths, pickle, *raw buffers]: the pickle's length, the number of buffers and each one's."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps((method, args), protocol=5, buffer_callback=buffers.append)
    raw = [buffer.raw() for buffer in buffers]
    lengths = [len(data), len(raw)] + [view.nbytes for view in raw]
    return [struct.pack(f">{len(lengths)}Q", *lengths), data, *raw]


def _read_request(reader: "_Reader") -> tuple[bytes, list[bytearray]] | None:
    """The pickle and its raw buffers; None at the end of the stream."""
    head = reader.read(16)
    if len(head) < 16:
        return None
    size, count = struct.unpack(">2Q", head)
    lengths = struct.unpack(f">{count}Q", reader.read(8 * count))
    data = reader.read(size)
    buffers = []
    for length in lengths:
        buffer = bytearray(length)
        if reader.readinto(buffer) < length:
            return None
        buffers.append(buffer)
    return (data, buffers) if len(data) == size else None


class _Reader:
    """Reads requests from the socket into one reused buffer; knows whether a request is already
    buffered (the idle test). A message buffer is filled straight from the socket, past what the
    buffer holds."""

    def __init__(self, sock: socket.socket, size: int = 256 * 1024):
        self._sock = sock
        self._buffer = bytearray(size)
        self._start = self._end = 0  # the unread bytes are _buffer[_start:_end]

    def idle(self, timeout: float) -> bool:
        """No request buffered, and none arrives within `timeout` seconds."""
        return self._start == self._end and not select.select([self._sock], [], [], timeout)[0]

    def read(self, size: int) -> bytes:
        if self._end - self._start < size:
            self._fill(size)
        end = min(self._start + size, self._end)
        data = bytes(memoryview(self._buffer)[self._start : end])
        self._start = end
        return data

    def _fill(self, size: int) -> None:
        """At least `size` unread bytes in the buffer, unless the stream ends."""
        unread = self._end - self._start
        if size > len(self._buffer):
            self._buffer.extend(bytes(size - len(self._buffer)))
        if self._start + size > len(self._buffer):  # move the unread bytes to the front
            self._buffer[:unread] = self._buffer[self._start : self._end]
            self._start, self._end = 0, unread
        view = memoryview(self._buffer)
        while self._end - self._start < size:
            got = self._sock.recv_into(view[self._end :])
            if not got:
                break
            self._end += got

    def readinto(self, target: bytearray) -> int:
        view = memoryview(target)
        filled = min(self._end - self._start, len(view))
        view[:filled] = memoryview(self._buffer)[self._start : self._start + filled]
        self._start += filled
        while filled < len(view):
            got = self._sock.recv_into(view[filled:])
            if not got:
                break
            filled += got
        return filled


def _serve(sock: socket.socket, writer: IndexWriter) -> None:
    reader = _Reader(sock)
    while True:
        if writer.ledger.dirty:  # commit lines to make durable: now if idle, else at most each second
            writer.sync_ledger(idle=reader.idle(IDLE_SECONDS))
        request = _read_request(reader)
        if request is None:
            return  # the hub closed the socket (or died)
        try:
            method, args = pickle.loads(request[0], buffers=request[1])
            writer.reconnect_if_lost()  # PostgreSQL: a server restarted meanwhile is used again
            data = frame((True, method(writer, *args)))
        except Exception as exc:  # handed back to the caller
            data = frame((False, exc))
            try:
                pickle.loads(data[LENGTH.size :])
            except Exception:  # an exception that does not travel
                data = frame((False, StorageError(f"{type(exc).__name__}: {exc}")))
        try:
            sock.sendall(data)
        except OSError:
            return  # the hub is gone


def main(argv: list[str]) -> None:
    data_dir, release_freed_after, parent, fd = argv
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(parent):
        return  # the launcher (storage/launcher_child.py) died before the line above
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=int(fd))
    writer = IndexWriter(Path(data_dir), float(release_freed_after), os.environ.pop(INDEX_URL_VARIABLE, ""))
    try:
        _serve(sock, writer)
    finally:
        writer.close()
