# Fast POP3 download client for benchmarks (poplib tops out far lower).
# Raw blocking sockets with a large recv_into buffer, one thread per mailbox:
# USER/PASS, STAT, RETR every message (dot-unstuffing, CRLF.CRLF found across
# chunk boundaries, optional SHA-256 of the unstuffed content), optional DELE,
# QUIT. Prints one JSON line.
#   python -m bench.pop3_fetch --host 127.0.0.1 --port P --account u1:pw1 [--account u2:pw2]
#          [--sessions N] [--dele] [--sha256]
# Library: fetch_all(host, port, accounts, dele=False, sha256=False) -> dict.
import hashlib
import json
import socket
import threading
import time

from bench.common import argument_parser

BUFSZ = 4 << 20


class Conn:
    """Buffered reader over a socket: CRLF lines, dot-terminated blocks, exact counts."""

    def __init__(self, sock, bufsize=BUFSZ):
        self.sock = sock
        self.buf = bytearray(bufsize)
        self.mv = memoryview(self.buf)
        self.lo = self.hi = 0

    def _recv(self):
        if self.hi == len(self.buf):  # compact
            n = self.hi - self.lo
            if n == len(self.buf):
                raise ValueError("line too long")
            self.buf[0:n] = self.buf[self.lo : self.hi]
            self.lo, self.hi = 0, n
        k = self.sock.recv_into(self.mv[self.hi :])
        if not k:
            raise ConnectionError("connection closed by peer")
        self.hi += k

    def readline(self):
        """One line without its CRLF, as bytes."""
        while True:
            i = self.buf.find(b"\r\n", self.lo, self.hi)
            if i >= 0:
                line = bytes(self.buf[self.lo : i])
                self.lo = i + 2
                return line
            self._recv()

    def read_dot_terminated(self, sink):
        """Consume a dot-stuffed block up to and including CRLF.CRLF; call
        sink(memoryview) with consecutive pieces of the unstuffed content
        (which ends with its final CRLF). Returns the unstuffed length."""
        buf, mv = self.buf, self.mv
        # Put a virtual CRLF before the data so that "line start" is always
        # "after CRLF"; those two bytes are never emitted.
        n = self.hi - self.lo
        buf[2 : 2 + n] = buf[self.lo : self.hi]
        buf[0:2] = b"\r\n"
        hi, pos, emit, total = 2 + n, 0, 2, 0
        while True:
            while True:
                # memchr for the dot, then look behind for CRLF (far faster
                # than searching for the 3-byte pattern)
                d = buf.find(b".", pos + 2, hi)
                if d < 0:
                    p = -1
                    break
                if buf[d - 2] != 13 or buf[d - 1] != 10:
                    pos = d - 1
                    continue
                p = d - 2
                if p + 5 > hi:
                    break
                if emit < p + 2:
                    sink(mv[emit : p + 2])
                    total += p + 2 - emit
                if buf[p + 3] == 13 and buf[p + 4] == 10:  # CRLF . CRLF: end
                    self.lo, self.hi = p + 5, hi
                    return total
                emit = pos = p + 3  # drop the stuffing dot
            hold = p if p >= 0 else max(pos, hi - 4)
            if emit < hold:
                sink(mv[emit:hold])
                total += hold - emit
                emit = hold
            # keep the undecided tail [min(emit,hold):hi) at the buffer start
            keep = min(emit, hold)
            t = hi - keep
            buf[0:t] = buf[keep:hi]
            emit -= keep
            pos, hi = 0, t
            k = self.sock.recv_into(mv[hi:])
            if not k:
                raise ConnectionError("connection closed inside a dot-terminated block")
            hi += k

    def read_exact(self, count, sink):
        """Consume exactly count bytes, passing them to sink(memoryview)."""
        while count:
            if self.lo == self.hi:
                self.lo = self.hi = 0
                self._recv()
            k = min(count, self.hi - self.lo)
            sink(self.mv[self.lo : self.lo + k])
            self.lo += k
            count -= k


def _cmd(sock, conn, line):
    sock.sendall(line.encode() + b"\r\n")
    r = conn.readline()
    if not r.startswith(b"+OK"):
        raise RuntimeError("POP3 %s -> %r" % (line.split()[0], r))
    return r


def fetch_mailbox(host, port, user, password, dele=False, sha256=False):
    """Download (and optionally delete) every message of one mailbox.
    Returns {"messages": n, "bytes": unstuffed bytes, "sha256": [hex...]}."""
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        conn = Conn(sock)
        if not conn.readline().startswith(b"+OK"):
            raise RuntimeError("no POP3 greeting")
        _cmd(sock, conn, "USER " + user)
        _cmd(sock, conn, "PASS " + password)
        count = int(_cmd(sock, conn, "STAT").split()[1])
        total, digests = 0, []
        for i in range(1, count + 1):
            _cmd(sock, conn, "RETR %d" % i)
            if sha256:
                h = hashlib.sha256()
                total += conn.read_dot_terminated(h.update)
                digests.append(h.hexdigest())
            else:
                total += conn.read_dot_terminated(len)
            if dele:
                _cmd(sock, conn, "DELE %d" % i)
        _cmd(sock, conn, "QUIT")
        return {"messages": count, "bytes": total, "sha256": digests}
    finally:
        sock.close()


def fetch_all(host, port, accounts, dele=False, sha256=False, sessions=None):
    """accounts: list of (user, password); one thread per account (at most
    `sessions` at a time). Returns the summary dict that the CLI prints."""
    accounts = list(accounts)
    sessions = sessions or len(accounts)
    results, errors, lock = [], [], threading.Lock()
    todo = iter(accounts)

    def worker():
        while True:
            with lock:
                acct = next(todo, None)
            if acct is None:
                return
            try:
                r = fetch_mailbox(host, port, acct[0], acct[1], dele, sha256)
                with lock:
                    results.append(dict(r, user=acct[0]))
            except Exception as e:  # counted, not fatal
                with lock:
                    errors.append("%s: %r" % (acct[0], e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(min(sessions, len(accounts)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    msgs = sum(r["messages"] for r in results)
    nbytes = sum(r["bytes"] for r in results)
    out = {
        "messages": msgs,
        "bytes": nbytes,
        "seconds": round(dt, 4),
        "mb_per_s": round(nbytes / dt / 1e6, 1),
        "messages_per_s": round(msgs / dt, 1),
        "failures": len(errors),
    }
    if errors:
        out["errors"] = errors
    if sha256:
        out["sha256"] = {r["user"]: r["sha256"] for r in results}
    return out


def main():
    ap = argument_parser(
        "bench.pop3_fetch", "Fast POP3 download client (one thread per mailbox); prints one JSON line."
    )
    ap.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    ap.add_argument("--port", type=int, required=True, help="server port")
    ap.add_argument(
        "--account",
        action="append",
        required=True,
        metavar="USER:PASSWORD",
        help="mailbox to download; repeat for several (one session each)",
    )
    ap.add_argument("--sessions", type=int, default=0, help="max parallel sessions (default: one per account)")
    ap.add_argument("--dele", action="store_true", help="DELE each message after RETR")
    ap.add_argument("--sha256", action="store_true", help="hash each unstuffed message")
    a = ap.parse_args()
    accounts = [tuple(x.split(":", 1)) for x in a.account]
    print(json.dumps(fetch_all(a.host, a.port, accounts, a.dele, a.sha256, a.sessions or None)))


if __name__ == "__main__":
    main()
