# The hostile side of the abuse benchmark (bench/abuse.py): one coroutine per attack class of issue
# 20, each run alone in a child process (`python -m bench.abuse_attacks NAME JSON`) until its
# deadline, which prints one JSON line: what the attacker saw (replies by kind, connections held
# or refused, unanswered commands). A separate process keeps the attacker's CPU and GIL away from
# the lag probe and the good gateway; the parent kills it if it overruns.
# Must never: connect anywhere but 127.0.0.0/8, or outlive its deadline by more than a few seconds
# (every wait is bounded by the deadline). The hostile inputs themselves live in abuse_inputs.py.
import asyncio
import base64
import collections
import ipaddress
import itertools
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from bench import abuse_inputs as inputs

READ_LIMIT = 1 << 20


@dataclass
class Target:
    """Where and as whom to attack, and how hard; built by bench/abuse.py, passed as JSON."""

    host: str
    smtp: int
    pop3: int
    imap: int
    metrics: int | None
    domain: str
    password: str
    sites: dict  # role -> site name (see abuse_gateway.Sites)
    sources: list  # client addresses (127.x.y.z) this attack may connect from
    duration: float
    connections: int  # connections per protocol for the connection-holding attacks
    stalled_sessions: int
    mime_parts: int

    def __post_init__(self):
        for address in [self.host, *self.sources]:
            if not ipaddress.ip_address(address).is_loopback:
                raise SystemExit(f"refusing to use {address}: only 127.0.0.0/8 may take part")


class Ended(Exception):
    """The attack's deadline passed while waiting."""


@dataclass
class Run:
    target: Target
    deadline: float
    tally: collections.Counter = field(default_factory=collections.Counter)
    slowest: float = 0.0
    received: int = 0  # bytes the hub sent, over all connections

    def left(self) -> float:
        return self.deadline - time.monotonic()

    async def within(self, awaitable, cap: float | None = None):
        """Await with the deadline (or `cap` seconds, if sooner) as timeout; Ended at the deadline."""
        left = self.left()
        if left <= 0:
            raise Ended
        try:
            return await asyncio.wait_for(awaitable, left if cap is None else min(cap, left))
        except TimeoutError:
            if self.left() <= 0:
                raise Ended from None
            raise

    def timed(self, started: float) -> None:
        self.slowest = max(self.slowest, time.monotonic() - started)

    async def connect(self, port: int, source: str | None = None):
        return await self.within(
            asyncio.open_connection(
                self.target.host, port, local_addr=(source or self.target.sources[0], 0), limit=READ_LIMIT
            ),
            cap=10,
        )


# ------------------------------------------------------------------------- protocol helpers


class Line:
    """A connection read line by line (replies) or in bulk up to a tagged IMAP reply."""

    def __init__(self, run: Run, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.run, self.reader, self.writer = run, reader, writer
        self.tag = 0

    async def line(self, cap: float | None = None) -> bytes:
        data = await self.run.within(self.reader.readline(), cap)
        self.run.received += len(data)
        if not data:
            raise ConnectionError("closed by the hub")
        return data

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.run.within(self.writer.drain())

    async def smtp_reply(self, cap: float | None = None) -> bytes:
        lines = [await self.line(cap)]
        while lines[-1][3:4] == b"-":
            lines.append(await self.line(cap))
        return b"".join(lines)

    async def smtp(self, command: bytes, cap: float | None = None) -> bytes:
        await self.send(command + b"\r\n")
        return await self.smtp_reply(cap)

    async def imap(self, command: bytes, cap: float | None = None) -> tuple[bytes, int]:
        """Send a tagged command; read until its tagged reply. Returns (status word, bytes read)."""
        self.tag += 1
        tag = b"Z%d" % self.tag
        await self.send(tag + b" " + command + b"\r\n")
        return await self.run.within(self._until_tagged(tag), cap)

    async def _until_tagged(self, tag: bytes) -> tuple[bytes, int]:
        marker, pending, total = b"\n" + tag + b" ", b"\n", 0
        while True:
            chunk = await self.reader.read(1 << 16)
            if not chunk:
                raise ConnectionError("BYE" if b"* BYE" in pending else "closed by the hub")
            total += len(chunk)
            self.run.received += len(chunk)
            pending += chunk
            at = pending.find(marker)
            if at >= 0 and pending.find(b"\n", at + 1) >= 0:
                return pending[at + len(marker) :].split(None, 1)[0], total
            pending = pending[-512:]

    def close(self) -> None:
        self.writer.transport.abort()


async def open_line(run: Run, port: int, source: str | None = None) -> Line:
    reader, writer = await run.connect(port, source)
    return Line(run, reader, writer)


async def imap_login(run: Run, site: str, source: str | None = None, select: bool = True) -> Line:
    conn = await open_line(run, run.target.imap, source)
    await conn.line()
    status, _ = await conn.imap(b"LOGIN %s %s" % (site.encode(), run.target.password.encode()))
    if status != b"OK":
        raise ConnectionError(f"attacker LOGIN: {status!r}")
    if select:
        await conn.imap(b"SELECT INBOX")
    return conn


async def smtp_login(run: Run, source: str | None = None) -> Line:
    conn = await open_line(run, run.target.smtp, source)
    await conn.smtp_reply()
    await conn.smtp(b"EHLO attacker.test")
    token = base64.b64encode(b"\0%s\0%s" % (run.target.sites["attacker"].encode(), run.target.password.encode()))
    reply = await conn.smtp(b"AUTH PLAIN " + token)
    if not reply.startswith(b"235"):
        raise ConnectionError(f"attacker AUTH: {reply[:80]!r}")
    return conn


def _kind(error: BaseException) -> str:
    if isinstance(error, asyncio.TimeoutError):
        return "no reply"
    if isinstance(error, (BrokenPipeError, ConnectionResetError)):
        return "closed by hub"
    text = str(error)
    return (
        "BYE"
        if text == "BYE"
        else "closed by hub"
        if "closed" in text or "reset" in text.lower()
        else type(error).__name__
    )


async def workers(run: Run, count: int, worker) -> None:
    """`count` copies of worker(run, index) until the deadline; a worker that fails is restarted."""

    async def loop(index):
        while run.left() > 0:
            try:
                await worker(run, index)
            except Ended:
                return
            except (
                TimeoutError,
                OSError,
                ConnectionError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
                ValueError,
            ) as e:
                run.tally[_kind(e)] += 1
                await asyncio.sleep(min(0.05, max(0.0, run.left())))

    await asyncio.gather(*(loop(i) for i in range(count)))


async def imap_commands(run: Run, conn: Line, commands) -> None:
    """Send commands one after the other (cycling), tallying each tagged status and the slowest."""
    for command in commands:
        started = time.monotonic()
        try:
            status, _size = await conn.imap(command)
        except Ended:
            run.tally["no reply by the end"] += 1
            raise
        run.tally[status.decode(errors="replace")] += 1
        run.timed(started)


async def imap_command_loop(run: Run, site: str, commands, select: bool = True) -> None:
    """Two logged-in IMAP sessions of `site`, each sending commands(index) one after the other."""

    async def worker(run, index):
        conn = await imap_login(run, run.target.sites[site], select=select)
        try:
            await imap_commands(run, conn, commands(index))
        finally:
            conn.close()

    await workers(run, 2, worker)


# ------------------------------------------------------------------------- the attacks

ATTACKS: dict[str, tuple[str, Callable[[Run], Awaitable[None]]]] = {}  # name -> (description, attack)


def attack(name: str, description: str):
    def register(fn):
        ATTACKS[name] = (description, fn)
        return fn

    return register


@attack("imap-list-pattern", "LIST/LSUB with wildcard patterns of 28 to 60,000 `*`/`%` (2 connections)")
async def imap_list_pattern(run: Run) -> None:
    await imap_command_loop(run, "attacker", inputs.list_patterns, select=False)


@attack(
    "imap-fetch-many",
    "FETCH 1:* naming thousands of items (ENVELOPE, BODYSTRUCTURE, header fields, "
    "partial bodies) in one 60 KB command, responses read (2 connections)",
)
async def imap_fetch_many(run: Run) -> None:
    await imap_command_loop(run, "attacker", lambda _index: inputs.many_item_fetches())


@attack(
    "imap-fetch-unread",
    "FETCH 1:* of every body 50 times over (~5 GB asked) on 4 connections that never read the response",
)
async def imap_fetch_unread(run: Run) -> None:
    async def worker(run, index):
        conn = await imap_login(run, run.target.sites["attacker"])
        try:
            await conn.send(b"U1 FETCH 1:* (" + b" ".join([b"BODY.PEEK[]"] * 50) + b")\r\n")
            run.tally["connections not reading"] += 1
            await asyncio.sleep(max(0.0, run.left()))
        finally:
            conn.close()

    await workers(run, 4, worker)


@attack(
    "imap-search-deep", "SEARCH with keys nested 1,000-16,000 deep (NOT NOT ..., ((( ))), OR OR ...) (2 connections)"
)
async def imap_search_deep(run: Run) -> None:
    await imap_command_loop(run, "attacker", lambda _index: inputs.deep_searches())


@attack(
    "imap-search-text",
    "HEADER/SUBJECT/BODY/TEXT searches, up to 60 KB needles, over 100 mails of 1 MB with 60 KB headers (2 connections)",
)
async def imap_search_text(run: Run) -> None:
    await imap_command_loop(run, "attacker", lambda _index: inputs.text_searches())


@attack(
    "mime-ingest",
    "SMTP submission of wide (N parts), deep (nested 2,000), dash-run, folded-header "
    "and many-boundary mails (2 sessions)",
)
async def mime_ingest(run: Run) -> None:
    t = run.target
    mails = inputs.hostile_mime_mails(t.domain, t.sites["attacker"], t.sites["attacker-mime"], t.mime_parts)

    async def worker(run, index):
        conn = await smtp_login(run)
        try:
            for number in range(10**9):
                name, mail = mails[(number + index) % len(mails)]
                started = time.monotonic()
                await conn.smtp(b"MAIL FROM:<%s@%s>" % (t.sites["attacker"].encode(), t.domain.encode()))
                await conn.smtp(b"RCPT TO:<%s@%s>" % (t.sites["attacker-mime"].encode(), t.domain.encode()))
                await conn.smtp(b"DATA")
                await conn.send(mail + b".\r\n")
                reply = await conn.smtp_reply()
                run.tally[f"{name} {reply[:3].decode(errors='replace')}"] += 1
                run.timed(started)
        except Ended:
            run.tally["no reply by the end"] += 1
            raise
        finally:
            conn.close()

    await workers(run, 2, worker)


@attack(
    "imap-bodystructure",
    "FETCH BODYSTRUCTURE / ENVELOPE / BODY / deep BODY[1.1.1...] sections of the wide and deep mails (2 connections)",
)
async def imap_bodystructure(run: Run) -> None:
    await imap_command_loop(run, "attacker-mime", lambda _index: inputs.structure_fetches())


GREETING = {"smtp": b"220", "pop3": b"+OK", "imap": b"* OK"}


async def closed_within(run: Run, conn: Line, seconds: float) -> bool:
    """Whether the hub closes the connection within `seconds` (what it sends meanwhile is dropped)."""
    try:
        return await run.within(conn.reader.read(4096), cap=seconds) == b""
    except TimeoutError:
        return False


async def _greeted_or_refused(run: Run, protocol: str) -> Line | None:
    """A new pre-login connection that was greeted, or None (tallied: refused, no reply, ...)."""
    try:
        conn = await open_line(run, getattr(run.target, protocol))
    except (TimeoutError, OSError) as e:
        run.tally[f"{protocol} {_kind(e)}"] += 1
        return None
    try:
        greeting = await conn.line(cap=10)
    except (TimeoutError, OSError, ConnectionError) as e:
        run.tally[f"{protocol} {_kind(e)}"] += 1
        conn.close()
        return None
    if not greeting.startswith(GREETING[protocol]):
        run.tally[f"{protocol} refused"] += 1
        conn.close()
        return None
    run.tally[f"{protocol} held"] += 1
    return conn


async def _keep(run: Run, protocol: str, conn: Line, trickle: bytes | None) -> None:
    """Stay idle (or send one byte of `trickle` a second) until the deadline or the hub closes."""
    try:
        for sent in itertools.count():
            if trickle is not None:
                await conn.send(trickle[sent % len(trickle) :][:1])
            if await closed_within(run, conn, 1.0 if trickle else run.left()):
                run.tally[f"{protocol} closed by hub"] += 1
                return
    except Ended:
        pass
    except (OSError, ConnectionError) as e:
        run.tally[f"{protocol} {_kind(e)}"] += 1
    finally:
        conn.close()


async def _hold_all(run: Run, trickles: dict) -> None:
    """Open `connections` per protocol (all of them first), then keep each until the deadline."""
    protocols = [p for _ in range(run.target.connections) for p in ("smtp", "pop3", "imap")]
    try:
        conns = await run.within(asyncio.gather(*(_greeted_or_refused(run, p) for p in protocols)))
    except Ended:
        run.tally["still connecting at the end"] += 1
        return
    await asyncio.gather(*(_keep(run, p, conn, trickles[p]) for p, conn in zip(protocols, conns) if conn))


@attack(
    "idle-prelogin",
    "N connections per protocol (SMTP, POP3, IMAP) from one address that read the greeting and then say nothing",
)
async def idle_prelogin(run: Run) -> None:
    await _hold_all(run, {"smtp": None, "pop3": None, "imap": None})


@attack(
    "slow-prelogin",
    "N connections per protocol from one address trickling one byte a second of a "
    "command line that never ends (EHLO / USER / LOGIN)",
)
async def slow_prelogin(run: Run) -> None:
    await _hold_all(
        run, {"smtp": b"EHLO " + b"s" * 4000, "pop3": b"USER " + b"u" * 4000, "imap": b"a LOGIN " + b"x" * 4000}
    )


@attack(
    "conn-flood",
    "connect, read the greeting, disconnect, as fast as possible to all three protocols "
    "from one address (60 at a time)",
)
async def conn_flood(run: Run) -> None:
    protocols = ("smtp", "pop3", "imap")

    async def worker(run, index):
        protocol = protocols[index % 3]
        conn = await open_line(run, getattr(run.target, protocol))
        try:
            greeting = await conn.line(cap=5)
            run.tally[f"{protocol} {'greeted' if greeting.startswith(GREETING[protocol]) else 'refused'}"] += 1
        finally:
            conn.close()

    await workers(run, 60, worker)


def _auth_attempts(run: Run, protocol: str, account: str, password: str) -> list[tuple[bytes, bytes]]:
    """The lines of one login attempt, each with the reply prefix that means it went through."""
    if protocol == "smtp":
        token = base64.b64encode(b"\0%s\0%s" % (account.encode(), password.encode()))
        return [(b"AUTH PLAIN " + token, b"235")]
    if protocol == "pop3":
        return [(b"USER " + account.encode(), b"+OK"), (b"PASS " + password.encode(), b"+OK")]
    return [(b"a LOGIN %s %s" % (account.encode(), password.encode()), b"a OK")]


async def try_login(run: Run, conn: Line, protocol: str, account: str, password: str) -> bool:
    """One login attempt on an open connection: True if accepted."""
    for line, good in _auth_attempts(run, protocol, account, password):
        await conn.send(line + b"\r\n")
        while True:
            reply = await conn.smtp_reply() if protocol == "smtp" else await conn.line()
            if not reply.startswith(b"* "):
                break
        if not reply.startswith(good):
            return False
    return True


async def greeted(run: Run, protocol: str, source: str | None = None) -> Line:
    """A connection past the greeting (and, for SMTP, EHLO); ConnectionError if refused."""
    conn = await open_line(run, getattr(run.target, protocol), source)
    greeting = await (conn.smtp_reply(cap=10) if protocol == "smtp" else conn.line(cap=10))
    if not greeting.startswith(GREETING[protocol]):
        conn.close()
        raise ConnectionError("closed by the hub at the greeting")
    if protocol == "smtp":
        await conn.smtp(b"EHLO attacker.test")
    return conn


@attack(
    "auth-flood",
    "wrong passwords over SMTP AUTH, POP3 USER/PASS and IMAP LOGIN, 50 connections per "
    "protocol from one address, for the good sites' accounts, the attacker's own and a "
    "made-up one; then the attacker's right password from the same address",
)
async def auth_flood(run: Run) -> None:
    sites = run.target.sites
    accounts = [sites["pop3"], sites["imap"], sites["sender"], sites["attacker"], "no-such-site"]
    protocols = ("smtp", "pop3", "imap")
    final = min(3.0, run.target.duration / 4)  # seconds kept at the end for the right-password check
    flood = Run(run.target, run.deadline - final, run.tally)

    async def worker(flood, index):
        protocol = protocols[index % 3]
        conn = await greeted(flood, protocol)
        try:
            for number in range(10**9):
                account = accounts[(number + index) % len(accounts)]
                started = time.monotonic()
                try:
                    accepted = await try_login(flood, conn, protocol, account, f"wrong-{index}-{number}")
                except Ended:
                    flood.tally[f"{protocol} unanswered at the end"] += 1
                    raise
                flood.tally[f"{protocol} {'ACCEPTED' if accepted else 'failed'}"] += 1
                flood.timed(started)
        finally:
            conn.close()

    await workers(flood, 150, worker)
    for protocol in protocols:
        try:
            conn = await greeted(run, protocol)
            ok = await try_login(run, conn, protocol, sites["attacker"], run.target.password)
            run.tally[f"right password then: {protocol} {'accepted' if ok else 'refused'}"] += 1
            conn.close()
        except (TimeoutError, OSError, ConnectionError, Ended) as e:
            run.tally[f"right password then: {protocol} {_kind(e)}"] += 1
    run.slowest, run.received = flood.slowest, flood.received


@attack(
    "smtp-malformed",
    "malformed SMTP of every kind (commands, paths, parameters, AUTH lines, NULs, "
    "8-bit, 100 KB lines) over 4 connections, reconnecting when closed",
)
async def smtp_malformed(run: Run) -> None:
    lines = inputs.malformed_smtp(run.target.domain)

    async def worker(run, index):
        conn = await greeted(run, "smtp")
        try:
            for number in range(index * 37, 10**9):
                started = time.monotonic()
                reply = await conn.smtp(lines[number % len(lines)], cap=10)
                run.tally[reply[:1].decode(errors="replace") + "xx"] += 1
                run.timed(started)
                if reply.startswith(b"421"):
                    return
        finally:
            conn.close()

    await workers(run, 4, worker)


@attack(
    "smtp-stalled-data",
    "N authenticated sessions (several addresses) each sending 1.9 MB of DATA, then stalling mid-DATA until the end",
)
async def smtp_stalled_data(run: Run) -> None:
    t = run.target
    chunk = inputs.data_filler(1_900_000)

    async def one(index):
        source = t.sources[index % len(t.sources)]
        try:
            conn = await smtp_login(run, source)
        except (TimeoutError, OSError, ConnectionError, Ended) as e:
            run.tally[f"not started ({_kind(e)})"] += 1
            return
        try:
            await conn.smtp(b"MAIL FROM:<%s@%s>" % (t.sites["attacker"].encode(), t.domain.encode()))
            reply = await conn.smtp(b"RCPT TO:<%s@%s>" % (t.sites["sink"].encode(), t.domain.encode()))
            if not reply.startswith(b"250"):
                run.tally[f"RCPT {reply[:3].decode(errors='replace')}"] += 1
                return
            await conn.smtp(b"DATA")
            await conn.send(chunk)
            run.tally["stalled mid-DATA"] += 1
            if await run.within(conn.reader.read(4096)) == b"":
                run.tally["closed by hub"] += 1
        except Ended:
            pass
        except (TimeoutError, OSError, ConnectionError) as e:
            run.tally[_kind(e)] += 1
        finally:
            conn.close()

    await asyncio.gather(*(one(i) for i in range(t.stalled_sessions)))


@attack(
    "http-slow",
    "the metrics port: N connections trickling request headers one byte a second, plus "
    "requests with 1 MB header lines and 10,000 headers, read (slowloris)",
)
async def http_slow(run: Run) -> None:
    if run.target.metrics is None:
        run.tally["skipped: no metrics port"] += 1
        return

    async def slow(index):
        """One slowloris connection: tallies how it ended (the hub's status line, closed, still open)."""
        try:
            conn = await open_line(run, run.target.metrics)
        except Ended:
            run.tally["slow: still connecting at the end"] += 1
            return
        except (TimeoutError, OSError) as e:
            run.tally[f"slow: connect {_kind(e)}"] += 1
            return
        try:
            await conn.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            while True:
                await conn.send(b"X")
                try:
                    data = await run.within(conn.reader.read(4096), cap=1.0)
                except TimeoutError:
                    continue
                status = data.split(b" ")[1].decode(errors="replace") if data.startswith(b"HTTP/") else None
                run.tally[f"slow: answered {status}" if status else "slow: closed by hub"] += 1
                return
        except Ended:
            run.tally["slow: still open at the end"] += 1
        except (OSError, ConnectionError) as e:
            run.tally[f"slow: {_kind(e)}"] += 1
        finally:
            conn.close()

    async def big(run, index):
        conn = await open_line(run, run.target.metrics)
        try:
            await conn.send(inputs.big_http_requests()[index % 2])
            reply = await conn.line(cap=10)
            run.tally["big: " + (reply.split(b" ")[1].decode(errors="replace") if b" " in reply else "?")] += 1
        finally:
            conn.close()

    async def slow_all():
        await asyncio.gather(*(slow(i) for i in range(run.target.connections)))

    await asyncio.gather(slow_all(), workers(run, 2, big))


# ------------------------------------------------------------------------- the child process


def note(run: Run) -> str:
    parts = [f"{key} {count}" for key, count in sorted(run.tally.items())]
    if run.slowest:
        parts.append(f"slowest reply {run.slowest:.1f} s")
    if run.received >= 1_000_000:
        parts.append(f"{run.received / 1e6:.0f} MB received")
    return "; ".join(parts) or "-"


async def execute(name: str, target: Target) -> dict:
    run = Run(target, time.monotonic() + target.duration)
    try:
        await ATTACKS[name][1](run)
    except Ended:
        pass
    return {"attack": name, "tally": dict(run.tally), "slowest": run.slowest, "note": note(run)}


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] not in ATTACKS:
        sys.exit(
            "usage: python -m bench.abuse_attacks ATTACK TARGET_JSON (started by bench.abuse, which see)\n"
            f"attacks: {', '.join(sorted(ATTACKS))}"
        )
    name, spec = sys.argv[1], json.loads(sys.argv[2])
    result = asyncio.run(execute(name, Target(**spec)))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
