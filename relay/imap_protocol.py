# IMAP4rev1 server protocol core for DICOM Mail Hub -- sans-I/O, like relay/pop3_protocol.py.
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
#         AuthRequest     -> resume(site or None)  (sleep before answering a failure)
#         StartTls        -> upgrade the transport, resume(None)
#         MailboxRequest  -> resume(Snapshot of the site's mailbox, or None if it is gone)
#         LoadRequest     -> fill msg.structure / .header / .part_headers of ev.messages, resume(None)
#         StoreFlags      -> add/remove flag bits of ev.uids in storage, resume(True/False)
#         ExpungeRequest  -> delete ev.uids, resume("ok" | "in-use" | "error")
#         CloseConnection -> flush and close
# Must never: do I/O, read a clock, or raise because of anything a client sends (only misuse by
# the adapter raises ImapProtocolError). Message contents never pass through here: only header
# blocks (bounded) and the recorded MIME structure.
from __future__ import annotations

import base64
import binascii
import enum
import re
from collections import deque
from dataclasses import dataclass, field

from .imap_fetch import ALL_FLAGS, DELETED, FLAG_BITS, SEEN, FetchPlan, FileRange, fetch_response, flag_list
from .imap_parser import (Atom, Command, CommandFramer, LiteralRequest, Overflow, ParseError, TooLong, astring,
                          fetch_att, in_sequence_set, sequence_set, tokenize)
from .imap_search import parse_search

__all__ = ["ImapConnection", "ImapProtocolError", "State", "Message", "Snapshot", "SendBytes", "SendFile",
           "AuthRequest", "StartTls", "MailboxRequest", "LoadRequest", "StoreFlags", "ExpungeRequest",
           "CloseConnection", "NEED_DATA", "PAUSED", "CLOSED", "bye"]

IMPLEMENTATION = "DICOM-Mail-Hub"
_BATCH = 100   # messages whose structure/header are loaded (and dropped again) at once


class ImapProtocolError(Exception):
    """The adapter used the core wrongly.  Never raised because of client input."""


class State(enum.Enum):
    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATED = "authenticated"
    SELECTED = "selected"
    LOGOUT = "logout"


@dataclass(eq=False)
class Message:
    uid: int
    size: int
    flags: int
    internal_date: float
    ref: object = None                     # the adapter's handle (storage entry)
    structure: dict | None = None          # loaded on demand (LoadRequest), dropped after use
    header: bytes | None = None            # top-level header block incl. the blank line, likewise
    part_headers: dict | None = None       # "1.2" -> header block of that message/rfc822 part, likewise
    gone: bool = False                     # expunged by another session, EXPUNGE not yet sent


@dataclass
class Snapshot:
    uid_validity: int
    uid_next: int
    messages: list[Message]


# ---- events ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SendBytes:
    data: bytes


@dataclass(frozen=True)
class SendFile:
    ref: object
    start: int
    length: int
    whole: bool


@dataclass(frozen=True)
class AuthRequest:
    user: str
    password: str = field(repr=False)
    failed_so_far: int = 0


@dataclass(frozen=True)
class StartTls:
    pass


@dataclass(frozen=True)
class MailboxRequest:
    pass


@dataclass(frozen=True)
class LoadRequest:
    messages: list
    structure: bool
    header: bool
    part_headers: frozenset = frozenset()   # part numbers whose header block (N.HEADER) is needed


@dataclass(frozen=True)
class StoreFlags:
    uids: list[int]
    add: int
    remove: int


@dataclass(frozen=True)
class ExpungeRequest:
    uids: list[int]


@dataclass(frozen=True)
class CloseConnection:
    pass


class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA, PAUSED, CLOSED = _Sentinel("NEED_DATA"), _Sentinel("PAUSED"), _Sentinel("CLOSED")
_FLUSH, _LINE, _LINE_OR_CHANGE, _CHANGED = (_Sentinel(n) for n in ("<flush>", "<line>", "<line-or-change>",
                                                                   "<changed>"))

NA, AU, SE = State.NOT_AUTHENTICATED, State.AUTHENTICATED, State.SELECTED
_ANY, _AUTHED = {NA, AU, SE}, {AU, SE}
# verb -> states in which it is valid (RFC 3501 sec. 6); every other verb is BAD
_COMMANDS = {
    "CAPABILITY": _ANY, "NOOP": _ANY, "LOGOUT": _ANY, "ID": _ANY,
    "STARTTLS": {NA}, "LOGIN": {NA}, "AUTHENTICATE": {NA},
    "SELECT": _AUTHED, "EXAMINE": _AUTHED, "LIST": _AUTHED, "LSUB": _AUTHED, "STATUS": _AUTHED,
    "NAMESPACE": _AUTHED, "IDLE": _AUTHED, "SUBSCRIBE": _AUTHED, "UNSUBSCRIBE": _AUTHED,
    "CREATE": _AUTHED, "DELETE": _AUTHED, "RENAME": _AUTHED, "APPEND": _AUTHED,
    "CHECK": {SE}, "CLOSE": {SE}, "UNSELECT": {SE}, "EXPUNGE": {SE}, "FETCH": {SE}, "STORE": {SE},
    "SEARCH": {SE}, "COPY": {SE}, "MOVE": {SE}, "UID": {SE},
}
# commands after which EXPUNGE responses may not be sent (RFC 3501 sec. 7.4.1)
_NO_EXPUNGE_AFTER = {"FETCH", "STORE", "SEARCH"}
del NA, AU, SE
_PERMANENT = "(\\Answered \\Flagged \\Deleted \\Seen \\Draft)"


class ImapConnection:
    def __init__(self, *, greeting_host: str, starttls_available: bool, plaintext_login_allowed: bool,
                 renderers, max_failed_logins: int = 3, max_command: int = 64 * 1024) -> None:
        self._host = greeting_host
        self._starttls = starttls_available
        self._plaintext_ok = plaintext_login_allowed
        self._renderers = renderers
        self._max_failed = max_failed_logins
        self._framer = CommandFramer(max_command=max_command)
        self._state = State.NOT_AUTHENTICATED
        self._tls_active = False
        self._failed = 0
        self._out: deque = deque()
        self._task = None          # the running command's generator
        self._waiting = None       # what the task waits for: _FLUSH, _LINE, _LINE_OR_CHANGE, or a request
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

    def resume(self, answer) -> None:
        if self._task is None or self._waiting in (None, _FLUSH, _LINE, _LINE_OR_CHANGE):
            raise ImapProtocolError("resume() without a pending request")
        self._advance(answer)

    def next_event(self):
        while True:
            if self._out:
                return self._out.popleft()
            if self._state is State.LOGOUT:
                return CLOSED
            if self._task is not None:
                if self._waiting is _FLUSH:
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
                self._framer.accept_literal()
                self._send("+ Ready for literal data\r\n")
            elif isinstance(item, TooLong):
                self._send(f"{item.tag} BAD command line too long\r\n")
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

    def _advance(self, value) -> None:
        try:
            waiting = self._task.send(value)
        except StopIteration:
            self._task, self._waiting = None, None
            return
        self._waiting = waiting
        if waiting not in (_FLUSH, _LINE, _LINE_OR_CHANGE):
            self._out.append(waiting)

    def _run(self, tag: str, verb: str, args: list):
        try:
            if self._state is State.SELECTED and self._changed:
                yield from self._sync()
            yield from getattr(self, "_cmd_" + verb.lower())(tag, args)
        except ParseError as exc:
            reason = str(exc)
            self._done(tag, "NO" if reason.startswith("[") else "BAD", reason)

    def _done(self, tag: str, status: str, text: str) -> None:
        if self._state is State.SELECTED and self._verb not in _NO_EXPUNGE_AFTER:
            self._send_expunges()
        self._send(f"{tag} {status} {text}\r\n")

    # ---- mailbox view ---------------------------------------------------------------------------
    def _load(self, snapshot: Snapshot) -> None:
        self._messages = list(snapshot.messages)
        self._uid_validity, self._uid_next = snapshot.uid_validity, snapshot.uid_next
        self._changed = False

    def _sync(self):
        """Re-read the mailbox: new messages (EXISTS), flags changed elsewhere (FETCH), messages
        expunged elsewhere (marked gone; EXPUNGE is sent where allowed)."""
        self._changed = False
        snapshot = yield MailboxRequest()
        if snapshot is None:
            return
        current = {m.uid: m for m in snapshot.messages}
        last = self._messages[-1].uid if self._messages else 0
        for seq, msg in enumerate(self._messages, 1):
            now = current.get(msg.uid)
            if now is None:
                msg.gone = True
            elif not msg.gone and now.flags != msg.flags:
                msg.flags = now.flags
                self._send(f"* {seq} FETCH (UID {msg.uid} FLAGS {flag_list(msg.flags)})\r\n")
        new = [m for m in snapshot.messages if m.uid > last]
        if new:
            self._messages.extend(new)
            self._send(f"* {len(self._messages)} EXISTS\r\n")
        self._uid_next = max(self._uid_next, snapshot.uid_next)

    def _send_expunges(self) -> None:
        for seq in range(len(self._messages), 0, -1):
            if self._messages[seq - 1].gone:
                del self._messages[seq - 1]
                self._send(f"* {seq} EXPUNGE\r\n")

    def _select_set(self, token, uid_mode: bool) -> list[tuple[int, Message]]:
        ranges = sequence_set(token)
        msgs = self._messages
        if uid_mode:
            largest = msgs[-1].uid if msgs else 0
            return [(seq, m) for seq, m in enumerate(msgs, 1) if in_sequence_set(m.uid, ranges, largest)]
        largest = len(msgs)
        if any(max(lo, hi) > largest for lo, hi in ranges) or (largest == 0 and ranges):
            raise ParseError("invalid message sequence number")
        return [(seq, m) for seq, m in enumerate(msgs, 1) if in_sequence_set(seq, ranges, largest)]

    # ---- any state ------------------------------------------------------------------------------
    def _capabilities(self) -> str:
        caps = ["IMAP4rev1", "LITERAL+", "SASL-IR", "IDLE", "NAMESPACE", "ID", "UIDPLUS", "UNSELECT",
                "CHILDREN"]
        if self._state is State.NOT_AUTHENTICATED:
            if self._starttls and not self._tls_active:
                caps.append("STARTTLS")
            caps.append("AUTH=PLAIN" if self._login_allowed() else "LOGINDISABLED")
        return " ".join(caps)

    def _cmd_capability(self, tag, args):
        self._send(f"* CAPABILITY {self._capabilities()}\r\n")
        self._done(tag, "OK", "CAPABILITY completed")
        yield from ()

    def _cmd_noop(self, tag, args):
        if self._state is State.SELECTED:
            yield from self._sync()
        self._done(tag, "OK", "NOOP completed")

    def _cmd_check(self, tag, args):
        yield from self._cmd_noop(tag, args)

    def _cmd_logout(self, tag, args):
        self._send(f"* BYE {self._host} IMAP4rev1 server signing off\r\n")
        self._send(f"{tag} OK LOGOUT completed\r\n")
        self._close()
        yield from ()

    def _cmd_id(self, tag, args):
        self._send(f'* ID ("name" "{IMPLEMENTATION}")\r\n')
        self._done(tag, "OK", "ID completed")
        yield from ()

    # ---- not authenticated ---------------------------------------------------------------------
    def _login_allowed(self) -> bool:
        return self._plaintext_ok or self._tls_active

    def _refuse_plaintext(self, tag: str) -> None:
        hint = "; use STARTTLS" if self._starttls else ""
        self._done(tag, "NO", f"[PRIVACYREQUIRED] plaintext login refused{hint}")

    def _cmd_starttls(self, tag, args):
        if not self._starttls or self._tls_active:
            self._done(tag, "NO", "STARTTLS not available")
            return
        self._send(f"{tag} OK Begin TLS negotiation now\r\n")
        yield StartTls()
        self._tls_active = True
        self._framer.drop_input()

    def _cmd_login(self, tag, args):
        if len(args) != 2:
            raise ParseError("LOGIN needs a user name and a password")
        if not self._login_allowed():
            return self._refuse_plaintext(tag)
        yield from self._authenticate(tag, astring(args[0]), astring(args[1]))

    def _cmd_authenticate(self, tag, args):
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

    def _authenticate(self, tag, user: str, password: str):
        site = yield AuthRequest(user, password, self._failed)
        if site is None:
            self._failed += 1
            if self._failed >= self._max_failed:
                self._send(f"{tag} NO [AUTHENTICATIONFAILED] authentication failed\r\n* BYE too many failures\r\n")
                return self._close()
            return self._done(tag, "NO", "[AUTHENTICATIONFAILED] authentication failed")
        self._state = State.AUTHENTICATED
        self._done(tag, "OK", f"[CAPABILITY {self._capabilities()}] logged in")

    # ---- authenticated ---------------------------------------------------------------------------
    def _mailbox_name(self, token) -> str:
        name = astring(token)
        return "INBOX" if name.upper() == "INBOX" else name

    def _cmd_select(self, tag, args):
        yield from self._open(tag, args, readonly=False)

    def _cmd_examine(self, tag, args):
        yield from self._open(tag, args, readonly=True)

    def _open(self, tag, args, readonly: bool):
        if len(args) != 1:
            raise ParseError("expected one mailbox name")
        self._state, self._messages = State.AUTHENTICATED, []   # a failed SELECT leaves no mailbox selected
        if self._mailbox_name(args[0]) != "INBOX":
            return self._done(tag, "NO", "[NONEXISTENT] no such mailbox (only INBOX)")
        snapshot = yield MailboxRequest()
        if snapshot is None:
            return self._done(tag, "NO", "[UNAVAILABLE] mailbox unavailable")
        self._load(snapshot)
        self._readonly = readonly
        self._state = State.SELECTED
        unseen = next((seq for seq, m in enumerate(self._messages, 1) if not m.flags & SEEN), None)
        self._send(f"* FLAGS {_PERMANENT}\r\n"
                   f"* OK [PERMANENTFLAGS {'()' if readonly else _PERMANENT}] flags kept\r\n"
                   f"* {len(self._messages)} EXISTS\r\n* 0 RECENT\r\n"
                   + (f"* OK [UNSEEN {unseen}] first unseen\r\n" if unseen else "")
                   + f"* OK [UIDVALIDITY {self._uid_validity}] UIDs valid\r\n"
                   f"* OK [UIDNEXT {self._uid_next}] predicted next UID\r\n")
        mode = "READ-ONLY" if readonly else "READ-WRITE"
        self._done(tag, "OK", f"[{mode}] {'EXAMINE' if readonly else 'SELECT'} completed")

    def _cmd_status(self, tag, args):
        if len(args) != 2 or not isinstance(args[1], list) or not args[1]:
            raise ParseError("STATUS needs a mailbox and a list of items")
        items = [astring(i).upper() for i in args[1]]
        if any(i not in ("MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN") for i in items):
            raise ParseError("unknown STATUS item")
        if self._mailbox_name(args[0]) != "INBOX":
            return self._done(tag, "NO", "[NONEXISTENT] no such mailbox (only INBOX)")
        snapshot = yield MailboxRequest()
        if snapshot is None:
            return self._done(tag, "NO", "[UNAVAILABLE] mailbox unavailable")
        values = {"MESSAGES": len(snapshot.messages), "RECENT": 0, "UIDNEXT": snapshot.uid_next,
                  "UIDVALIDITY": snapshot.uid_validity,
                  "UNSEEN": sum(1 for m in snapshot.messages if not m.flags & SEEN)}
        self._send(f"* STATUS INBOX ({' '.join(f'{i} {values[i]}' for i in items)})\r\n")
        self._done(tag, "OK", "STATUS completed")

    def _cmd_list(self, tag, args):
        self._listing(tag, args, "LIST")
        yield from ()

    def _cmd_lsub(self, tag, args):
        self._listing(tag, args, "LSUB")
        yield from ()

    def _listing(self, tag, args, verb: str) -> None:
        if len(args) != 2:
            raise ParseError(f"{verb} needs a reference and a mailbox pattern")
        reference, pattern = astring(args[0]), astring(args[1])
        if pattern == "" and verb == "LIST":
            self._send('* LIST (\\Noselect) "/" ""\r\n')
        elif _wildcard_match(reference + pattern, "INBOX"):
            self._send(f'* {verb} (\\HasNoChildren) "/" INBOX\r\n')
        self._done(tag, "OK", f"{verb} completed")

    def _cmd_namespace(self, tag, args):
        self._send('* NAMESPACE (("" "/")) NIL NIL\r\n')
        self._done(tag, "OK", "NAMESPACE completed")
        yield from ()

    def _cmd_subscribe(self, tag, args):
        if len(args) != 1:
            raise ParseError("expected one mailbox name")
        if self._mailbox_name(args[0]) != "INBOX":
            return self._done(tag, "NO", "[NONEXISTENT] no such mailbox (only INBOX)")
        self._done(tag, "OK", "completed")
        yield from ()

    _cmd_unsubscribe = _cmd_subscribe

    def _cmd_create(self, tag, args):
        self._done(tag, "NO", "[CANNOT] each site has only its INBOX")
        yield from ()

    _cmd_delete = _cmd_rename = _cmd_append = _cmd_copy = _cmd_move = _cmd_create

    def _cmd_idle(self, tag, args):
        if args:
            raise ParseError("IDLE takes no arguments")
        self._send("+ idling\r\n")
        while True:
            if self._state is State.SELECTED:
                if self._changed:
                    yield from self._sync()
                self._send_expunges()
            line = yield _LINE_OR_CHANGE
            if line is _CHANGED:
                continue
            if line.upper() != b"DONE":
                return self._done(tag, "BAD", "expected DONE")
            return self._done(tag, "OK", "IDLE terminated")

    # ---- selected ---------------------------------------------------------------------------------
    def _cmd_close(self, tag, args):
        deleted = [m.uid for m in self._messages if m.flags & DELETED and not m.gone]
        if deleted and not self._readonly:
            yield ExpungeRequest(deleted)   # silently: no EXPUNGE responses (RFC 3501 sec. 6.4.2)
        self._state, self._messages = State.AUTHENTICATED, []
        self._send(f"{tag} OK CLOSE completed\r\n")

    def _cmd_unselect(self, tag, args):
        self._state, self._messages = State.AUTHENTICATED, []
        self._send(f"{tag} OK UNSELECT completed\r\n")
        yield from ()

    def _cmd_expunge(self, tag, args, uid_set=None):
        if self._readonly:
            return self._done(tag, "NO", "[READ-ONLY] mailbox opened with EXAMINE")
        chosen = {id(m) for _, m in self._select_set(uid_set, True)} if uid_set is not None else None
        deleted = [m for m in self._messages
                   if m.flags & DELETED and not m.gone and (chosen is None or id(m) in chosen)]
        if deleted:
            outcome = yield ExpungeRequest([m.uid for m in deleted])
            if outcome == "in-use":
                return self._done(tag, "NO", "[INUSE] a POP3 session holds this mailbox; try again later")
            if outcome != "ok":
                return self._done(tag, "NO", "[SERVERBUG] expunge failed; nothing removed")
            for m in deleted:
                m.gone = True
        self._done(tag, "OK", "EXPUNGE completed")

    def _cmd_uid(self, tag, args):
        if not args or not isinstance(args[0], Atom):
            raise ParseError("UID needs FETCH, STORE, SEARCH or EXPUNGE")
        sub = args[0].upper()
        self._verb = "UID " + sub
        if sub == "FETCH":
            yield from self._fetch(tag, args[1:], uid_mode=True)
        elif sub == "STORE":
            yield from self._store(tag, args[1:], uid_mode=True)
        elif sub == "SEARCH":
            yield from self._search(tag, args[1:], uid_mode=True)
        elif sub == "EXPUNGE":
            if len(args) != 2:
                raise ParseError("UID EXPUNGE needs a UID set")
            yield from self._cmd_expunge(tag, [], uid_set=args[1])
        elif sub in ("COPY", "MOVE"):
            yield from self._cmd_copy(tag, args)
        else:
            raise ParseError("unknown UID command")

    def _cmd_fetch(self, tag, args):
        yield from self._fetch(tag, args, uid_mode=False)

    def _fetch(self, tag, args, uid_mode: bool):
        if len(args) != 2:
            raise ParseError("FETCH needs a sequence set and data items")
        atts = fetch_att(args[1])
        if uid_mode and not any(a.name == "UID" for a in atts):
            atts.insert(0, fetch_att(Atom("UID"))[0])
        plan = FetchPlan(atts)
        chosen = self._select_set(args[0], uid_mode)
        missing = any(m.gone for _, m in chosen)
        chosen = [(seq, m) for seq, m in chosen if not m.gone]
        for start in range(0, len(chosen), _BATCH):
            batch = chosen[start:start + _BATCH]
            msgs = [m for _, m in batch]
            if plan.structure or plan.header:
                yield LoadRequest(msgs, plan.structure, plan.header, frozenset(plan.part_headers))
                if plan.structure and any(m.structure is None for m in msgs):
                    return self._done(tag, "NO", "[SERVERBUG] MIME structure unavailable")
            seen_now = set()
            if plan.sets_seen and not self._readonly:
                unseen = [m for m in msgs if not m.flags & SEEN]
                if unseen and (yield StoreFlags([m.uid for m in unseen], SEEN, 0)):
                    for m in unseen:
                        m.flags |= SEEN
                    seen_now = {id(m) for m in unseen}
            for seq, msg in batch:
                for piece in fetch_response(seq, msg, plan, self._renderers, id(msg) in seen_now):
                    if isinstance(piece, FileRange):
                        self._out.append(SendFile(msg.ref, piece.start, piece.length, piece.whole))
                    else:
                        self._send(piece)
                msg.structure = msg.header = msg.part_headers = None
                yield _FLUSH
        if missing:
            return self._done(tag, "NO", "[EXPUNGEISSUED] some of the requested messages were expunged")
        self._done(tag, "OK", "FETCH completed")

    def _cmd_store(self, tag, args):
        yield from self._store(tag, args, uid_mode=False)

    def _store(self, tag, args, uid_mode: bool):
        if len(args) < 3 or not isinstance(args[1], Atom):
            raise ParseError("STORE needs a sequence set, an item and flags")
        item = args[1].upper()
        mode, _, silent = item.partition(".")
        if mode not in ("FLAGS", "+FLAGS", "-FLAGS") or silent not in ("", "SILENT"):
            raise ParseError("STORE item must be [+-]FLAGS[.SILENT]")
        flag_tokens = args[2] if isinstance(args[2], list) and len(args) == 3 else args[2:]
        bits = 0
        for token in flag_tokens:
            if not isinstance(token, Atom):
                raise ParseError("flags must be atoms")
            if token.startswith("\\"):
                if token.upper() not in FLAG_BITS:
                    raise ParseError("unknown system flag " + token[:30])
                bits |= FLAG_BITS[token.upper()]
            # keywords are not kept (PERMANENTFLAGS has no \*): accepted and ignored
        chosen = self._select_set(args[0], uid_mode)
        if self._readonly:
            return self._done(tag, "NO", "[READ-ONLY] mailbox opened with EXAMINE")
        add, remove = {"FLAGS": (bits, ALL_FLAGS & ~bits), "+FLAGS": (bits, 0), "-FLAGS": (0, bits)}[mode]
        live = [(seq, m) for seq, m in chosen if not m.gone]
        if live and not (yield StoreFlags([m.uid for _, m in live], add, remove)):
            return self._done(tag, "NO", "[SERVERBUG] flags not stored")
        for seq, m in live:
            m.flags = (m.flags | add) & ~remove
            if not silent:
                uid = f"UID {m.uid} " if uid_mode else ""
                self._send(f"* {seq} FETCH ({uid}FLAGS {flag_list(m.flags)})\r\n")
        if len(live) != len(chosen):
            return self._done(tag, "NO", "[EXPUNGEISSUED] some of the messages were expunged")
        self._done(tag, "OK", "STORE completed")

    def _cmd_search(self, tag, args):
        yield from self._search(tag, args, uid_mode=False)

    def _search(self, tag, args, uid_mode: bool):
        search = parse_search(args)
        hits = []
        largest_seq = len(self._messages)
        largest_uid = self._messages[-1].uid if self._messages else 0
        numbered = list(enumerate(self._messages, 1))
        for start in range(0, len(numbered), _BATCH):
            batch = numbered[start:start + _BATCH]
            live = [m for _, m in batch if not m.gone]
            if search.needs_header and live:
                yield LoadRequest(live, False, True)
            for seq, m in batch:
                if not m.gone and search.match(seq, m, largest_seq, largest_uid):
                    hits.append(m.uid if uid_mode else seq)
                m.header = None
        self._send("* SEARCH" + "".join(f" {n}" for n in hits) + "\r\n")
        self._done(tag, "OK", "SEARCH completed")


def _wildcard_match(pattern: str, name: str) -> bool:
    """LIST pattern matching with * and % (no hierarchy below INBOX, so both match anything)."""
    regex = "".join(".*" if c in "*%" else re.escape(c) for c in pattern.upper())
    return bool(pattern) and re.fullmatch(regex, name.upper()) is not None


def bye(reason: str) -> bytes:
    """An untagged BYE for a connection the adapter ends on its own (limits, shutdown, errors)."""
    text = "".join(c for c in reason if " " <= c <= "~")
    return f"* BYE {text}\r\n".encode()

