# The control socket: how the command line talks to the running hub. The hub listens on the Unix
# socket <data_dir>/control.sock (mode 0600, removed at shutdown); each request and each answer is
# one JSON object on one line: {"cmd": "NAME", ...} -> {"ok": true, ...} or {"ok": false,
# "error": "one line"}. Commands are registered by name (ControlServer.register) by whichever part
# of the hub owns the state; request() is the client side the CLI uses.
# Must never: let a request's content raise out of a connection, answer more than one request at a
# time per connection, read an unbounded line, or leave the socket file behind after a clean stop.
import asyncio
import errno
import inspect
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

log = logging.getLogger("mailhub.control")

SOCKET_NAME = "control.sock"
MAX_LINE = 64 * 1024  # bytes of one request line
MAX_CONNECTIONS = 16  # control clients served at once (the socket is the hub owner's only)
REQUEST_TIMEOUT = 30.0  # seconds a control client may take to send its request line
_SUN_PATH_MAX = 107  # bytes of a Unix socket path (sun_path less its NUL)

Handler = Callable[[dict], "dict | Awaitable[dict]"]


class ControlError(Exception):
    """The hub could not be asked or refused the request; the message is one line for the operator."""


def socket_path(data_dir) -> Path:
    return Path(data_dir) / SOCKET_NAME


class ControlServer:
    """The hub's side: answers requests on <data_dir>/control.sock with the registered handlers.
    A handler takes the request (a dict) and returns the answer's fields (a dict, or an awaitable
    of one); it raises ControlError for a refusal the operator should read."""

    def __init__(self, data_dir) -> None:
        self.path = socket_path(data_dir)
        self._handlers: dict[str, Handler] = {"help": self._help}
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task] = set()

    def register(self, cmd: str, handler: Handler) -> None:
        if cmd in self._handlers:
            raise ValueError(f"control command {cmd!r} is registered twice")
        self._handlers[cmd] = handler

    async def start(self) -> None:
        """Listen (replacing a socket file a killed hub left: the data folder's lock says no other
        hub serves this folder)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.fchmod(sock.fileno(), 0o600)  # Linux: the file bind() makes gets the socket's mode
            with _short_path(self.path) as path:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                sock.bind(path)
            os.chmod(self.path, 0o600)
            self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_LINE)
        except BaseException:
            sock.close()
            raise
        log.info("control socket %s", self.path)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._clients):
            task.cancel()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        self._server = None

    async def answer(self, request: dict) -> dict:
        """The answer to one decoded request (also what a test may call without a socket)."""
        cmd = request.get("cmd") if isinstance(request, dict) else None
        if not isinstance(cmd, str):
            return {"ok": False, "error": 'a request is a JSON object with a "cmd" string'}
        handler = self._handlers.get(cmd)
        if handler is None:
            return {"ok": False, "error": f"unknown command {cmd[:80]!r} (known: {', '.join(sorted(self._handlers))})"}
        try:
            answer = handler(request)
            result = await answer if inspect.isawaitable(answer) else answer
        except ControlError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:
            log.exception("control command %s failed", cmd)
            return {"ok": False, "error": f"internal error in {cmd}: {type(exc).__name__}: {exc}"}
        return {"ok": True, **(result or {})}

    def _help(self, _request: dict) -> dict:
        return {"commands": sorted(self._handlers), "pid": os.getpid()}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None, "asyncio runs each connection's callback as a task"
        if len(self._clients) >= MAX_CONNECTIONS:
            writer.write(_encode({"ok": False, "error": "too many control connections; try again"}))
            writer.close()
            return
        self._clients.add(task)
        try:
            while True:
                try:
                    async with asyncio.timeout(REQUEST_TIMEOUT):
                        line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(_encode({"ok": False, "error": f"request longer than {MAX_LINE} bytes"}))
                    break
                if not line:
                    break
                try:
                    request = json.loads(line)
                except (ValueError, UnicodeDecodeError) as exc:
                    answer = {"ok": False, "error": f"not a JSON object: {exc}"}
                else:
                    if isinstance(request, dict):  # what the kernel says, never what the client says
                        request[PEER_UID] = _peer_uid(writer)
                    answer = await self.answer(request)
                writer.write(_encode(answer))
                await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(task)
            writer.close()


PEER_UID = "peer_uid"  # set in each request from the socket's peer credentials (SO_PEERCRED)


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    """The user ID of the process at the other end of the control socket (Linux SO_PEERCRED)."""
    sock = writer.get_extra_info("socket")
    option = getattr(socket, "SO_PEERCRED", None)
    if sock is None or option is None:
        return None
    try:
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i")))
    except OSError:
        return None
    return uid


def request(data_dir, cmd: str, timeout: float = 30.0, **fields) -> dict:
    """Ask the running hub; returns the answer's fields (without "ok"). Raises ControlError with
    one line for the operator when the hub is not running, does not answer, or refuses."""
    path = socket_path(data_dir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with _short_path(path) as short:
            sock.connect(short)
        sock.sendall(_encode({"cmd": cmd, **fields}))
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise ControlError(
            f"the hub is not running (no answer on {path}: {exc.strerror}); start it with: mailhub serve"
        ) from None
    except PermissionError:
        raise ControlError(f"no permission to use {path}; run this as the user the hub runs as") from None
    except TimeoutError:
        raise ControlError(f"the hub did not answer on {path} within {timeout:.0f} s") from None
    except OSError as exc:
        if exc.errno == errno.ENOTSOCK:
            raise ControlError(f"{path} is not a socket; is the data folder right?") from None
        raise ControlError(f"cannot reach the hub on {path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        answer = json.loads(data)
    except ValueError:
        raise ControlError(f"the hub closed {path} without an answer") from None
    if not isinstance(answer, dict):
        raise ControlError(f"unexpected answer from the hub: {str(answer)[:200]}")
    if not answer.pop("ok", False):
        raise ControlError(str(answer.get("error", "the hub refused the request")))
    return answer


def _encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class _short_path:
    """A path for bind()/connect() that fits sun_path: the path itself when short enough, else the
    same file through /proc/self/fd/N of its folder (test folders can be deep)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> str:
        if len(os.fsencode(self.path)) <= _SUN_PATH_MAX:
            return str(self.path)
        self.fd = os.open(self.path.parent, os.O_PATH | os.O_DIRECTORY)
        return f"/proc/self/fd/{self.fd}/{self.path.name}"

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)
