# POP3 server protocol core for DICOM Mail Hub -- sans-I/O, in the style of h11.
#
# What it is for: turning the bytes a POP3 client sends into reply bytes and into
# events that a thin adapter (asyncio, written elsewhere) acts on.  Standards:
# RFC 1939 (POP3), RFC 2449 (CAPA, RESP-CODES, PIPELINING), RFC 3206 ([AUTH],
# [SYS/...] codes), RFC 5034 + RFC 4616 (AUTH PLAIN), RFC 2595 (STLS).
#
# What it must NEVER do: any I/O.  No sockets, no asyncio, no files, no database,
# no sleeping, no clock, no logging.  It must never raise because of anything a
# client sends; only misuse by the adapter raises Pop3ProtocolError.
#
# Adapter loop (sequential; PAUSED is only seen if the adapter asks for the next
# event before finishing the work an event asked for -- do not read while paused):
#
#     send(conn.initial_bytes())
#     while (ev := conn.next_event()) is not CLOSED:
#         NEED_DATA        -> conn.receive_data(await read())   # b"" at EOF
#         SendBytes        -> send(ev.data)
#         AuthRequest      -> check credentials, lock the maildrop; BEFORE sending a
#                             failure reply sleep (e.g. 1 + ev.failed_so_far s); then
#                             send(conn.auth_result(ok, in_use, maildrop))
#         StartTls         -> upgrade the transport, then conn.tls_started()
#         CheckMessage     -> check the stored message can be served whole (RETR, TOP), then
#                             send(conn.check_result(problem)): None -> "+OK" and a
#                             SendMessage follows; a reason -> "-ERR [SYS/PERM] ..."
#         SendMessage      -> stream the message (relay.framing.dot_stuff() when has_dot_lines,
#                             else sendfile; TopFilter for TOP), then message_terminator(),
#                             then conn.message_sent()
#         Update           -> delete ev.deleted, send(conn.update_result(ok))
#         CloseConnection  -> flush and close
#     Whatever happens, unlock the maildrop on close.  Without Update nothing is
#     deleted (RFC 1939: a session ending without QUIT never enters UPDATE).
from __future__ import annotations

import base64
import binascii
import enum
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = [
    "Pop3Connection",
    "Pop3ProtocolError",
    "State",
    "MaildropEntry",
    "SendBytes",
    "AuthRequest",
    "StartTls",
    "CheckMessage",
    "SendMessage",
    "Update",
    "CloseConnection",
    "NEED_DATA",
    "PAUSED",
    "CLOSED",
    "TopFilter",
    "system_error",
]

IMPLEMENTATION = "DICOM-Mail-Hub"

# Limits on what one client can make a connection hold (docs/limits.md). Past MAX_LINE a line gets
# "-ERR line too long" and is skipped without being buffered; past the buffered limit (complete
# lines received but not answered yet: pipelining) "-ERR too much pipelined input" and close.
MAX_LINE = 1024  # octets of a command or SASL line, CRLF included (RFC 2449: 255)
PRE_LOGIN_MAX_BUFFERED = 4 * 1024  # unanswered lines before login (CAPA, USER, PASS need < 1 KB)
MAX_BUFFERED = 128 * 1024  # after login


class Pop3ProtocolError(Exception):
    """The adapter used the core wrongly.  Never raised because of client input."""


@dataclass(frozen=True)
class MaildropEntry:
    uid: str  # UIDL value: 1..70 characters 0x21..0x7E, unique in the maildrop
    size: int  # octets in canonical CRLF form, as STAT/LIST report
    has_dot_lines: bool  # some line starts with "." -> the adapter must dot_stuff()
    ref: object = None  # opaque handle for the adapter


# ---- events ----------------------------------------------------------------


@dataclass(frozen=True)
class SendBytes:
    data: bytes


@dataclass(frozen=True)
class AuthRequest:
    """Check user/password.  failed_so_far counts earlier failures on this
    connection so the adapter can sleep before a failure reply."""

    user: str
    password: str = field(repr=False)
    failed_so_far: int = 0


@dataclass(frozen=True)
class StartTls:
    pass


@dataclass(frozen=True)
class CheckMessage:
    """Before "+OK" (RETR, TOP): may the message be served? Answer with check_result()."""

    entry: MaildropEntry
    body_lines: int | None


@dataclass(frozen=True)
class SendMessage:
    entry: MaildropEntry
    body_lines: int | None  # None: RETR (whole message); n: TOP (header + n body lines)


@dataclass(frozen=True)
class Update:
    deleted: list[MaildropEntry]


@dataclass(frozen=True)
class CloseConnection:
    pass


# what next_event() gives besides the sentinels below
Event = SendBytes | AuthRequest | StartTls | CheckMessage | SendMessage | Update | CloseConnection


class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")  # feed more bytes with receive_data()
PAUSED = _Sentinel("PAUSED")  # waiting for auth_result/tls_started/message_sent/update_result
CLOSED = _Sentinel("CLOSED")  # the session is over


class State(enum.Enum):
    AUTHORIZATION = "AUTHORIZATION"
    USER_GIVEN = "USER_GIVEN"  # after USER: only an immediately following PASS logs in
    SASL_PLAIN = "SASL_PLAIN"  # "+ " sent, the next line is the AUTH PLAIN response
    AUTH_PENDING = "AUTH_PENDING"  # AuthRequest emitted, waiting for auth_result()
    TLS_PENDING = "TLS_PENDING"  # StartTls emitted, waiting for tls_started()
    TRANSACTION = "TRANSACTION"
    CHECKING = "CHECKING"  # CheckMessage emitted, waiting for check_result()
    SENDING = "SENDING"  # SendMessage emitted, waiting for message_sent()
    UPDATE = "UPDATE"  # Update emitted, waiting for update_result()
    CLOSED = "CLOSED"


# ---- the state table -------------------------------------------------------
# (state, trigger) -> {outcome: next state}.  A trigger is a command verb, one of
# the <pseudo> inputs below, or the name of an adapter method.  A command is valid
# in a state exactly when (state, verb) is a key here; every state change goes
# through this table.
#   <sasl-line>  a line read while in SASL_PLAIN      <too-long>  line over the limit
#   <bad>        unknown/wrong-state/garbled command  <overflow>  too much pipelined input
#   <eof>        client closed its side (no UPDATE)
A, U, S = State.AUTHORIZATION, State.USER_GIVEN, State.SASL_PLAIN
AP, TP, T = State.AUTH_PENDING, State.TLS_PENDING, State.TRANSACTION
SND, UPD, X, CHK = State.SENDING, State.UPDATE, State.CLOSED, State.CHECKING
_AUTH_OUTCOMES = {"list": A, "challenge": S, "request": AP, "err": A}
_TRANSITIONS: dict[tuple[State, str], dict[str, State]] = {
    (A, "CAPA"): {"ok": A, "err": A},
    (A, "USER"): {"ok": U, "err": A},
    (A, "AUTH"): _AUTH_OUTCOMES,
    (A, "STLS"): {"ok": TP, "err": A},
    (A, "QUIT"): {"ok": X, "err": A},
    (U, "CAPA"): {"ok": A, "err": A},  # anything but PASS forgets the USER name
    (U, "USER"): {"ok": U, "err": A},
    (U, "PASS"): {"request": AP, "err": A},
    (U, "AUTH"): _AUTH_OUTCOMES,
    (U, "STLS"): {"ok": TP, "err": A},
    (U, "QUIT"): {"ok": X, "err": A},
    (S, "<sasl-line>"): {"request": AP, "err": A},
    (AP, "auth_result"): {"ok": T, "err": A, "close": X},
    (TP, "tls_started"): {"ok": A},
    **{(T, verb): {"ok": T, "err": T} for verb in ("CAPA", "STAT", "LIST", "UIDL", "DELE", "RSET", "NOOP")},
    (T, "RETR"): {"check": CHK, "err": T},
    (T, "TOP"): {"check": CHK, "err": T},
    (CHK, "check_result"): {"send": SND, "err": T},
    (T, "QUIT"): {"update": UPD, "err": T},
    (SND, "message_sent"): {"ok": T},
    (UPD, "update_result"): {"ok": X},
    **{(st, "<bad>"): {"err": A} for st in (A, U, S)},
    **{(st, "<too-long>"): {"err": A} for st in (A, U, S)},
    **{(st, "<overflow>"): {"close": X} for st in (A, U, S, T)},
    **{(st, "<eof>"): {"ok": X} for st in (A, U, S, T)},
    (T, "<bad>"): {"err": T},
    (T, "<too-long>"): {"err": T},
}
del A, U, S, AP, TP, T, SND, UPD, X, CHK
_WAITING = {State.AUTH_PENDING, State.TLS_PENDING, State.CHECKING, State.SENDING, State.UPDATE}
_VERBS = {verb for (_, verb) in _TRANSITIONS if verb.isalpha()}
_TOO_LONG, _OVERFLOW = _Sentinel("<too-long>"), _Sentinel("<overflow>")
_DIGITS = re.compile(rb"[0-9]{1,20}")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_UID = re.compile(r"[\x21-\x7e]{1,70}")
_HOST = re.compile(r"[\x21-\x7e]{1,255}")


class Pop3Connection:
    def __init__(
        self,
        *,
        greeting_host: str,
        stls_available: bool,
        plaintext_login_allowed: bool,
        max_line_length: int = MAX_LINE,
        max_failed_logins: int = 3,
        max_buffered_bytes: int = MAX_BUFFERED,
        max_buffered_before_login: int = PRE_LOGIN_MAX_BUFFERED,
    ) -> None:
        if not _HOST.fullmatch(greeting_host):
            raise ValueError("greeting_host must be printable ASCII without spaces")
        if max_line_length < 64 or max_failed_logins < 1 or max_buffered_bytes < max_line_length:
            raise ValueError("limits too small")
        self._host = greeting_host
        self._stls_available = stls_available
        self._plaintext_ok = plaintext_login_allowed
        self._max_line = max_line_length  # including CRLF
        self._max_failed = max_failed_logins
        self._max_buffered_after_login = max_buffered_bytes
        self._max_buffered = min(max_buffered_bytes, max(max_line_length, max_buffered_before_login))
        # complete lines queued, not yet answered (the lower limit until login)
        self._state = State.AUTHORIZATION
        self._tls_active = False
        self._failed = 0
        self._user: str | None = None
        self._maildrop: list[MaildropEntry] = []
        self._deleted: set[int] = set()  # 0-based indexes
        self._checking: tuple[int, MaildropEntry, int | None] | None = None  # (number, entry, body_lines)
        self._out: deque[Event] = deque()
        self._reset_input()
        self._last_verb = ""  # of the last known command (`mailhub sessions`; never its arguments)

    # ---- properties for the adapter ----------------------------------------
    @property
    def state(self) -> State:
        return self._state

    @property
    def last_command(self) -> str:
        """The verb of the last command received (a known verb only, no arguments), or ""."""
        return self._last_verb

    @property
    def tls_active(self) -> bool:
        return self._tls_active

    @property
    def buffered_bytes(self) -> int:
        return self._queued + len(self._partial)

    def initial_bytes(self) -> bytes:
        return f"+OK {self._host} POP3 server ready\r\n".encode()

    # ---- input ---------------------------------------------------------------
    def _reset_input(self) -> None:
        self._lines: deque[bytes | _Sentinel] = deque()  # complete lines (LF removed), _TOO_LONG, _OVERFLOW
        self._queued = 0
        self._partial = bytearray()
        self._discarding = False
        self._overflowed = False
        self._eof = False

    def receive_data(self, data: bytes) -> None:
        """Buffer client bytes; b"" means the client closed its side."""
        if self._state in (State.CLOSED, State.TLS_PENDING) or self._eof or self._overflowed:
            return  # bytes after STLS and before the handshake are dropped (RFC 2595 sec. 4)
        if not data:
            self._eof = True
            return
        data = bytes(data)
        pos, end = 0, len(data)
        while pos < end and not self._overflowed:
            nl = data.find(b"\n", pos)
            stop = end if nl < 0 else nl
            if not self._discarding:
                if len(self._partial) + (stop - pos) > self._max_line - 1:  # no room for LF
                    self._partial.clear()
                    self._discarding = True
                    self._queue(_TOO_LONG)
                else:
                    self._partial += data[pos:stop]
                    if nl >= 0:
                        self._queue(bytes(self._partial))
                        self._partial.clear()
            if nl < 0:
                break
            self._discarding = False
            pos = nl + 1

    def _queue(self, item: bytes | _Sentinel) -> None:
        size = len(item) + 1 if isinstance(item, bytes) else 0  # + the LF
        if self._queued + size > self._max_buffered:
            self._lines.append(_OVERFLOW)
            self._overflowed = True
            self._partial.clear()
            return
        self._queued += size
        self._lines.append(item)

    # ---- output ------------------------------------------------------------
    def next_event(self) -> Event | _Sentinel:
        while True:
            if self._out:
                return self._out.popleft()
            if self._state is State.CLOSED:
                return CLOSED
            if self._state in _WAITING:
                return PAUSED
            if self._lines:
                item = self._lines.popleft()
                if isinstance(item, bytes):
                    self._queued -= len(item) + 1
                self._process(item)
            elif self._eof:
                self._go("<eof>", "ok")
            else:
                return NEED_DATA

    def _go(self, trigger: str, outcome: str) -> None:
        try:
            self._state = _TRANSITIONS[(self._state, trigger)][outcome]
        except KeyError:
            raise Pop3ProtocolError(f"{trigger}/{outcome} not allowed in state {self._state.name}") from None

    def _require(self, trigger: str) -> None:
        if (self._state, trigger) not in _TRANSITIONS:
            raise Pop3ProtocolError(f"{trigger}() called in state {self._state.name}")

    def _send(self, text: str) -> None:
        self._out.append(SendBytes(text.encode()))

    def _err(self, text: str) -> str:
        self._send(f"-ERR {text}\r\n")
        return "err"

    def _process(self, item: bytes | _Sentinel) -> None:
        if item is _TOO_LONG:
            self._err("line too long")
            return self._go("<too-long>", "err")
        if item is _OVERFLOW:
            self._err("too much pipelined input")
            self._out.append(CloseConnection())
            return self._go("<overflow>", "close")
        assert isinstance(item, bytes)  # the only sentinels queued are the two above
        line = item[:-1] if item.endswith(b"\r") else item
        if _CONTROL.search(line):
            self._err("invalid characters in command")
            return self._go("<bad>", "err")
        if self._state is State.SASL_PLAIN:
            outcome = self._err("authentication cancelled") if line == b"*" else self._plain(line)
            return self._go("<sasl-line>", outcome)
        verb_b, _, rest = line.partition(b" ")
        verb = verb_b.upper().decode("ascii") if verb_b.isascii() else ""
        if verb in _VERBS:
            self._last_verb = verb
        if (self._state, verb) in _TRANSITIONS:
            args = [a for a in rest.split(b" ") if a]
            handler = getattr(self, "_cmd_" + verb.lower())
            return self._go(verb, handler(rest if verb == "PASS" else args))
        if verb == "PASS" and self._state is not State.TRANSACTION:
            self._err("PASS must follow USER")
        elif verb in _VERBS:
            where = "after" if self._state is State.TRANSACTION else "before"
            self._err(f"{verb} not allowed {where} login")
        else:
            self._err("unknown command")
        self._go("<bad>", "err")

    # ---- AUTHORIZATION ------------------------------------------------------
    def _login_allowed(self) -> bool:
        return self._plaintext_ok or self._tls_active

    def _refuse_plaintext(self) -> str:
        if self._stls_available:
            return self._err("[AUTH] plaintext login refused; use STLS")
        return self._err("[AUTH] plaintext login refused")

    def _no_args(self, verb: str, args: list[bytes]) -> bool:
        if args:
            self._err(f"{verb} takes no arguments")
        return not args

    def _cmd_capa(self, args: list[bytes]) -> str:
        if not self._no_args("CAPA", args):
            return "err"
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self._state is not State.TRANSACTION:
            if self._login_allowed():
                caps += ["USER", "SASL PLAIN"]
            if self._stls_available and not self._tls_active:
                caps.append("STLS")
        caps.append("IMPLEMENTATION " + IMPLEMENTATION)
        self._send("+OK Capability list follows\r\n" + "".join(c + "\r\n" for c in caps) + ".\r\n")
        return "ok"

    def _cmd_user(self, args: list[bytes]) -> str:
        if not self._login_allowed():
            return self._refuse_plaintext()
        if len(args) != 1:
            return self._err("USER requires exactly one argument")
        try:
            self._user = args[0].decode("utf-8")
        except UnicodeDecodeError:
            return self._err("user name is not valid UTF-8")
        self._send("+OK send PASS\r\n")
        return "ok"

    def _cmd_pass(self, rest: bytes) -> str:
        user, self._user = self._user, None
        assert user is not None  # PASS is a command only right after USER (State.USER_GIVEN)
        if not rest:
            return self._err("PASS requires a password")
        try:
            password = rest.decode("utf-8")
        except UnicodeDecodeError:
            return self._err("password is not valid UTF-8")
        return self._auth_request(user, password)

    def _auth_request(self, user: str, password: str) -> str:
        self._out.append(AuthRequest(user, password, self._failed))
        return "request"

    def _cmd_auth(self, args: list[bytes]) -> str:
        if not args:
            self._send("+OK\r\n" + ("PLAIN\r\n" if self._login_allowed() else "") + ".\r\n")
            return "list"
        if args[0].upper() != b"PLAIN":
            return self._err("unsupported authentication mechanism")
        if len(args) > 2:
            return self._err("too many arguments")
        if not self._login_allowed():
            return self._refuse_plaintext()
        if len(args) == 1:
            self._send("+ \r\n")
            return "challenge"
        return self._plain(args[1])

    def _plain(self, b64: bytes) -> str:
        try:
            data = b"" if b64 == b"=" else base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            return self._err("invalid base64")
        parts = data.split(b"\0")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            return self._err("malformed PLAIN response")
        try:
            authz, user, password = (p.decode("utf-8") for p in parts)
        except UnicodeDecodeError:
            return self._err("credentials are not valid UTF-8")
        if authz and authz != user:
            return self._err("authorization identity must be empty or the user name")
        return self._auth_request(user, password)

    def _cmd_stls(self, args: list[bytes]) -> str:
        if not self._no_args("STLS", args):
            return "err"
        if self._tls_active:
            return self._err("TLS already active")
        if not self._stls_available:
            return self._err("STLS not available")
        self._send("+OK Begin TLS negotiation\r\n")
        self._out.append(StartTls())
        return "ok"

    def _cmd_quit(self, args: list[bytes]) -> str:
        if not self._no_args("QUIT", args):
            return "err"
        if self._state is State.TRANSACTION:
            self._out.append(Update([e for i, e in enumerate(self._maildrop) if i in self._deleted]))
            return "update"
        self._send(f"+OK {self._host} POP3 server signing off\r\n")
        self._out.append(CloseConnection())
        return "ok"

    # ---- adapter results ----------------------------------------------------
    def auth_result(
        self, ok: bool, in_use: bool = False, maildrop: list[MaildropEntry] | None = None, temporary: str | None = None
    ) -> bytes:
        """Answer an AuthRequest.  in_use: credentials fine but the maildrop is locked.
        temporary: the login was refused unchecked for this reason (e.g. too many failures from
        the client's address); it counts as a failure but says [SYS/TEMP]."""
        self._require("auth_result")
        if temporary is not None and not ok:
            self._failed += 1
            reply = "-ERR [SYS/TEMP] " + _CONTROL.sub(b"", temporary.encode("ascii", "replace")).decode("ascii")
            outcome = "err"
            if self._failed >= self._max_failed:
                outcome = "close"
                self._out.append(CloseConnection())
        elif in_use:
            reply, outcome = "-ERR [IN-USE] maildrop already locked", "err"
        elif ok:
            if maildrop is None:
                raise Pop3ProtocolError("auth_result(ok=True) needs the maildrop")
            entries = list(maildrop)
            for e in entries:
                if (
                    not isinstance(e, MaildropEntry)
                    or not _UID.fullmatch(e.uid)
                    or not isinstance(e.size, int)
                    or e.size < 0
                ):
                    raise Pop3ProtocolError(f"bad maildrop entry {e!r}")
            if len({e.uid for e in entries}) != len(entries):
                raise Pop3ProtocolError("duplicate UIDs in maildrop")
            self._maildrop, self._deleted = entries, set()
            self._max_buffered = self._max_buffered_after_login
            reply, outcome = "+OK " + self._summary(), "ok"
        else:
            self._failed += 1
            if self._failed >= self._max_failed:
                reply, outcome = "-ERR [AUTH] too many failures", "close"
                self._out.append(CloseConnection())
            else:
                reply, outcome = "-ERR [AUTH] invalid user name or password", "err"
        self._go("auth_result", outcome)
        return (reply + "\r\n").encode()

    def tls_started(self) -> None:
        """The transport is now TLS: forget everything read before (RFC 2595)."""
        self._require("tls_started")
        self._tls_active = True
        self._user = None
        self._reset_input()
        self._go("tls_started", "ok")

    def check_result(self, problem: str | None, gone: bool = False, temporary: bool = False) -> bytes:
        """Answer a CheckMessage: None when the message can be served (its "+OK" is returned and a
        SendMessage follows), else why not: it is refused with [SYS/PERM] before any byte of it
        (`gone`: it was removed from the mailbox since the session began, by the hub's operator or
        its expiry; it stays listed until QUIT, as RFC 1939 keeps the maildrop), or with [SYS/TEMP]
        when the mail store cannot be reached now (`temporary`: the mail is not at fault)."""
        self._require("check_result")
        assert self._checking is not None  # set with the CheckMessage (State.CHECKING)
        n, entry, body_lines = self._checking
        self._checking = None
        if problem is None:
            self._out.append(SendMessage(entry, body_lines))
            self._go("check_result", "send")
            return f"+OK {entry.size} octets\r\n".encode()
        self._go("check_result", "err")
        if gone:
            return f"-ERR [SYS/PERM] message {n} was removed from the mailbox on the server; delete it\r\n".encode()
        text = _CONTROL.sub(b"", problem.encode("ascii", "replace")).decode("ascii")[:200]
        if temporary:
            return f"-ERR [SYS/TEMP] message {n} cannot be read now ({text}); try again later\r\n".encode()
        return f"-ERR [SYS/PERM] message {n} is damaged on the server ({text}); delete it\r\n".encode()

    def message_sent(self) -> None:
        self._require("message_sent")
        self._go("message_sent", "ok")

    def update_result(self, ok: bool) -> bytes:
        self._require("update_result")
        if ok:
            left = len(self._maildrop) - len(self._deleted)
            reply = f"+OK {self._host} POP3 server signing off ({left} messages left)"
        else:
            reply = "-ERR [SYS/TEMP] some deleted messages not removed"
        self._out.append(CloseConnection())
        self._go("update_result", "ok")
        return (reply + "\r\n").encode()

    # ---- TRANSACTION --------------------------------------------------------
    def _live(self) -> list[tuple[int, MaildropEntry]]:
        return [(i + 1, e) for i, e in enumerate(self._maildrop) if i not in self._deleted]

    def _summary(self) -> str:
        live = self._live()
        return f"maildrop has {len(live)} messages ({sum(e.size for _, e in live)} octets)"

    def _message(self, arg: bytes) -> tuple[int, MaildropEntry] | None:
        """Resolve a message number, or queue the -ERR and return None."""
        n = int(arg) if _DIGITS.fullmatch(arg) else 0
        if not 1 <= n <= len(self._maildrop):
            self._err("no such message")
            return None
        if n - 1 in self._deleted:
            self._err(f"message {n} already deleted")
            return None
        return n, self._maildrop[n - 1]

    def _one_message(self, verb: str, args: list[bytes]) -> tuple[int, MaildropEntry] | None:
        if len(args) != 1:
            self._err(f"{verb} requires one message number")
            return None
        return self._message(args[0])

    def _cmd_stat(self, args: list[bytes]) -> str:
        if not self._no_args("STAT", args):
            return "err"
        live = self._live()
        self._send(f"+OK {len(live)} {sum(e.size for _, e in live)}\r\n")
        return "ok"

    def _listing(self, verb: str, args: list[bytes], value: Callable[[MaildropEntry], object]) -> str:
        if len(args) > 1:
            return self._err("too many arguments")
        if args:
            found = self._message(args[0])
            if found is None:
                return "err"
            self._send(f"+OK {found[0]} {value(found[1])}\r\n")
            return "ok"
        head = f"+OK {self._summary()}\r\n" if verb == "LIST" else "+OK\r\n"
        self._send(head + "".join(f"{n} {value(e)}\r\n" for n, e in self._live()) + ".\r\n")
        return "ok"

    def _cmd_list(self, args: list[bytes]) -> str:
        return self._listing("LIST", args, lambda e: e.size)

    def _cmd_uidl(self, args: list[bytes]) -> str:
        return self._listing("UIDL", args, lambda e: e.uid)

    def _cmd_retr(self, args: list[bytes]) -> str:
        found = self._one_message("RETR", args)
        if found is None:
            return "err"
        return self._check(*found, None)

    def _check(self, n: int, entry: MaildropEntry, body_lines: int | None) -> str:
        self._checking = (n, entry, body_lines)
        self._out.append(CheckMessage(entry, body_lines))
        return "check"

    def _cmd_top(self, args: list[bytes]) -> str:
        if len(args) != 2:
            return self._err("TOP requires a message number and a line count")
        found = self._message(args[0])
        if found is None:
            return "err"
        if not _DIGITS.fullmatch(args[1]):
            return self._err("invalid line count")
        return self._check(*found, int(args[1]))

    def _cmd_dele(self, args: list[bytes]) -> str:
        found = self._one_message("DELE", args)
        if found is None:
            return "err"
        self._deleted.add(found[0] - 1)
        self._send(f"+OK message {found[0]} deleted\r\n")
        return "ok"

    def _cmd_rset(self, args: list[bytes]) -> str:
        if not self._no_args("RSET", args):
            return "err"
        self._deleted.clear()
        self._send(f"+OK {self._summary()}\r\n")
        return "ok"

    def _cmd_noop(self, args: list[bytes]) -> str:
        if not self._no_args("NOOP", args):
            return "err"
        self._send("+OK\r\n")
        return "ok"


# ---- pure helpers for streaming a message (used by the adapter) -------------


def system_error(reason: str, code: str | None = "SYS/TEMP") -> bytes:
    """The reply for a connection the adapter ends on its own (too many connections, shutting
    down, login timeout, internal error): send it instead of the greeting or the next reply, then
    close. `code` is the RFC 2449/3206 response code (None: none)."""
    text = _CONTROL.sub(b"", reason.encode("ascii", "replace")).decode("ascii")
    return (f"-ERR [{code}] {text}\r\n" if code else f"-ERR {text}\r\n").encode()


class TopFilter:
    """Cut a message to its header, the blank line after it, and the first
    body_lines lines of the body (POP3 TOP), fed chunk by chunk.  Once done is
    True the adapter can stop reading; further feed() calls return b""."""

    def __init__(self, body_lines: int) -> None:
        if body_lines < 0:
            raise ValueError("body_lines must be >= 0")
        self._left = body_lines
        self._in_header = True
        self._line_len = 0  # bytes of the current header line so far, LF excluded
        self._first_cr = False  # the current header line starts with CR
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def _piece(self, chunk: bytes, start: int, stop: int) -> None:
        if stop > start:
            if self._line_len == 0:
                self._first_cr = chunk[start] == 0x0D
            self._line_len += stop - start

    def feed(self, chunk: bytes) -> bytes:
        if self._done or not chunk:
            return b""
        pos = 0
        while self._in_header:
            nl = chunk.find(b"\n", pos)
            if nl < 0:
                self._piece(chunk, pos, len(chunk))
                return chunk
            self._piece(chunk, pos, nl)
            blank = self._line_len == 0 or (self._line_len == 1 and self._first_cr)
            self._line_len = 0
            pos = nl + 1
            if blank:
                self._in_header = False
        while self._left > 0:
            nl = chunk.find(b"\n", pos)
            if nl < 0:
                return chunk
            self._left -= 1
            pos = nl + 1
        self._done = True
        return chunk[:pos]
