# IMAP4rev1 server protocol core for DICOM Mail Hub -- sans-I/O, like relay/pop3/protocol.py.
# RFC 3501 (IMAP4rev1) with RFC 2177 (IDLE), RFC 4315 (UIDPLUS: UID EXPUNGE), RFC 3691 (UNSELECT),
# RFC 2342 (NAMESPACE), RFC 2971 (ID), RFC 7888 (LITERAL+), RFC 4959 (SASL-IR), RFC 4616 (PLAIN),
# RFC 5530 (response codes). One mailbox per site: INBOX.
#
# What it is for: turning the bytes an IMAP client sends into reply bytes and events for a thin
# adapter. Each command runs as a generator that yields requests for what needs I/O; the adapter
# answers each with resume(answer):
#
#     send(conn.initial_bytes())
#     while (ev := conn.next_event()) is not CLOSED:
#         NEED_DATA       -> wait for bytes (conn.receive_data(data), b"" at EOF) or, when idling,
#                            for a change of the mailbox (conn.mailbox_changed())
#         SendBytes       -> send(ev.data)
#         SendFile        -> send ev.length bytes of the message's blob from ev.start (sendfile)
#         AuthRequest     -> resume(site, None, or TemporaryFailure(reason): refused unchecked)
#                            (sleep before answering a failure)
#         StartTls        -> upgrade the transport, resume(None)
#         MailboxRequest  -> resume(Snapshot of the site's mailbox, or None if it is gone)
#         LoadRequest     -> fill msg.structure / .header of ev.messages, resume(None)
#         PartHeaderRequest -> resume(the header block of part ev.part of ev.message, or None)
#         ScanRequest     -> answer ev.probes into msg.probes of ev.messages within ev.budget (off the
#                            loop), resume(True), or resume(False) when the budget ran out
#         YIELD           -> nothing to do; a chance to let other clients run (a long command)
#         StoreFlags      -> add/remove flag bits of ev.uids in storage, resume(True/False)
#         ExpungeRequest  -> delete ev.uids, resume("ok" | "in-use" | "error")
#         CloseConnection -> flush and close
# This module holds the command loop and the commands of the other states; mailbox.py the
# selected state (FETCH, STORE, SEARCH, EXPUNGE, ...), events.py the events and data classes.
# Must never: do I/O, read a clock, or raise because of anything a client sends (only misuse by
# the adapter raises ImapProtocolError), or let a client's input cost more than relay/imap/limits.py
# allows. Message contents never pass through here: only header blocks (bounded) and the recorded
# MIME structure.
from __future__ import annotations

import base64
import binascii
import re
from collections import deque

from relay.imap.events import (
    _CHANGED,
    _FLUSH,
    _LINE,
    _LINE_OR_CHANGE,
    CLOSED,
    NEED_DATA,
    PAUSED,
    YIELD,
    AuthRequest,
    CloseConnection,
    Event,
    ExpungeRequest,
    ImapProtocolError,
    LoadRequest,
    MailboxRequest,
    Message,
    PartHeaderRequest,
    ScanRequest,
    SendBytes,
    SendFile,
    Snapshot,
    StartTls,
    State,
    Step,
    StoreFlags,
    Task,
    _Sentinel,
)
from relay.imap.fetch import SEEN, Renderers
from relay.imap.limits import MAX_BUFFER, MAX_COMMAND, PRE_LOGIN_MAX_BUFFER, PRE_LOGIN_MAX_COMMAND
from relay.imap.mailbox import SelectedState
from relay.imap.parser import (
    Atom,
    Command,
    CommandFramer,
    LiteralRequest,
    Overflow,
    ParseError,
    Token,
    TooLong,
    astring,
    tokenize,
)

__all__ = [
    "ImapConnection",
    "ImapProtocolError",
    "State",
    "Message",
    "Snapshot",
    "SendBytes",
    "SendFile",
    "AuthRequest",
    "StartTls",
    "MailboxRequest",
    "LoadRequest",
    "PartHeaderRequest",
    "ScanRequest",
    "StoreFlags",
    "ExpungeRequest",
    "CloseConnection",
    "NEED_DATA",
    "PAUSED",
    "CLOSED",
    "YIELD",
    "TemporaryFailure",
    "bye",
]

IMPLEMENTATION = "DICOM-Mail-Hub"


class TemporaryFailure:
    """The answer to an AuthRequest refused without a check (e.g. too many failures from the
    client's address): NO [UNAVAILABLE] with the reason; it counts as a failed login."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


NA, AU, SE = State.NOT_AUTHENTICATED, State.AUTHENTICATED, State.SELECTED
_ANY, _AUTHED = {NA, AU, SE}, {AU, SE}
# verb -> states in which it is valid (RFC 3501 sec. 6); every other verb is BAD
_COMMANDS = {
    "CAPABILITY": _ANY,
    "NOOP": _ANY,
    "LOGOUT": _ANY,
    "ID": _ANY,
    "STARTTLS": {NA},
    "LOGIN": {NA},
    "AUTHENTICATE": {NA},
    "SELECT": _AUTHED,
    "EXAMINE": _AUTHED,
    "LIST": _AUTHED,
    "LSUB": _AUTHED,
    "STATUS": _AUTHED,
    "NAMESPACE": _AUTHED,
    "IDLE": _AUTHED,
    "SUBSCRIBE": _AUTHED,
    "UNSUBSCRIBE": _AUTHED,
    "CREATE": _AUTHED,
    "DELETE": _AUTHED,
    "RENAME": _AUTHED,
    "APPEND": _AUTHED,
    "CHECK": {SE},
    "CLOSE": {SE},
    "UNSELECT": {SE},
    "EXPUNGE": {SE},
    "FETCH": {SE},
    "STORE": {SE},
    "SEARCH": {SE},
    "COPY": {SE},
    "MOVE": {SE},
    "UID": {SE},
}
# commands after which EXPUNGE responses may not be sent (RFC 3501 sec. 7.4.1)
_NO_EXPUNGE_AFTER = {"FETCH", "STORE", "SEARCH"}
# commands that report mailbox changes themselves; IDLE after its "+" (clients look for EXISTS there)
_SYNCS_ITSELF = {"IDLE", "NOOP", "CHECK"}
del NA, AU, SE
_PERMANENT = "(\\Answered \\Flagged \\Deleted \\Seen \\Draft)"


class ImapConnection(SelectedState):
    def __init__(
        self,
        *,
        greeting_host: str,
        starttls_available: bool,
        plaintext_login_allowed: bool,
        renderers: Renderers,
        max_failed_logins: int = 3,
    ) -> None:
        self._host = greeting_host
        self._starttls = starttls_available
        self._plaintext_ok = plaintext_login_allowed
        self._renderers = renderers
        self._max_failed = max_failed_logins
        self._framer = CommandFramer(PRE_LOGIN_MAX_COMMAND, PRE_LOGIN_MAX_BUFFER)
        self._state = State.NOT_AUTHENTICATED
        self._tls_active = False
        self._failed = 0
        self._out: deque[Event] = deque()
        self._task: Task | None = None  # the running command's generator
        self._waiting: Step | None = None  # what the task waits for: _FLUSH, _LINE, _LINE_OR_CHANGE, or a request
        self._yielded = False  # YIELD was returned for the current _FLUSH
        self._eof = False
        self._changed = False
        self._readonly = False
        self._messages: list[Message] = []
        self._uid_validity = 0
        self._uid_next = 1
        self._verb = ""

    # ---- adapter side --------------------------------------------------------------------------
    @property
    def state(self) -> State:
        return self._state

    @property
    def tls_active(self) -> bool:
        return self._tls_active

    @property
    def last_command(self) -> str:
        """The verb of the command being served or served last (no arguments), or ""."""
        return self._verb

    @property
    def idling(self) -> bool:
        return self._waiting is _LINE_OR_CHANGE

    @property
    def buffered_bytes(self) -> int:
        return self._framer.buffered

    def initial_bytes(self) -> bytes:
        return f"* OK [CAPABILITY {self._capabilities()}] {self._host} IMAP4rev1 server ready\r\n".encode()

    def receive_data(self, data: bytes) -> None:
        if not data:
            self._eof = True
        elif not self._eof:
            self._framer.feed(bytes(data))

    def mailbox_changed(self) -> None:
        """New mail, expunges or flag changes by another session: re-read before the next command
        (and at once while idling)."""
        self._changed = True

    def resume(self, answer: object) -> None:
        if self._task is None or self._waiting in (None, _FLUSH, _LINE, _LINE_OR_CHANGE):
            raise ImapProtocolError("resume() without a pending request")
        self._advance(answer)

    def next_event(self) -> Event:
        while True:
            if self._out:
                return self._out.popleft()
            if self._state is State.LOGOUT:
                return CLOSED
            if self._task is not None:
                if self._waiting is _FLUSH:
                    self._yielded = not self._yielded
                    if self._yielded:
                        return YIELD
                    self._advance(None)
                elif self._waiting in (_LINE, _LINE_OR_CHANGE):
                    line = self._framer.next_line()
                    if line is not None:
                        self._advance(line)
                    elif self._eof:
                        self._close()
                    elif self._waiting is _LINE_OR_CHANGE and self._changed:
                        self._advance(_CHANGED)
                    else:
                        return NEED_DATA
                else:
                    return PAUSED
                continue
            item = self._framer.next_item()
            if item is None:
                if self._eof:
                    self._close()
                    continue
                return NEED_DATA
            if isinstance(item, LiteralRequest):
                if item.verb == "APPEND":  # not offered: the client must not send the literal
                    self._framer.reject_literal()
                    self._send(f"{item.tag} NO [CANNOT] APPEND is not offered: mail comes in over SMTP only\r\n")
                else:
                    self._framer.accept_literal()
                    self._send("+ Ready for literal data\r\n")
            elif isinstance(item, TooLong):
                self._send(
                    f"{item.tag} BAD command line too long (at most {self._framer.max_command} octets"
                    f" with its literals{' before login' if self._state is State.NOT_AUTHENTICATED else ''})\r\n"
                )
            elif isinstance(item, Overflow):
                self._send("* BYE too much input\r\n")
                self._close()
            else:
                self._start(item)

    # ---- running commands ----------------------------------------------------------------------
    def _close(self) -> None:
        self._out.append(CloseConnection())
        self._state = State.LOGOUT
        self._task = None

    def _send(self, text: str | bytes) -> None:
        self._out.append(SendBytes(text.encode() if isinstance(text, str) else text))

    def _start(self, command: Command) -> None:
        tag = command.tag
        try:
            tokens = tokenize(command)
            if tag == "*" or len(tokens) < 2 or not isinstance(tokens[1], Atom) or tokens[0] != tag:
                raise ParseError("expected: tag command [arguments]")
        except ParseError as exc:
            self._send(f"{tag} BAD {exc}\r\n")
            return
        verb = tokens[1].upper()
        args = tokens[2:]
        if verb not in _COMMANDS:
            self._send(f"{tag} BAD unknown command\r\n")
            return
        if self._state not in _COMMANDS[verb]:
            self._send(f"{tag} BAD {verb} not allowed in the {self._state.value} state\r\n")
            return
        self._verb = verb
        self._task = self._run(tag, verb, args)
        self._waiting = None
        self._advance(None)

    def _advance(self, value: object) -> None:
        assert self._task is not None
        try:
            waiting = self._task.send(value)
        except StopIteration:
            self._task, self._waiting = None, None
            return
        self._waiting = waiting
        if waiting not in (_FLUSH, _LINE, _LINE_OR_CHANGE):
            self._out.append(waiting)

    def _run(self, tag: str, verb: str, args: list[Token]) -> Task:
        try:
            if self._state is State.SELECTED and self._changed and verb not in _SYNCS_ITSELF:
                yield from self._sync()
            yield from getattr(self, "_cmd_" + verb.lower())(tag, args)
        except ParseError as exc:
            reason = str(exc)
            self._done(tag, "NO" if reason.startswith("[") else "BAD", reason)

    def _done(self, tag: str, status: str, text: str) -> None:
        if self._state is State.SELECTED and self._verb not in _NO_EXPUNGE_AFTER:
            self._send_expunges()
        self._send(f"{tag} {status} {text}\r\n")

    # ---- any state ------------------------------------------------------------------------------
    def _capabilities(self) -> str:
        caps = ["IMAP4rev1", "LITERAL+", "SASL-IR", "IDLE", "NAMESPACE", "ID", "UIDPLUS", "UNSELECT", "CHILDREN"]
        if self._state is State.NOT_AUTHENTICATED:
            if self._starttls and not self._tls_active:
                caps.append("STARTTLS")
            caps.append("AUTH=PLAIN" if self._login_allowed() else "LOGINDISABLED")
        return " ".join(caps)

    def _cmd_capability(self, tag: str, args: list[Token]) -> Task:
        self._send(f"* CAPABILITY {self._capabilities()}\r\n")
        self._done(tag, "OK", "CAPABILITY completed")
        yield from ()

    def _cmd_noop(self, tag: str, args: list[Token]) -> Task:
        if self._state is State.SELECTED:
            yield from self._sync()
        self._done(tag, "OK", "NOOP completed")

    def _cmd_check(self, tag: str, args: list[Token]) -> Task:
        yield from self._cmd_noop(tag, args)

    def _cmd_logout(self, tag: str, args: list[Token]) -> Task:
        self._send(f"* BYE {self._host} IMAP4rev1 server signing off\r\n")
        self._send(f"{tag} OK LOGOUT completed\r\n")
        self._close()
        yield from ()

    def _cmd_id(self, tag: str, args: list[Token]) -> Task:
        self._send(f'* ID ("name" "{IMPLEMENTATION}")\r\n')
        self._done(tag, "OK", "ID completed")
        yield from ()

    # ---- not authenticated ---------------------------------------------------------------------
    def _login_allowed(self) -> bool:
        return self._plaintext_ok or self._tls_active

    def _refuse_plaintext(self, tag: str) -> None:
        hint = "; use STARTTLS" if self._starttls else ""
        self._done(tag, "NO", f"[PRIVACYREQUIRED] plaintext login refused{hint}")

    def _cmd_starttls(self, tag: str, args: list[Token]) -> Task:
        if not self._starttls or self._tls_active:
            self._done(tag, "NO", "STARTTLS not available")
            return
        self._send(f"{tag} OK Begin TLS negotiation now\r\n")
        yield StartTls()
        self._tls_active = True
        self._framer.drop_input()

    def _cmd_login(self, tag: str, args: list[Token]) -> Task:
        if len(args) != 2:
            raise ParseError("LOGIN needs a user name and a password")
        if not self._login_allowed():
            return self._refuse_plaintext(tag)
        yield from self._authenticate(tag, astring(args[0]), astring(args[1]))

    def _cmd_authenticate(self, tag: str, args: list[Token]) -> Task:
        if not args or len(args) > 2 or not isinstance(args[0], Atom):
            raise ParseError("AUTHENTICATE needs a mechanism")
        if args[0].upper() != "PLAIN":
            return self._done(tag, "NO", "unsupported authentication mechanism")
        if not self._login_allowed():
            return self._refuse_plaintext(tag)
        if len(args) == 2:
            response = astring(args[1]).encode()
        else:
            self._send("+ \r\n")
            response = yield _LINE
            if response == b"*":
                return self._done(tag, "BAD", "authentication cancelled")
        try:
            data = b"" if response == b"=" else base64.b64decode(response, validate=True)
            authz, user, password = (p.decode("utf-8") for p in data.split(b"\0"))
        except (binascii.Error, ValueError):
            return self._done(tag, "BAD", "malformed PLAIN response")
        if not user or not password or (authz and authz != user):
            return self._done(tag, "NO", "[AUTHENTICATIONFAILED] invalid PLAIN credentials")
        yield from self._authenticate(tag, user, password)

    def _authenticate(self, tag: str, user: str, password: str) -> Task:
        site: object = yield AuthRequest(user, password, self._failed)
        if site is None or isinstance(site, TemporaryFailure):
            self._failed += 1
            text = (
                f"[UNAVAILABLE] {''.join(c for c in site.reason if ' ' <= c <= '~')}"
                if isinstance(site, TemporaryFailure)
                else "[AUTHENTICATIONFAILED] authentication failed"
            )
            if self._failed >= self._max_failed:
                self._send(f"{tag} NO {text}\r\n* BYE too many failures\r\n")
                return self._close()
            return self._done(tag, "NO", text)
        self._state = State.AUTHENTICATED
        self._framer.set_limits(MAX_COMMAND, MAX_BUFFER)
        self._done(tag, "OK", f"[CAPABILITY {self._capabilities()}] logged in")

    # ---- authenticated ---------------------------------------------------------------------------
    def _mailbox_name(self, token: Token) -> str:
        name = astring(token)
        return "INBOX" if name.upper() == "INBOX" else name

    def _cmd_select(self, tag: str, args: list[Token]) -> Task:
        yield from self._open(tag, args, readonly=False)

    def _cmd_examine(self, tag: str, args: list[Token]) -> Task:
        yield from self._open(tag, args, readonly=True)

    def _open(self, tag: str, args: list[Token], readonly: bool) -> Task:
        if len(args) != 1:
            raise ParseError("expected one mailbox name")
        self._state, self._messages = State.AUTHENTICATED, []  # a failed SELECT leaves no mailbox selected
        if self._mailbox_name(args[0]) != "INBOX":
            return self._done(tag, "NO", "[NONEXISTENT] no such mailbox (only INBOX)")
        snapshot: Snapshot | None = yield MailboxRequest()
        if snapshot is None:
            return self._done(tag, "NO", "[UNAVAILABLE] mailbox unavailable")
        self._load(snapshot)
        self._readonly = readonly
        self._state = State.SELECTED
        unseen = next((seq for seq, m in enumerate(self._messages, 1) if not m.flags & SEEN), None)
        self._send(
            f"* FLAGS {_PERMANENT}\r\n"
            f"* OK [PERMANENTFLAGS {'()' if readonly else _PERMANENT}] flags kept\r\n"
            f"* {len(self._messages)} EXISTS\r\n* 0 RECENT\r\n"
            + (f"* OK [UNSEEN {unseen}] first unseen\r\n" if unseen else "")
            + f"* OK [UIDVALIDITY {self._uid_validity}] UIDs valid\r\n"
            f"* OK [UIDNEXT {self._uid_next}] predicted next UID\r\n"
        )
        mode = "READ-ONLY" if readonly else "READ-WRITE"
        self._done(tag, "OK", f"[{mode}] {'EXAMINE' if readonly else 'SELECT'} completed")

    def _cmd_status(self, tag: str, args: list[Token]) -> Task:
        if len(args) != 2 or not isinstance(args[1], list) or not args[1]:
            raise ParseError("STATUS needs a mailbox and a list of items")
        items = [astring(i).upper() for i in args[1]]
        if any(i not in ("MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN") for i in items):
            raise ParseError("unknown STATUS item")
        if self._mailbox_name(args[0]) != "INBOX":
            return self._done(tag, "NO", "[NONEXISTENT] no such mailbox (only INBOX)")
        snapshot: Snapshot | None = yield MailboxRequest()
        if snapshot is None:
            return self._done(tag, "NO", "[UNAVAILABLE] mailbox unavailable")
        values = {
            "MESSAGES": len(snapshot.messages),
            "RECENT": 0,
            "UIDNEXT": snapshot.uid_next,
            "UIDVALIDITY": snapshot.uid_validity,
            "UNSEEN": sum(1 for m in snapshot.messages if not m.flags & SEEN),
        }
        self._send(f"* STATUS INBOX ({' '.join(f'{i} {values[i]}' for i in items)})\r\n")
        self._done(tag, "OK", "STATUS completed")

    def _cmd_list(self, tag: str, args: list[Token]) -> Task:
        self._listing(tag, args, "LIST")
        yield from ()

    def _cmd_lsub(self, tag: str, args: list[Token]) -> Task:
        self._listing(tag, args, "LSUB")
        yield from ()

    def _listing(self, tag: str, args: list[Token], verb: str) -> None:
        if len(args) != 2:
            raise ParseError(f"{verb} needs a reference and a mailbox pattern")
        reference, pattern = astring(args[0]), astring(args[1])
        if pattern == "" and verb == "LIST":
            self._send('* LIST (\\Noselect) "/" ""\r\n')
        elif _wildcard_match(reference + pattern, "INBOX"):
            self._send(f'* {verb} (\\HasNoChildren) "/" INBOX\r\n')
        self._done(tag, "OK", f"{verb} completed")

    def _cmd_namespace(self, tag: str, args: list[Token]) -> Task:
        self._send('* NAMESPACE (("" "/")) NIL NIL\r\n')
        self._done(tag, "OK", "NAMESPACE completed")
        yield from ()

    def _cmd_subscribe(self, tag: str, args: list[Token]) -> Task:
        if len(args) != 1:
            raise ParseError("expected one mailbox name")
        if self._mailbox_name(args[0]) != "INBOX":
            return self._done(tag, "NO", "[NONEXISTENT] no such mailbox (only INBOX)")
        self._done(tag, "OK", "completed")
        yield from ()

    _cmd_unsubscribe = _cmd_subscribe

    def _cmd_create(self, tag: str, args: list[Token]) -> Task:
        self._done(tag, "NO", "[CANNOT] each site has only its INBOX")
        yield from ()

    _cmd_delete = _cmd_rename = _cmd_append = _cmd_copy = _cmd_move = _cmd_create

    def _cmd_idle(self, tag: str, args: list[Token]) -> Task:
        if args:
            raise ParseError("IDLE takes no arguments")
        self._send("+ idling\r\n")
        while True:
            if self._state is State.SELECTED:
                if self._changed:
                    yield from self._sync()
                self._send_expunges()
            line: bytes | _Sentinel = yield _LINE_OR_CHANGE
            if not isinstance(line, bytes):  # _CHANGED
                continue
            if line.upper() != b"DONE":
                return self._done(tag, "BAD", "expected DONE")
            return self._done(tag, "OK", "IDLE terminated")


_WILDCARD_RUN = re.compile(r"[*%]{2,}")


def _wildcard_match(pattern: str, name: str) -> bool:
    """LIST/LSUB matching (RFC 3501 sec. 6.3.8): "*" matches any characters, "%" any but the
    hierarchy delimiter "/"; case-insensitive (INBOX is). Linear: runs of wildcards are folded into
    one, then the pattern is walked once keeping the set of name positions it can have reached so
    far (no backtracking); each literal character moves that set past at least one name character,
    so the walk ends after at most len(name) + 1 of them."""
    if not pattern:
        return False
    pattern = _WILDCARD_RUN.sub(lambda run: "*" if "*" in run.group() else "%", pattern.upper())
    name = name.upper()
    reach = [True] + [False] * len(name)  # reach[i]: the pattern so far can match name[:i]
    for c in pattern:
        if c == "*":
            first = reach.index(True)
            reach = [i >= first for i in range(len(reach))]
        elif c == "%":
            for i in range(1, len(reach)):
                reach[i] = reach[i] or (reach[i - 1] and name[i - 1] != "/")
        else:
            reach = [False] + [reach[i] and name[i] == c for i in range(len(name))]
            if not any(reach):
                return False
    return reach[-1]


def bye(reason: str) -> bytes:
    """An untagged BYE for a connection the adapter ends on its own (limits, shutdown, errors)."""
    text = "".join(c for c in reason if " " <= c <= "~")
    return f"* BYE {text}\r\n".encode()
