# The selected state of the IMAP core (RFC 3501 sec. 6.4, RFC 4315 UID EXPUNGE, RFC 3691 UNSELECT):
# the session's view of its mailbox (sequence numbers, flags, messages another session expunged),
# kept in step with the index through MailboxRequest, and the commands that work on it: FETCH,
# STORE, SEARCH, EXPUNGE, CLOSE, UNSELECT and their UID forms. A mixin of ImapConnection; the same
# rules hold: no I/O, requests are yielded to the adapter, client input only ever raises ParseError.
from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable, Generator
from typing import Any

from relay.imap.events import (
    _FLUSH,
    Event,
    ExpungeRequest,
    LoadRequest,
    MailboxRequest,
    Message,
    PartHeaderRequest,
    ScanBudget,
    ScanRequest,
    SendFile,
    Snapshot,
    State,
    Step,
    StoreFlags,
    Task,
)
from relay.imap.fetch import (
    ALL_FLAGS,
    DELETED,
    FLAG_BITS,
    SEEN,
    FetchPlan,
    FileRange,
    PartHeader,
    Piece,
    Renderers,
    fetch_response,
    flag_list,
)
from relay.imap.limits import FETCH_CHUNK, MAX_FETCH_ITEMS, SEARCH_BATCH, SEARCH_MAX_BYTES, SEARCH_MAX_SECONDS
from relay.imap.parser import Atom, ParseError, SequenceSet, Token, fetch_att
from relay.imap.search import parse_search

__all__ = ["SelectedState"]

_BATCH = 100  # messages whose \Seen flags are stored at once


class SelectedState:
    """Mixin: ImapConnection sets these attributes and has these methods."""

    _messages: list[Message]
    _readonly: bool
    _changed: bool
    _uid_validity: int
    _uid_next: int
    _state: State
    _verb: str
    _renderers: Renderers
    _out: deque[Event]
    _send: Callable[[str | bytes], None]
    _done: Callable[[str, str, str], None]  # tag, status, text
    _cmd_copy: Callable[[str, list[Token]], Task]

    # ---- mailbox view ---------------------------------------------------------------------------
    def _load(self, snapshot: Snapshot) -> None:
        self._messages = list(snapshot.messages)
        self._uid_validity, self._uid_next = snapshot.uid_validity, snapshot.uid_next
        self._changed = False

    def _sync(self) -> Task:
        """Re-read the mailbox: new messages (EXISTS), flags changed elsewhere (FETCH), messages
        expunged elsewhere (marked gone; EXPUNGE is sent where allowed)."""
        self._changed = False
        snapshot: Snapshot | None = yield MailboxRequest()
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

    def _select_set(self, token: Token, uid_mode: bool) -> list[tuple[int, Message]]:
        """(sequence number, message) of each message the set names, in mailbox order; O(ranges *
        log(messages) + messages named) whatever the set (e.g. 1:4294967295 or 1,2,3,...)."""
        numbers = SequenceSet(token)
        msgs = self._messages
        if uid_mode:
            uids = [m.uid for m in msgs]
            starts, ends = numbers.resolved(uids[-1] if uids else 0)
            chosen: list[tuple[int, Message]] = []
            for lo, hi in zip(starts, ends):
                first, last = bisect.bisect_left(uids, lo), bisect.bisect_right(uids, hi)
                chosen.extend((seq + 1, msgs[seq]) for seq in range(first, last))
            return chosen
        largest = len(msgs)
        if largest == 0 and numbers.names_only_star():
            return []  # "1:*" in an empty mailbox: nothing, as clients expect
        if largest == 0 or numbers.highest(largest) > largest:
            raise ParseError("invalid message sequence number")
        starts, ends = numbers.resolved(largest)
        return [(seq, msgs[seq - 1]) for lo, hi in zip(starts, ends) for seq in range(lo, hi + 1)]

    def _cmd_close(self, tag: str, args: list[Token]) -> Task:
        deleted = [m.uid for m in self._messages if m.flags & DELETED and not m.gone]
        if deleted and not self._readonly:
            yield ExpungeRequest(deleted)  # silently: no EXPUNGE responses (RFC 3501 sec. 6.4.2)
        self._state, self._messages = State.AUTHENTICATED, []
        self._send(f"{tag} OK CLOSE completed\r\n")

    def _cmd_unselect(self, tag: str, args: list[Token]) -> Task:
        self._state, self._messages = State.AUTHENTICATED, []
        self._send(f"{tag} OK UNSELECT completed\r\n")
        yield from ()

    def _cmd_expunge(self, tag: str, args: list[Token], uid_set: Token | None = None) -> Task:
        if self._readonly:
            return self._done(tag, "NO", "[READ-ONLY] mailbox opened with EXAMINE")
        chosen = {id(m) for _, m in self._select_set(uid_set, True)} if uid_set is not None else None
        deleted = [
            m for m in self._messages if m.flags & DELETED and not m.gone and (chosen is None or id(m) in chosen)
        ]
        if deleted:
            outcome: str = yield ExpungeRequest([m.uid for m in deleted])
            if outcome == "in-use":
                return self._done(tag, "NO", "[INUSE] a POP3 session holds this mailbox; try again later")
            if outcome != "ok":
                return self._done(tag, "NO", "[SERVERBUG] expunge failed; nothing removed")
            for m in deleted:
                m.gone = True
        self._done(tag, "OK", "EXPUNGE completed")

    def _cmd_uid(self, tag: str, args: list[Token]) -> Task:
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

    def _cmd_fetch(self, tag: str, args: list[Token]) -> Task:
        yield from self._fetch(tag, args, uid_mode=False)

    def _fetch(self, tag: str, args: list[Token], uid_mode: bool) -> Task:
        if len(args) != 2:
            raise ParseError("FETCH needs a sequence set and data items")
        atts = fetch_att(args[1])
        if uid_mode and not any(a.name == "UID" for a in atts):
            atts.insert(0, fetch_att(Atom("UID"))[0])
        atts = list(dict.fromkeys(atts))  # an item named twice is answered once
        if len(atts) > MAX_FETCH_ITEMS:
            raise ParseError(f"[LIMIT] too many FETCH data items (at most {MAX_FETCH_ITEMS})")
        plan = FetchPlan(atts)
        chosen = self._select_set(args[0], uid_mode)
        missing = plan.reads_message and any(m.gone for _, m in chosen)  # RFC 2180 sec. 4.1
        damaged: list[int] = []
        if missing:
            chosen = [(seq, m) for seq, m in chosen if not m.gone]
        for start in range(0, len(chosen), _BATCH):
            batch = chosen[start : start + _BATCH]
            seen_now: set[int] = set()
            if plan.sets_seen and not self._readonly:
                unseen = [m for _, m in batch if not m.flags & SEEN]
                if unseen and plan.body:  # a mail known damaged is not sent: it does not become \Seen
                    yield LoadRequest(unseen, False, False, True)
                    unseen = [m for m in unseen if m.damaged is None]
                if unseen and (yield StoreFlags([m.uid for m in unseen], SEEN, 0)):
                    for m in unseen:
                        m.flags |= SEEN
                    seen_now = {id(m) for m in unseen}
            for seq, msg in batch:
                problem = yield from self._fetch_one(seq, msg, plan, id(msg) in seen_now)
                if problem == "structure":
                    return self._done(tag, "NO", "[SERVERBUG] MIME structure unavailable")
                if problem == "damaged":
                    damaged.append(seq)
        if damaged:
            listed = ",".join(map(str, damaged[:20])) + (",..." if len(damaged) > 20 else "")
            return self._done(
                tag, "NO", f"[CORRUPTION] message(s) {listed} damaged on the server, not sent; delete them"
            )
        if missing:
            return self._done(tag, "NO", "[EXPUNGEISSUED] some of the requested messages were expunged")
        self._done(tag, "OK", "FETCH completed")

    def _fetch_one(self, seq: int, msg: Message, plan: FetchPlan, with_flags: bool) -> Generator[Step, Any, str | None]:
        """Send one message's FETCH response, piece by piece: small pieces gathered up to FETCH_CHUNK
        octets, body literals as SendFile, a part's header block loaded only for its item. Returns
        None, or what kept it from being sent at all: "damaged" (checked first), "structure"."""
        try:
            if plan.structure or plan.header or plan.body:
                yield LoadRequest([msg], plan.structure, plan.header, plan.body)
                if msg.damaged is not None:
                    return "damaged"
                if plan.structure and msg.structure is None:
                    return "structure"
            pending: list[bytes] = []
            size = 0
            pieces = fetch_response(seq, msg, plan, self._renderers, with_flags)
            answer: bytes | None = None
            while (piece := _next_piece(pieces, answer)) is not None:
                answer = None
                if isinstance(piece, bytes):
                    pending.append(piece)
                    size += len(piece)
                    if size < FETCH_CHUNK:
                        continue
                if pending:
                    self._send(b"".join(pending))
                    pending, size = [], 0
                if isinstance(piece, FileRange):
                    self._out.append(SendFile(msg.ref, piece.start, piece.length, piece.whole, with_flags))
                elif isinstance(piece, PartHeader):
                    answer = yield PartHeaderRequest(msg, piece.part)
                yield _FLUSH
            if pending:
                self._send(b"".join(pending))
            yield _FLUSH
            return None
        finally:
            msg.structure = msg.header = None

    def _cmd_store(self, tag: str, args: list[Token]) -> Task:
        yield from self._store(tag, args, uid_mode=False)

    def _store(self, tag: str, args: list[Token], uid_mode: bool) -> Task:
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
        for n, (seq, m) in enumerate(live, 1):
            m.flags = (m.flags | add) & ~remove
            if not silent:
                uid = f"UID {m.uid} " if uid_mode else ""
                self._send(f"* {seq} FETCH ({uid}FLAGS {flag_list(m.flags)})\r\n")
                if n % _BATCH == 0:
                    yield _FLUSH
        if len(live) != len(chosen):
            return self._done(tag, "NO", "[EXPUNGEISSUED] some of the messages were expunged")
        self._done(tag, "OK", "STORE completed")

    def _cmd_search(self, tag: str, args: list[Token]) -> Task:
        yield from self._search(tag, args, uid_mode=False)

    def _search(self, tag: str, args: list[Token], uid_mode: bool) -> Task:
        """Cheap keys first; the messages that pass them are read (off the loop, SEARCH_BATCH at a
        time) only when the search has header, date or text keys, within one ScanBudget."""
        search = parse_search(args)
        budget = ScanBudget(SEARCH_MAX_BYTES, SEARCH_MAX_SECONDS)
        hits: list[int] = []
        largest_seq = len(self._messages)
        largest_uid = self._messages[-1].uid if self._messages else 0
        for start in range(0, largest_seq, SEARCH_BATCH):
            batch = [
                (seq, m)
                for seq, m in enumerate(self._messages[start : start + SEARCH_BATCH], start + 1)
                if not m.gone and search.cheap(seq, m, largest_seq, largest_uid)
            ]
            if search.probes and batch:
                if not (yield ScanRequest([m for _, m in batch], search.probes, budget)):
                    return self._done(
                        tag,
                        "NO",
                        f"[LIMIT] SEARCH would read more than {SEARCH_MAX_BYTES >> 20} MB"
                        f" or take more than {SEARCH_MAX_SECONDS:.0f} s; narrow it down"
                        " (e.g. by UID, date or size)",
                    )
                batch = [(seq, m) for seq, m in batch if search.full(seq, m, largest_seq, largest_uid)]
                for m in self._messages[start : start + SEARCH_BATCH]:
                    m.probes = None
            hits.extend(m.uid if uid_mode else seq for seq, m in batch)
            yield _FLUSH
        self._send("* SEARCH" + "".join(f" {n}" for n in hits) + "\r\n")
        self._done(tag, "OK", "SEARCH completed")


def _next_piece(pieces: Generator[Piece, bytes | None, None], answer: bytes | None) -> Piece | None:
    try:
        return pieces.send(answer)
    except StopIteration:
        return None
