# Fast asyncio SMTP load client for benchmarks (raw asyncio streams, no smtplib).
# N concurrent sessions share M mails (connection reused per session); the body
# is generated once (76-char base64 lines + CRLF); bodies of SENDFILE_MIN bytes or more go out with
# sendfile(2) from a temporary file (as a gateway sends a DICOM file: no copy through the client's
# memory, so the client costs the machine little), smaller ones with one write.
# AUTH PLAIN, PIPELINING (MAIL/RCPT/DATA or BDAT) and BDAT/CHUNKING when offered.
#   python -m bench.smtp_blast --host 127.0.0.1 --port P --sessions N --mails M --size BYTES
#          [--user U --password PW] [--rcpt ADDR] [--from ADDR] [--bdat]
# Prints {"mails", "bytes", "seconds", "mails_per_s", "mb_per_s", "failures"}.
# Library: await blast(host, port, sessions, mails, size, ...) -> same dict.
import asyncio
import base64
import json
import os
import tempfile
import time

from bench.common import argument_parser

LINE = 76
# Bodies go out in 1 MiB memoryview slices, each followed by drain(): in
# Python 3.11 one huge writer.write() copies the unsent rest into a fresh
# bytearray (page faults, ~0.5 GB/s); slices keep the client near 2 GB/s.
CHUNK = 1 << 20
SENDFILE_MIN = 256 * 1024


def make_body(size):
    """About `size` bytes of base64-like 76-char lines, each ending CRLF.
    No line starts with '.', so the block needs no dot-stuffing."""
    nlines = max(1, -(-size // (LINE + 2)))
    block = min(nlines, 16384)  # ~1.3 MB of random lines, repeated: fast for 1 GB
    lines = base64.encodebytes(os.urandom(block * LINE // 4 * 3)).replace(b"\n", b"\r\n")
    full, rest = divmod(nlines, block)
    return lines * full + lines[: rest * (LINE + 2)]


def make_header(i, mail_from, rcpt, tag):
    return (
        "From: <%s>\r\nTo: <%s>\r\nSubject: smtp_blast %d\r\n"
        "Message-ID: <%s.%d@smtp-blast.invalid>\r\n\r\n" % (mail_from, rcpt, i, tag, i)
    ).encode()


async def _reply(reader):
    """Read one (possibly multi-line) SMTP reply -> (code, [lines])."""
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed by server")
        lines.append(line)
        if line[3:4] != b"-":
            return int(line[:3]), lines


async def _send(writer, hdr, body, tail=b""):
    """hdr + body + tail with few syscalls and no big copies. body: bytes, or an open file whose
    whole content is sent with sendfile(2)."""
    if not isinstance(body, (bytes, memoryview)):
        writer.write(hdr)
        await writer.drain()
        await asyncio.get_running_loop().sendfile(writer.transport, body, 0, os.fstat(body.fileno()).st_size)
        if tail:
            writer.write(tail)
    elif len(body) <= CHUNK:
        writer.write(b"".join((hdr, body, tail)))
    else:
        body_mv = memoryview(body)
        writer.write(hdr)
        for i in range(0, len(body_mv), CHUNK):
            writer.write(body_mv[i : i + CHUNK])
            await writer.drain()
        if tail:
            writer.write(tail)
    await writer.drain()


class _Stats:
    def __init__(self):
        self.ok = 0
        self.bytes = 0
        self.errors = []


async def _session(host, port, jobs, st, body, o):
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    body_file = open(o["body_path"], "rb") if o["body_path"] else None  # one per session: sendfile seeks it
    try:
        code, _ = await _reply(reader)
        if code != 220:
            raise RuntimeError("greeting %d" % code)
        writer.write(b"EHLO smtp-blast.localdomain\r\n")
        code, lines = await _reply(reader)
        if code != 250:
            raise RuntimeError("EHLO %d" % code)
        caps = {ln[4:].split()[0].upper().decode() for ln in lines[1:] if ln[4:].split()}
        if o["user"]:
            tok = base64.b64encode(b"\0%s\0%s" % (o["user"].encode(), o["password"].encode()))
            writer.write(b"AUTH PLAIN " + tok + b"\r\n")
            code, _ = await _reply(reader)
            if code != 235:
                raise RuntimeError("AUTH %d" % code)
        pipelining = "PIPELINING" in caps
        bdat = o["bdat"] and "CHUNKING" in caps
        payload = body_file or body
        for i in jobs:
            hdr = make_header(i, o["from"], o["rcpt"], o["tag"])
            size = len(hdr) + len(body)
            mail = "MAIL FROM:<%s>%s\r\n" % (o["from"], " SIZE=%d" % size if "SIZE" in caps else "")
            rcpt = "RCPT TO:<%s>\r\n" % o["rcpt"]
            cmds = [mail.encode(), rcpt.encode()]
            cmds.append(b"BDAT %d LAST\r\n" % size if bdat else b"DATA\r\n")
            codes = []
            if pipelining:
                if bdat:
                    await _send(writer, b"".join(cmds) + hdr, payload)
                else:
                    writer.write(b"".join(cmds))
                    await writer.drain()
                for _ in cmds:
                    codes.append((await _reply(reader))[0])
            else:
                for c in cmds:
                    if bdat and c.startswith(b"BDAT"):
                        await _send(writer, c + hdr, payload)
                    else:
                        writer.write(c)
                    codes.append((await _reply(reader))[0])
                    if codes[-1] >= 400:
                        break
            if not bdat and codes[-1] == 354:
                await _send(writer, hdr, payload, b".\r\n")
                codes.append((await _reply(reader))[0])
            if codes[-1] == 250 and all(c < 400 for c in codes):
                st.ok += 1
                st.bytes += size
            else:
                st.errors.append("mail %d: replies %s" % (i, codes))
                writer.write(b"RSET\r\n")
                await _reply(reader)
        writer.write(b"QUIT\r\n")
        await writer.drain()
        await _reply(reader)
    finally:
        if body_file:
            body_file.close()
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def blast(
    host,
    port,
    sessions=1,
    mails=1,
    size=10240,
    user=None,
    password=None,
    rcpt="bench@example.org",
    mail_from="blast@example.org",
    bdat=False,
    body=None,
):
    """Send `mails` mails of ~`size` bytes over `sessions` parallel sessions.
    Returns {"mails", "bytes", "seconds", "mails_per_s", "mb_per_s", "failures"}
    (+ "errors", a few failure descriptions, when failures > 0)."""
    body = body if body is not None else make_body(max(0, size - 160))
    o = {
        "user": user,
        "password": password or "",
        "rcpt": rcpt,
        "from": mail_from,
        "bdat": bdat,
        "tag": "%x.%x" % (int(time.time()), os.getpid()),
    }
    with tempfile.TemporaryDirectory(prefix="smtp-blast-") as folder:
        if len(body) >= SENDFILE_MIN:
            o["body_path"] = os.path.join(folder, "body")
            with open(o["body_path"], "wb") as f:
                f.write(body)
        else:
            o["body_path"] = None
        return await _blast(host, port, sessions, mails, body, o)


async def _blast(host, port, sessions, mails, body, o):
    st = _Stats()
    jobs = iter(range(mails))  # shared: a free session takes the next mail
    t0 = time.perf_counter()
    res = await asyncio.gather(
        *(_session(host, port, jobs, st, body, o) for _ in range(sessions)), return_exceptions=True
    )
    dt = time.perf_counter() - t0
    st.errors += ["session: %r" % r for r in res if isinstance(r, BaseException)]
    out = {
        "mails": st.ok,
        "bytes": st.bytes,
        "seconds": round(dt, 4),
        "mails_per_s": round(st.ok / dt, 1),
        "mb_per_s": round(st.bytes / dt / 1e6, 1),
        "failures": mails - st.ok,
    }
    if st.errors:
        out["errors"] = st.errors[:10]
    return out


def main():
    ap = argument_parser(
        "bench.smtp_blast", "Fast asyncio SMTP load client: N sessions share M mails; prints one JSON line."
    )
    ap.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    ap.add_argument("--port", type=int, required=True, help="server port")
    ap.add_argument("--sessions", type=int, default=1, help="SMTP sessions at once (default 1)")
    ap.add_argument("--mails", type=int, default=1, help="mails in all, shared by the sessions (default 1)")
    ap.add_argument("--size", type=int, default=10240, help="approximate message size in bytes")
    ap.add_argument("--user", help="AUTH PLAIN user (default: no AUTH)")
    ap.add_argument("--password", help="AUTH PLAIN password")
    ap.add_argument("--rcpt", default="bench@example.org", help="recipient (default bench@example.org)")
    ap.add_argument("--from", dest="mail_from", default="blast@example.org", help="sender (default blast@example.org)")
    ap.add_argument("--bdat", action="store_true", help="use BDAT when CHUNKING is offered")
    a = ap.parse_args()
    print(
        json.dumps(
            asyncio.run(
                blast(a.host, a.port, a.sessions, a.mails, a.size, a.user, a.password, a.rcpt, a.mail_from, a.bdat)
            )
        )
    )


if __name__ == "__main__":
    main()
