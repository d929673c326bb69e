# The in-process hub (mailhub/hub.py): started and stopped inside this process on ports the
# system picks, it serves every protocol, and its shutdown leaves no thread, child process, open
# file or listening socket behind, also when it fails to start half way.
import asyncio
import imaplib
import poplib
import shutil
import smtplib
import socket
import threading
import urllib.request

import psutil
import pytest
import uvloop

from mailhub import config
from mailhub.hub import Hub

from conftest import ALPHA_BETA, PASSWORD, make_message, wait_for

# Every test that starts a hub runs on SQLite and again on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.both_engines


def _resources() -> tuple[set, set, int]:
    """This process's threads, child processes and number of open file descriptors."""
    me = psutil.Process()
    return ({t.ident for t in threading.enumerate()}, {c.pid for c in me.children(recursive=True)}, me.num_fds())


def _nothing_left(before: tuple[set, set, int]):
    threads, children, fds = _resources()
    return threads <= before[0] and children <= before[1] and fds <= before[2]


def _warm_up(make_hub, hub_signing_key) -> None:
    """Start and stop one hub first: the first in a process makes a few things made once per
    process (a pipe of the event loop library); what a later hub leaves behind is a leak."""
    _run(_start_stop(Hub(config.load(environ=_data_folder(make_hub, hub_signing_key).env))))


async def _start_stop(hub: Hub) -> None:
    async with hub:
        pass


def _run(coroutine):
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


def _data_folder(make_hub, hub_signing_key, **overrides):
    """A data folder with sites alpha and beta and the session's hub key (the helper not started)."""
    helper = make_hub(sites=ALPHA_BETA, **overrides)
    shutil.copy2(hub_signing_key, helper.data_dir / hub_signing_key.name)
    return helper


def _talk_to(ports: dict) -> dict:
    """One exchange with every listener; what each answered."""
    answers = {}
    with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=30) as smtp:
        smtp.login("alpha", PASSWORD)
        answers["smtp"] = smtp.sendmail("alpha@hub.test", ["beta@hub.test"], make_message(3000))
    pop3 = poplib.POP3("127.0.0.1", ports["pop3"], timeout=30)
    pop3.user("beta")
    pop3.pass_(PASSWORD)
    answers["pop3"] = pop3.stat()[0]
    pop3.quit()
    imap = imaplib.IMAP4("127.0.0.1", ports["imap"], timeout=30)
    imap.login("beta", PASSWORD)
    answers["imap"] = imap.select("INBOX")[1][0]
    imap.logout()
    with urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/healthz", timeout=30) as response:
        answers["metrics"] = response.status
    return answers


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_hub_serves_on_bound_ports_and_leaves_nothing_behind(make_hub, hub_signing_key):
    _warm_up(make_hub, hub_signing_key)
    helper = _data_folder(make_hub, hub_signing_key)
    cfg = config.load(environ=helper.env)
    before = _resources()

    async def main():
        async with Hub(cfg) as hub:
            assert hub.data_dir == helper.data_dir and (hub.data_dir / "control.sock").exists()
            ports = dict(hub.ports)
            assert set(ports) == {"smtp", "pop3", "imap", "metrics"} and 0 not in ports.values()
            assert len(set(ports.values())) == 4
            assert hub.storage is not None
            answers = await asyncio.to_thread(_talk_to, ports)
        return ports, answers

    ports, answers = _run(main())
    assert answers == {"smtp": {}, "pop3": 1, "imap": b"1", "metrics": 200}
    assert not (helper.data_dir / "control.sock").exists()
    assert all(_refused(port) for port in ports.values())
    wait_for(lambda: _nothing_left(before), timeout=10, message="threads, children and fds back to before")


def test_a_hub_that_fails_to_start_half_way_leaves_nothing_behind(make_hub, hub_signing_key):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _warm_up(make_hub, hub_signing_key)
        # SMTP and POP3 are listening (and storage open, its writer process started) when IMAP fails
        helper = _data_folder(make_hub, hub_signing_key, MAILHUB_IMAP_LISTEN=f"127.0.0.1:{port}")
        cfg = config.load(environ=helper.env)
        before = _resources()
        hub = Hub(cfg)
        with pytest.raises(OSError):
            _run(hub.start())
    assert hub.ports and "imap" not in hub.ports
    assert all(_refused(p) for p in hub.ports.values())
    wait_for(lambda: _nothing_left(before), timeout=10, message="threads, children and fds back to before")

    async def again():  # the data folder's lock was released: a hub starts on it at once
        async with Hub(config.load(environ=dict(helper.env, MAILHUB_IMAP_LISTEN="127.0.0.1:0"))) as hub:
            return dict(hub.ports)

    assert set(_run(again())) == {"smtp", "pop3", "imap", "metrics"}


def test_stop_is_idempotent_and_a_hub_object_starts_once(make_hub, hub_signing_key):
    helper = _data_folder(make_hub, hub_signing_key)
    hub = Hub(config.load(environ=helper.env))

    async def main():
        await hub.stop()  # never started: nothing to do
        await hub.start()
        hub.request_stop()
        await asyncio.wait_for(hub.stopped(), 5)
        await hub.stop()
        await hub.stop()
        with pytest.raises(RuntimeError, match="started already"):
            await hub.start()

    _run(main())
    assert hub.storage is None
