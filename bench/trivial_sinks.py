# Trivial loopback servers used to check that the benchmark clients are not the
# bottleneck: an SMTP sink that reads and discards (DATA and BDAT) and a POP3
# server that serves the same in-memory message N times. One thread per client.
#   python -m bench.trivial_sinks smtp [--port 0]
#   python -m bench.trivial_sinks pop3 [--port 0] --count N --size BYTES
# Each prints its port on the first stdout line, then serves until killed.
import socket
import threading

from bench.common import argument_parser
from bench.pop3_fetch import Conn
from bench.smtp_blast import make_body

EHLO = b"250-trivial-sink\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-8BITMIME\r\n250-AUTH PLAIN\r\n250 SIZE 0\r\n"


def _discard(_mv):
    pass


BUFSIZE = 1 << 20


def smtp_client(sock):
    conn = Conn(sock, BUFSIZE)
    send = sock.sendall
    send(b"220 trivial-sink ESMTP\r\n")
    while True:
        line = conn.readline()
        verb = line[:4].upper()
        if verb in (b"EHLO", b"HELO"):
            send(EHLO)
        elif verb == b"AUTH":
            send(b"235 ok\r\n")
        elif verb == b"DATA":
            send(b"354 go\r\n")
            conn.read_dot_terminated(_discard)
            send(b"250 discarded\r\n")
        elif verb == b"BDAT":
            conn.read_exact(int(line.split()[1]), _discard)
            send(b"250 discarded\r\n")
        elif verb == b"QUIT":
            send(b"221 bye\r\n")
            return
        else:
            send(b"250 ok\r\n")


def pop3_client(sock, message, count):
    # message is already dot-stuffed-safe (no line starts with '.') and CRLF-ended
    conn = Conn(sock, BUFSIZE)
    send = sock.sendall
    send(b"+OK trivial pop3\r\n")
    while True:
        parts = conn.readline().split()
        verb = parts[0].upper() if parts else b""
        if verb == b"STAT":
            send(b"+OK %d %d\r\n" % (count, count * len(message)))
        elif verb == b"RETR":
            send(b"+OK %d octets\r\n" % len(message))
            send(message)
            send(b".\r\n")
        elif verb == b"QUIT":
            send(b"+OK bye\r\n")
            return
        else:
            send(b"+OK\r\n")


def serve(handler, port=0):
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(64)
    print(ls.getsockname()[1], flush=True)

    def run(s):
        with s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                handler(s)
            except (ConnectionError, OSError):
                pass

    while True:
        s, _ = ls.accept()
        threading.Thread(target=run, args=(s,), daemon=True).start()


def main():
    ap = argument_parser(
        "bench.trivial_sinks",
        "Trivial loopback servers that show the benchmark clients are not the\n"
        "bottleneck: an SMTP sink, or a POP3 server serving one in-memory message.",
    )
    ap.add_argument("kind", choices=("smtp", "pop3"), help="which server")
    ap.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default 0: a free one, printed)")
    ap.add_argument("--count", type=int, default=20, help="POP3: messages in the mailbox (default 20)")
    ap.add_argument("--size", type=int, default=50_000_000, help="POP3: bytes per message (default 50000000)")
    ap.add_argument("--bufsize", type=int, default=BUFSIZE, help="receive buffer bytes")
    a = ap.parse_args()
    globals()["BUFSIZE"] = a.bufsize
    if a.kind == "smtp":
        serve(smtp_client, a.port)
    else:
        msg = b"Subject: trivial\r\n\r\n" + make_body(a.size)
        serve(lambda s: pop3_client(s, msg, a.count), a.port)


if __name__ == "__main__":
    main()
