# Helpers for the POP3 tests: putting mail into a hub over SMTP, reading what it stored, a raw POP3
# client for exact wire bytes and for messages too big for poplib's line lists, a throw-away
# self-signed certificate.
import base64
import hashlib
import os
import smtplib
import socket
import subprocess
from pathlib import Path

from conftest import PASSWORD

_TERMINATOR = b"\r\n.\r\n"


def send(hub, rcpts: list[str], message: bytes, login: str = "alpha") -> str:
    """Deliver one message over SMTP (smtplib); return its queue ID."""
    client = smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=120)
    try:
        client.ehlo("gateway.test")
        client.login(login, PASSWORD)
        client.mail(f"{login}@hub.test")
        for rcpt in rcpts:
            code, reply = client.rcpt(rcpt)
            assert code == 250, reply
        code, reply = client.data(message)
        assert code == 250, reply
        return reply.decode().rsplit(" ", 1)[1]
    finally:
        client.quit()


def blob_path(hub, queue_id: str) -> Path:
    (blob,) = hub.query("SELECT blob FROM messages WHERE queue_id = ?", queue_id)[0]
    return hub.data_dir / "blobs" / blob


def stored_size(hub, queue_id: str) -> int:
    (size,) = hub.query("SELECT size FROM messages WHERE queue_id = ?", queue_id)[0]
    return size


def message_range(hub, queue_id: str) -> tuple[Path, int, int]:
    """Where a message's bytes are: its blob file (its own, or a pack of small messages), offset, size."""
    ((blob, offset, size),) = hub.query("SELECT blob, blob_offset, size FROM messages WHERE queue_id = ?", queue_id)
    return hub.data_dir / "blobs" / blob, offset, size


def released(where: tuple[Path, int, int]) -> bool:
    """The message's bytes no longer take space: its file is gone, or its range of a pack that
    lives on reads as zeros (a hole was punched)."""
    path, offset, size = where
    if not path.exists():
        return True
    with open(path, "rb") as f:
        return os.pread(f.fileno(), size, offset) == bytes(size)


def strip_trace(stored: bytes) -> bytes:
    """The message as the gateway sent it: the stored blob minus the Received: field the hub put on
    top (the first header field with its continuation lines)."""
    assert stored.startswith(b"Received: "), stored[:80]
    pos = stored.index(b"\r\n") + 2
    while stored[pos : pos + 1] in (b" ", b"\t"):
        pos = stored.index(b"\r\n", pos) + 2
    return stored[pos:]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def unstuff(stuffed: bytes) -> bytes:
    """Undo POP3 byte-stuffing of a multi-line body (without its terminating line)."""
    if stuffed.startswith(b".."):
        stuffed = stuffed[1:]
    return stuffed.replace(b"\n..", b"\n.")


class RawPop3:
    """A POP3 client on a plain socket: exact lines, and RETR of any size into one bytes object."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 60.0, rcvbuf: int | None = None):
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.buf = bytearray()
        self.greeting = self.line()

    def _fill(self) -> None:
        data = self.sock.recv(4 << 20)
        if not data:
            raise ConnectionError(f"closed by the server; unread: {bytes(self.buf)!r}")
        self.buf += data

    def line(self) -> bytes:
        """One reply line including its CRLF."""
        while (end := self.buf.find(b"\n")) < 0:
            self._fill()
        line = bytes(self.buf[: end + 1])
        del self.buf[: end + 1]
        return line

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, line: str | bytes) -> bytes:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.line()

    def block(self) -> bytes:
        """The raw (still stuffed) lines of a multi-line reply, without the final ".\\r\\n"."""
        scanned = 0
        while True:
            if self.buf.startswith(b".\r\n"):
                del self.buf[:3]
                return b""
            end = self.buf.find(_TERMINATOR, max(0, scanned - len(_TERMINATOR)))
            if end >= 0:
                data = bytes(self.buf[: end + 2])
                del self.buf[: end + 5]
                return data
            scanned = len(self.buf)
            self._fill()

    def login(self, user: str, password: str = PASSWORD) -> bytes:
        assert self.command(f"USER {user}").startswith(b"+OK")
        return self.command(f"PASS {password}")

    def auth_plain(self, user: str, password: str = PASSWORD) -> bytes:
        token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode()).decode()
        return self.command(f"AUTH PLAIN {token}")

    def retr(self, n: int) -> bytes:
        """RETR n, unstuffed (as the message is stored)."""
        status = self.command(f"RETR {n}")
        assert status.startswith(b"+OK"), status
        return unstuff(self.block())

    def rest(self, timeout: float = 10.0) -> bytes:
        """Everything until the server closes the connection."""
        self.sock.settimeout(timeout)
        data, self.buf = bytes(self.buf), bytearray()
        try:
            while chunk := self.sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
        return data

    def close(self) -> None:
        self.sock.close()


def make_cert(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def non_loopback_ip() -> str | None:
    """An IPv4 address of this machine that is not loopback (None if there is none)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # picks a route; sends nothing
        ip = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if ip.startswith("127.") or ip == "0.0.0.0" else ip
