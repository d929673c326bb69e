# The control socket (mailhub/control.py): the hub's side in-process on a real Unix socket, the
# client helper the CLI uses, and the socket of a running hub (mode 0600, removed at shutdown).
import asyncio
import json
import os
import socket
import stat
import threading

import pytest

from mailhub.control import MAX_LINE, PEER_UID, ControlError, ControlServer, request, socket_path


class RunningControl:
    """A ControlServer on its own event loop in a thread, so that the blocking client can ask it."""

    def __init__(self, data_dir, handlers: dict):
        self.server = ControlServer(data_dir)
        for name, handler in handlers.items():
            self.server.register(name, handler)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)

    def close(self):
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def control(tmp_path):
    started = []

    def start(handlers: dict, data_dir=tmp_path):
        running = RunningControl(data_dir, handlers)
        started.append(running)
        return running

    yield start
    for running in started:
        running.close()


def _raw(path, payload: bytes) -> list[dict]:
    """Send raw bytes, read answer lines until the server closes or 2 s pass."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(path))
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    return [json.loads(line) for line in data.splitlines()]


def test_request_and_answer(control, tmp_path):
    async def slow_echo(req):
        await asyncio.sleep(0.01)  # a handler that awaits: the behaviour under test
        return {"echo": req.get("value")}

    control({"echo": slow_echo, "count": lambda req: {"n": 3}})
    assert request(tmp_path, "echo", value=[1, "two"]) == {"echo": [1, "two"]}
    assert request(tmp_path, "count") == {"n": 3}
    helped = request(tmp_path, "help")
    assert helped["commands"] == ["count", "echo", "help"] and helped["pid"] == os.getpid()
    mode = stat.S_IMODE(os.stat(socket_path(tmp_path)).st_mode)
    assert stat.S_ISSOCK(os.stat(socket_path(tmp_path)).st_mode) and mode == 0o600


def test_refusals_are_one_line_errors(control, tmp_path):
    def refuse(req):
        raise ControlError("no such block: 192.0.2.1")

    def broken(req):
        raise KeyError("oops")

    control({"refuse": refuse, "broken": broken})
    with pytest.raises(ControlError, match="no such block: 192.0.2.1"):
        request(tmp_path, "refuse")
    with pytest.raises(ControlError, match="internal error in broken: KeyError"):
        request(tmp_path, "broken")
    with pytest.raises(ControlError, match=r"unknown command 'nope' \(known: broken, help, refuse\)"):
        request(tmp_path, "nope")


def test_bad_input_gets_an_answer_and_the_server_keeps_serving(control, tmp_path):
    control({"ping": lambda req: {"pong": True}})
    path = socket_path(tmp_path)
    answers = _raw(path, b'not json\n[1,2]\n{"cmd": 5}\n{"cmd":"ping"}\n')
    assert [a["ok"] for a in answers] == [False, False, False, True]
    assert "not a JSON object" in answers[0]["error"] and '"cmd" string' in answers[1]["error"]
    too_long = _raw(path, b'{"cmd":"ping","x":"' + b"a" * (MAX_LINE + 10) + b'"}\n')
    assert too_long == [{"ok": False, "error": f"request longer than {MAX_LINE} bytes"}]
    assert request(tmp_path, "ping") == {"pong": True}


def test_long_data_folder_path_and_stale_socket(control, tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX)  # a socket file a killed hub left behind, nobody listening
    with pytest.raises(OSError):
        stale.bind(str(socket_path(deep)))  # too long to bind directly
    stale.close()
    os.mknod(socket_path(deep), stat.S_IFSOCK | 0o666)
    running = control({"ping": lambda req: {"pong": 1}}, data_dir=deep)
    assert request(deep, "ping") == {"pong": 1}
    assert stat.S_IMODE(os.stat(socket_path(deep)).st_mode) == 0o600
    running.close()
    running.close = lambda: None
    assert not socket_path(deep).exists()


def test_client_says_when_the_hub_is_not_running(tmp_path):
    with pytest.raises(ControlError, match=r"the hub is not running .*control\.sock.*start it with: mailhub serve"):
        request(tmp_path, "help")
    listener = socket.socket(socket.AF_UNIX)  # a stale socket file: refused
    listener.bind(str(socket_path(tmp_path)))
    listener.close()
    with pytest.raises(ControlError, match="the hub is not running"):
        request(tmp_path, "help")


def test_hub_serves_the_control_socket_and_removes_it_at_shutdown(make_hub):
    hub = make_hub().start()
    path = socket_path(hub.data_dir)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    answer = request(hub.data_dir, "help")
    assert answer["pid"] == hub.pid and "help" in answer["commands"]
    assert hub.stop() == 0
    assert not path.exists()


def test_each_request_carries_the_peer_uid_the_kernel_gives_not_the_one_the_client_claims(control, tmp_path):
    control({"who": lambda req: {"uid": req.get(PEER_UID)}})
    assert request(tmp_path, "who") == {"uid": os.getuid()}
    assert request(tmp_path, "who", **{PEER_UID: os.getuid() + 4242}) == {"uid": os.getuid()}
