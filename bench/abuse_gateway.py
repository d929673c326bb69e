# The well-behaved side of the abuse benchmark (bench/abuse.py): a good gateway that submits 1 MB
# mails over SMTP and downloads them over POP3 and IMAP in a loop, a lag probe (a logged-in IMAP
# connection sending NOOP every 50 ms, whose reply time shows how long the hub's event loop was
# busy, measured from outside with no help from the hub), and a sampler of the hub's memory.
# Each runs in a thread of the benchmark process and records timestamped samples; the benchmark
# cuts them into windows, one per attack. Only 127.0.0.1 is ever connected to.
# Must never: hold a hub connection open forever (every socket has a timeout), or raise out of its
# thread (a failed operation is a sample with ok=False).
import imaplib
import os
import poplib
import smtplib
import socket
import threading
import time
from dataclasses import dataclass

import psutil

HOST = "127.0.0.1"
MAIL_SIZE = 1_000_000
OP_TIMEOUT = 30.0  # seconds a good operation may take before it counts as failed
PROBE_INTERVAL = 0.05


@dataclass
class Sample:
    started: float  # time.monotonic() when the operation (or NOOP) was sent
    op: str  # "smtp", "pop3", "imap" or "probe"
    seconds: float
    ok: bool
    error: str = ""


@dataclass
class Ports:
    smtp: int
    pop3: int
    imap: int
    metrics: int | None = None


@dataclass
class Sites:
    """Site names the benchmark uses; every one has the same password."""

    password: str
    sender: str = "good-sender"
    pop3: str = "good-pop3"
    imap: str = "good-imap"
    probe: str = "probe"
    attacker: str = "attacker"
    attacker_mime: str = "attacker-mime"
    sink: str = "sink"

    def all(self) -> list[str]:
        return [self.sender, self.pop3, self.imap, self.probe, self.attacker, self.attacker_mime, self.sink]


class Recorder:
    """Thread-safe list of samples."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._samples: list[Sample] = []

    def add(self, sample: Sample) -> None:
        with self._lock:
            self._samples.append(sample)

    def between(self, start: float, end: float, op: str | None = None) -> list[Sample]:
        with self._lock:
            return [s for s in self._samples if start <= s.started < end and (op is None or s.op == op)]

    def done_since(self, moment: float, op: str) -> bool:
        """Whether an operation of this kind sent after `moment` has finished (either way)."""
        with self._lock:
            return any(s.op == op and s.started >= moment for s in self._samples)


def gateway_mail(domain: str, sender: str, recipients: list[str], number: int) -> bytes:
    header = (
        f"From: {sender}@{domain}\r\nTo: {', '.join(f'{r}@{domain}' for r in recipients)}\r\n"
        f"Subject: abuse benchmark good mail {number}\r\n"
        f"Message-ID: <good-{number}-{os.urandom(6).hex()}@{domain}>\r\n\r\n"
    ).encode()
    line = (os.urandom(38).hex()[:76] + "\r\n").encode()
    return header + line * ((MAIL_SIZE - len(header)) // len(line))


def _timed(recorder: Recorder, op: str, action) -> None:
    started = time.monotonic()
    try:
        action()
        recorder.add(Sample(started, op, time.monotonic() - started, True))
    except (OSError, EOFError, smtplib.SMTPException, poplib.error_proto, imaplib.IMAP4.error, ValueError) as e:
        recorder.add(Sample(started, op, time.monotonic() - started, False, f"{type(e).__name__}: {e}"[:200]))


def submit(ports: Ports, sites: Sites, domain: str, number: int) -> None:
    mail = gateway_mail(domain, sites.sender, [sites.pop3, sites.imap], number)
    with smtplib.SMTP(HOST, ports.smtp, timeout=OP_TIMEOUT) as smtp:
        smtp.login(sites.sender, sites.password)
        smtp.sendmail(f"{sites.sender}@{domain}", [f"{sites.pop3}@{domain}", f"{sites.imap}@{domain}"], mail)


def download_pop3(ports: Ports, sites: Sites, most: int = 2) -> None:
    pop = poplib.POP3(HOST, ports.pop3, timeout=OP_TIMEOUT)
    try:
        pop.user(sites.pop3)
        pop.pass_(sites.password)
        count, _size = pop.stat()
        for n in range(1, min(count, most) + 1):
            pop.retr(n)
            pop.dele(n)
        pop.quit()
    finally:
        pop.close()


def download_imap(ports: Ports, sites: Sites, most: int = 2) -> None:
    imap = imaplib.IMAP4(HOST, ports.imap, timeout=OP_TIMEOUT)
    try:
        imap.login(sites.imap, sites.password)
        typ, data = imap.select("INBOX")
        if typ != "OK" or data[0] is None:
            raise imaplib.IMAP4.error(f"SELECT: {typ} {data}")
        count = min(int(data[0]), most)
        if count:
            typ, fetched = imap.fetch(f"1:{count}", "(BODY[])")
            if typ != "OK":
                raise imaplib.IMAP4.error(f"FETCH: {typ} {fetched}")
            imap.store(f"1:{count}", "+FLAGS", "(\\Deleted)")
            imap.expunge()
    except BaseException:
        imap.shutdown()
        raise
    imap.logout()


class Gateway(threading.Thread):
    """A good gateway: submit one 1 MB mail to two sites, download by POP3, download by IMAP, pause."""

    def __init__(self, ports: Ports, sites: Sites, domain: str, recorder: Recorder, pause: float):
        super().__init__(name="good-gateway", daemon=True)
        self.ports, self.sites, self.domain, self.recorder, self.pause = ports, sites, domain, recorder, pause
        self.stopping = threading.Event()

    def run(self) -> None:
        number = 0
        while not self.stopping.is_set():
            number += 1
            _timed(self.recorder, "smtp", lambda: submit(self.ports, self.sites, self.domain, number))
            _timed(self.recorder, "pop3", lambda: download_pop3(self.ports, self.sites))
            _timed(self.recorder, "imap", lambda: download_imap(self.ports, self.sites))
            self.stopping.wait(self.pause)


class _ProbeConnection:
    """A logged-in, selected IMAP connection on a raw socket."""

    def __init__(self, ports: Ports, sites: Sites):
        self.sock = socket.create_connection((HOST, ports.imap), timeout=OP_TIMEOUT)
        self.buf = b""
        self.tag = 0
        self._line()  # greeting
        for command in (f"LOGIN {sites.probe} {sites.password}", "SELECT INBOX"):
            status = self.command(command)
            if not status.startswith(b"OK"):
                raise OSError(f"probe {command.split()[0]}: {status[:100]!r}")

    def _line(self) -> bytes:
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise OSError("probe connection closed by the hub")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def command(self, text: str) -> bytes:
        self.tag += 1
        tag = b"p%d " % self.tag
        self.sock.sendall(tag + text.encode() + b"\r\n")
        while not (line := self._line()).startswith(tag):
            pass
        return line[len(tag) :]

    def close(self) -> None:
        self.sock.close()


class LagProbe(threading.Thread):
    """NOOP every PROBE_INTERVAL on an idle logged-in IMAP connection; each reply time is a sample."""

    def __init__(self, ports: Ports, sites: Sites, recorder: Recorder):
        super().__init__(name="lag-probe", daemon=True)
        self.ports, self.sites, self.recorder = ports, sites, recorder
        self.stopping = threading.Event()

    def run(self) -> None:
        conn = None
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                if conn is None:
                    conn = _ProbeConnection(self.ports, self.sites)
                    started = time.monotonic()
                conn.command("NOOP")
                self.recorder.add(Sample(started, "probe", time.monotonic() - started, True))
            except OSError as e:
                self.recorder.add(Sample(started, "probe", time.monotonic() - started, False, str(e)[:200]))
                if conn is not None:
                    conn.close()
                conn = None
            self.stopping.wait(max(0.0, PROBE_INTERVAL - (time.monotonic() - started)))
        if conn is not None:
            conn.close()


class HubProcesses:
    """The hub process and its children (the index writer), for RSS and CPU readings. With no pid
    (a hub the benchmark did not start and was not told about) every reading is None."""

    def __init__(self, pid: int | None):
        self.hub = psutil.Process(pid) if pid else None

    def rss(self) -> int | None:
        try:
            return self.hub.memory_info().rss if self.hub else None
        except psutil.Error:
            return None

    def cpu_seconds(self) -> float | None:
        if self.hub is None:
            return None
        total = 0.0
        try:
            for proc in [self.hub, *self.hub.children(recursive=True)]:
                times = proc.cpu_times()
                total += times.user + times.system
        except psutil.Error:
            return None
        return total


class MemorySampler(threading.Thread):
    """The hub's RSS every 0.1 s, as (time, bytes) pairs."""

    def __init__(self, processes: HubProcesses):
        super().__init__(name="rss-sampler", daemon=True)
        self.processes = processes
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._samples: list[tuple[float, int]] = []

    def run(self) -> None:
        while not self.stopping.wait(0.1):
            rss = self.processes.rss()
            if rss is not None:
                with self._lock:
                    self._samples.append((time.monotonic(), rss))

    def peak(self, start: float, end: float) -> int | None:
        with self._lock:
            values = [rss for moment, rss in self._samples if start <= moment <= end]
        return max(values) if values else None
