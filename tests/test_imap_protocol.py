# The IMAP core (relay/imap/protocol.py) and its parser in memory, without sockets: exact wire bytes
# for literals, pipelining, malformed commands and sequence sets, and a hypothesis test that feeds
# random and malformed commands (in random chunkings) and checks that the core never raises and that
# every line it writes outside literals is a tagged status, an untagged reply or a continuation.
import base64
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.imap.parser import CommandFramer, LiteralRequest, ParseError, fetch_att, sequence_set, tokenize
from relay.imap.protocol import (
    CLOSED,
    NEED_DATA,
    YIELD,
    AuthRequest,
    CloseConnection,
    ExpungeRequest,
    ImapConnection,
    LoadRequest,
    MailboxRequest,
    Message,
    PartHeaderRequest,
    ScanRequest,
    SendBytes,
    SendFile,
    Snapshot,
    StartTls,
    StoreFlags,
)
from relay.imap.scan import header_contains, sent_date


class FakeRenderers:
    @staticmethod
    def bodystructure(structure, extensible=True):
        return b'("TEXT" "PLAIN" NIL NIL NIL "7BIT" 10 1)'

    @staticmethod
    def envelope(structure):
        return b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"

    @staticmethod
    def section_range(structure, section):
        return (20, 30) if section == "1" else None


HEADER = b"Subject: hi\r\nFrom: a@b\r\n\r\n"


def messages():
    return [Message(uid, 100, flags, 1_800_000_000.0, ref=f"m{uid}") for uid, flags in ((3, 0), (5, 1), (9, 8))]


def run(data_chunks, *, tls=False, plaintext=True, site="site", damaged=()):
    """Drive a core like the adapter does; return (wire bytes, events seen). `damaged`: refs of
    messages the adapter's check finds damaged."""
    core = ImapConnection(
        greeting_host="hub.test", starttls_available=True, plaintext_login_allowed=plaintext, renderers=FakeRenderers
    )
    out = [core.initial_bytes()]
    events = []
    chunks = list(data_chunks)
    box = messages()
    while True:
        ev = core.next_event()
        if ev is CLOSED:
            break
        if ev is NEED_DATA:
            core.receive_data(chunks.pop(0) if chunks else b"")
            continue
        if ev is YIELD:
            continue
        events.append(ev)
        if isinstance(ev, SendBytes):
            out.append(ev.data)
        elif isinstance(ev, SendFile):
            out.append(b"F" * ev.length)
        elif isinstance(ev, AuthRequest):
            core.resume(site if ev.password == "pw" else None)
        elif isinstance(ev, MailboxRequest):
            core.resume(Snapshot(77, 10, [Message(m.uid, m.size, m.flags, m.internal_date, m.ref) for m in box]))
        elif isinstance(ev, LoadRequest):
            for m in ev.messages:
                m.damaged = "blob file cut short" if ev.check and m.ref in damaged else None
                m.structure = {} if ev.structure else None
                m.header = HEADER if ev.header else None
            core.resume(None)
        elif isinstance(ev, PartHeaderRequest):
            core.resume(b"Subject: inner\r\nX-A: 1\r\n\r\n")
        elif isinstance(ev, ScanRequest):
            for m in ev.messages:
                m.probes = {p: scan_probe(p) for p in ev.probes}
            core.resume(True)
        elif isinstance(ev, StoreFlags):
            for m in box:
                if m.uid in ev.uids:
                    m.flags = (m.flags | ev.add) & ~ev.remove
            core.resume(True)
        elif isinstance(ev, ExpungeRequest):
            box[:] = [m for m in box if m.uid not in ev.uids]
            core.resume("ok")
        elif isinstance(ev, StartTls):
            core.resume(None)
        elif isinstance(ev, CloseConnection):
            pass
    return b"".join(out), events


def scan_probe(probe):
    """What relay/imap/scan.py answers for a message of HEADER and body BODY_TEXT."""
    if probe[0] == "H":
        return header_contains(HEADER, probe[1], probe[2])
    if probe[0] == "D":
        return sent_date(HEADER)
    return probe[1] in (BODY_TEXT if probe[0] == "B" else HEADER + BODY_TEXT).lower()


BODY_TEXT = b"Body Text\r\n"


def test_login_select_fetch_wire_bytes():
    wire, events = run(
        [
            b"a LOGIN site pw\r\nb SELECT inbox\r\nc FETCH 2 (UID FLAGS BODY.PEEK[]<10.20>)\r\n"
            b"d UID FETCH 9 BODY.PEEK[1]\r\ne LOGOUT\r\n"
        ]
    )
    assert b"a OK [CAPABILITY " in wire
    assert (
        b"* 3 EXISTS\r\n* 0 RECENT\r\n* OK [UNSEEN 1] first unseen\r\n* OK [UIDVALIDITY 77] UIDs valid\r\n"
        b"* OK [UIDNEXT 10] predicted next UID\r\nb OK [READ-WRITE] SELECT completed\r\n" in wire
    )
    assert b"* 2 FETCH (UID 5 FLAGS (\\Seen) BODY[]<10> {20}\r\n" + b"F" * 20 + b")\r\nc OK FETCH completed\r\n" in wire
    assert b"* 3 FETCH (UID 9 BODY[1] {10}\r\n" + b"F" * 10 + b")\r\nd OK" in wire
    files = [e for e in events if isinstance(e, SendFile)]
    assert [(f.ref, f.start, f.length, f.whole) for f in files] == [("m5", 10, 20, False), ("m9", 20, 10, False)]
    assert wire.endswith(b"* BYE hub.test IMAP4rev1 server signing off\r\ne OK LOGOUT completed\r\n")


def test_login_arguments_as_atoms_quoted_strings_and_literals():
    for login in (b'a LOGIN site "pw"', b"a LOGIN {4+}\r\nsite pw", b'a LOGIN "si\\\\te" pw'):
        wire, events = run([login + b"\r\n"])
        auth = next(e for e in events if isinstance(e, AuthRequest))
        assert (auth.user, auth.password) == ("site" if b"\\" not in login else "si\\te", "pw"), login
    wire, events = run([b"a LOGIN x]y p]w\r\n"])
    assert next(e for e in events if isinstance(e, AuthRequest)).password == "p]w"


def test_synchronizing_literal_gets_a_continuation_and_literal_plus_does_not():
    wire, _ = run([b"a LOGIN {4}\r\n", b"site {2+}\r\npw\r\nb NOOP\r\n"])
    assert wire.count(b"+ Ready for literal data\r\n") == 1
    assert b"a OK [CAPABILITY" in wire and b"b OK NOOP completed" in wire


def test_fetch_sets_seen_and_reports_flags_once():
    wire, events = run([b"a LOGIN site pw\r\nb SELECT INBOX\r\nc FETCH 1 (BODY[HEADER.FIELDS (subject)])\r\n"])
    assert b"* 1 FETCH (BODY[HEADER.FIELDS (SUBJECT)] {15}\r\nSubject: hi\r\n\r\n FLAGS (\\Seen))\r\n" in wire
    assert StoreFlags([3], 1, 0) in events


def test_header_fields_of_the_message_and_of_a_part():
    wire, events = run(
        [
            b"a LOGIN site pw\r\nb EXAMINE INBOX\r\n"
            b"c FETCH 1 (BODY[1.HEADER.FIELDS (SUBJECT)] BODY.PEEK[HEADER.FIELDS.NOT (SUBJECT)])\r\n"
        ]
    )
    assert (
        b"* 1 FETCH (BODY[1.HEADER.FIELDS (SUBJECT)] {18}\r\nSubject: inner\r\n\r\n "
        b"BODY[HEADER.FIELDS.NOT (SUBJECT)] {13}\r\nFrom: a@b\r\n\r\n)\r\nc OK" in wire
    )
    load = next(e for e in events if isinstance(e, LoadRequest))
    assert (load.structure, load.header) == (True, True)
    part = next(e for e in events if isinstance(e, PartHeaderRequest))
    assert part.part == "1" and part.message.uid == 3
    assert not any(isinstance(e, StoreFlags) for e in events)  # EXAMINE: no \Seen


def test_store_search_expunge():
    wire, _ = run(
        [
            b"a LOGIN site pw\r\nb SELECT INBOX\r\nc STORE 1:2 +FLAGS (\\Deleted)\r\n"
            b"d SEARCH DELETED\r\ne UID SEARCH UNDELETED\r\nf EXPUNGE\r\ng SEARCH ALL\r\n"
        ]
    )
    assert b"* 1 FETCH (FLAGS (\\Deleted))\r\n* 2 FETCH (FLAGS (\\Deleted \\Seen))\r\nc OK" in wire
    assert b"* SEARCH 1 2 3\r\nd OK" in wire
    assert b"* SEARCH\r\ne OK" in wire
    assert b"* 3 EXPUNGE\r\n* 2 EXPUNGE\r\n* 1 EXPUNGE\r\nf OK EXPUNGE completed" in wire
    assert b"* SEARCH\r\ng OK" in wire


def test_bad_input_gets_bad_replies():
    wire, _ = run(
        [
            b'\r\nfoo\r\na FROB\r\nb FETCH 1 BODY[\r\nb2 FETCH 1 FLAGS\r\nc SELECT INBOX\r\nd LOGIN "x\r\n'
            b"e AUTHENTICATE PLAIN !!!\r\n" + b"f NOOP " + b"x" * 9000 + b"\r\ng NOOP\r\n"
        ]
    )
    assert b"* BAD expected: tag command [arguments]\r\n" in wire
    assert b"foo BAD expected: tag command" in wire
    assert b"a BAD unknown command\r\n" in wire
    assert b"b BAD unterminated [\r\n" in wire
    assert b"b2 BAD FETCH not allowed in the not authenticated state\r\n" in wire
    assert b"c BAD SELECT not allowed in the not authenticated state\r\n" in wire
    assert b"d BAD unterminated quoted string\r\n" in wire
    assert b"e BAD malformed PLAIN response\r\n" in wire
    assert b"f BAD command line too long (at most 8192 octets with its literals before login)\r\n" in wire
    assert b"g OK NOOP completed\r\n" in wire
    # after login the limit is 64 KB
    wire, _ = run(
        [b"a LOGIN site pw\r\n", b"f NOOP " + b"x" * 9000 + b"\r\n", b"g NOOP " + b"x" * 70000 + b"\r\n", b"h NOOP\r\n"]
    )
    assert b"f OK NOOP" in wire and b"g BAD command line too long (at most 65536 octets with its literals)\r\n" in wire
    assert b"h OK NOOP" in wire
    # before login, more than 24 KB of input at once ends the connection
    wire, _ = run([b"a NOOP\r\n" * 4000])
    assert wire.endswith(b"* BYE too much input\r\n")


def test_plaintext_refused_and_authenticate_plain():
    wire, _ = run([b"a LOGIN site pw\r\nb CAPABILITY\r\n"], plaintext=False)
    assert b"LOGINDISABLED" in wire and b"STARTTLS" in wire
    assert b"a NO [PRIVACYREQUIRED] plaintext login refused; use STARTTLS\r\n" in wire
    token = base64.b64encode(b"\0site\0pw")
    wire, _ = run([b"a AUTHENTICATE PLAIN\r\n", token + b"\r\n"])
    assert b"+ \r\na OK [CAPABILITY" in wire


def test_three_failed_logins_close():
    wire, _ = run([b"a LOGIN site x\r\nb LOGIN site y\r\nc LOGIN site z\r\nd NOOP\r\n"])
    assert wire.endswith(b"c NO [AUTHENTICATIONFAILED] authentication failed\r\n* BYE too many failures\r\n")


def test_idle_reports_changes_and_ends_on_done():
    core = ImapConnection(
        greeting_host="h", starttls_available=False, plaintext_login_allowed=True, renderers=FakeRenderers
    )
    core.receive_data(b"a LOGIN site pw\r\nb SELECT INBOX\r\nc IDLE\r\n")
    box = messages()
    out = []

    def pump():
        while (ev := core.next_event()) is not NEED_DATA:
            if isinstance(ev, SendBytes):
                out.append(ev.data)
            elif isinstance(ev, AuthRequest):
                core.resume("site")
            elif isinstance(ev, MailboxRequest):
                core.resume(Snapshot(1, 20, [Message(m.uid, m.size, m.flags, 0.0) for m in box]))

    pump()
    assert out[-1] == b"+ idling\r\n" and core.idling
    box.append(Message(12, 5, 0, 0.0))
    del box[0]
    core.mailbox_changed()
    pump()
    assert b"".join(out[-2:]) == b"* 4 EXISTS\r\n* 1 EXPUNGE\r\n"
    core.receive_data(b"DONE\r\n")
    pump()
    assert out[-1] == b"c OK IDLE terminated\r\n"
    # a change before IDLE is reported after the "+", where clients look for it
    box.append(Message(13, 5, 0, 0.0))
    core.mailbox_changed()
    core.receive_data(b"d IDLE\r\n")
    pump()
    assert b"".join(out[-2:]) == b"+ idling\r\n* 4 EXISTS\r\n"


def test_sequence_sets_in_an_empty_mailbox():
    core = ImapConnection(
        greeting_host="h", starttls_available=False, plaintext_login_allowed=True, renderers=FakeRenderers
    )
    core.receive_data(
        b"a LOGIN site pw\r\nb SELECT INBOX\r\nc FETCH 1:* FLAGS\r\nd STORE * +FLAGS \\Seen\r\n"
        b"e FETCH 1 FLAGS\r\nf SEARCH 1:*\r\ng UID FETCH 1:* FLAGS\r\n"
    )
    out = []
    while (ev := core.next_event()) is not NEED_DATA:
        if isinstance(ev, SendBytes):
            out.append(ev.data)
        elif isinstance(ev, AuthRequest):
            core.resume("site")
        elif isinstance(ev, MailboxRequest):
            core.resume(Snapshot(1, 1, []))
    wire = b"".join(out)
    assert (
        b"c OK FETCH completed\r\nd OK STORE completed\r\ne BAD invalid message sequence number\r\n"
        b"* SEARCH\r\nf OK SEARCH completed\r\ng OK FETCH completed\r\n" in wire
    )


def test_messages_expunged_elsewhere():
    core = ImapConnection(
        greeting_host="h", starttls_available=False, plaintext_login_allowed=True, renderers=FakeRenderers
    )
    box = messages()
    out = []

    def pump(data: bytes) -> bytes:
        core.receive_data(data)
        out.clear()
        while (ev := core.next_event()) is not NEED_DATA:
            if isinstance(ev, SendBytes):
                out.append(ev.data)
            elif isinstance(ev, SendFile):
                out.append(b"F" * ev.length)
            elif isinstance(ev, AuthRequest):
                core.resume("site")
            elif isinstance(ev, MailboxRequest):
                core.resume(Snapshot(1, 20, [Message(m.uid, m.size, m.flags, 0.0, m.ref) for m in box]))
            elif isinstance(ev, LoadRequest):  # a body literal is checked first (msg.damaged)
                assert ev.check
                core.resume(None)
        return b"".join(out)

    pump(b"a LOGIN site pw\r\nb SELECT INBOX\r\n")
    del box[0]
    core.mailbox_changed()
    # flags and sizes still come from the session's view; no EXPUNGE in the middle of FETCH
    assert pump(b"c FETCH 1:* (FLAGS)\r\n") == (
        b"* 1 FETCH (FLAGS ())\r\n* 2 FETCH (FLAGS (\\Seen))\r\n"
        b"* 3 FETCH (FLAGS (\\Deleted))\r\nc OK FETCH completed\r\n"
    )
    wire = pump(b"d FETCH 1:2 (BODY.PEEK[]<0.4>)\r\n")
    assert (
        wire
        == b"* 2 FETCH (BODY[]<0> {4}\r\nFFFF)\r\nd NO [EXPUNGEISSUED] some of the requested messages were expunged\r\n"
    )
    assert pump(b"e NOOP\r\n") == b"* 1 EXPUNGE\r\ne OK NOOP completed\r\n"


def test_a_damaged_message_gets_no_byte_of_its_fetch_response_and_a_tagged_no():
    wire, events = run(
        [
            b"a LOGIN site pw\r\nb SELECT INBOX\r\nc FETCH 1:3 (UID BODY.PEEK[])\r\n"
            b"d FETCH 2 (UID FLAGS RFC822.SIZE)\r\ne UID FETCH 5 BODY.PEEK[TEXT]\r\n"
        ],
        damaged={"m5"},
    )
    assert (
        b"* 1 FETCH (UID 3 BODY[] {100}\r\n" + b"F" * 100 + b")\r\n"
        b"* 3 FETCH (UID 9 BODY[] {100}\r\n" + b"F" * 100 + b")\r\n"
        b"c NO [CORRUPTION] message(s) 2 damaged on the server, not sent; delete them\r\n"
    ) in wire
    assert b"* 2 FETCH (UID 5 FLAGS (\\Seen) RFC822.SIZE 100)\r\nd OK" in wire  # no body: answered
    assert b"* 2 FETCH" not in wire.split(b"d OK")[1].split(b"e NO")[0]
    assert b"e NO [CORRUPTION] message(s) 2 damaged" in wire
    assert [e.ref for e in events if isinstance(e, SendFile)] == ["m3", "m9"]


def test_parser_units():
    assert sequence_set(tokenize_one("1:3,7,*:9")) == [(1, 3), (7, 7), (0, 9)]
    for bad in ("0", "1:", "a", "1,,2", "4294967296"):
        with pytest.raises(ParseError):
            sequence_set(tokenize_one(bad))
    (att,) = fetch_att(tokenize_one("BODY.PEEK[1.2.MIME]<5.6>"))
    assert (att.name, att.section, att.partial) == ("BODY.PEEK", "1.2.MIME", (5, 6))
    for bad in ("BODY[0]", "BODY[MIME]", "BODY[1.FOO]", "BODY[HEADER.FIELDS]", "BOD", "BODY[]<1>"):
        with pytest.raises(ParseError):
            fetch_att(tokenize_one(bad))
    framer = CommandFramer(64 * 1024, 256 * 1024)
    framer.feed(b"t APPEND INBOX {999999}\r\n")
    assert framer.next_item().__class__.__name__ == "TooLong"
    framer.feed(b"u LOGIN {1}\r\n")
    assert framer.next_item() == LiteralRequest("u", 1, "LOGIN")


def tokenize_one(text: str):
    from relay.imap.parser import Command

    return tokenize(Command("t", ((b"t X " + text.encode()),)))[2]


_TAGGED = re.compile(rb'([^\x00-\x20\x7f-\xff(){%*"\\+]+) (OK|NO|BAD) ')
_WORDS = [
    b"LOGIN site pw",
    b"SELECT INBOX",
    b"EXAMINE INBOX",
    b"FETCH",
    b"UID FETCH",
    b"STORE",
    b"SEARCH",
    b"UID SEARCH",
    b"EXPUNGE",
    b"UID EXPUNGE",
    b"IDLE",
    b"DONE",
    b"NOOP",
    b"CLOSE",
    b"UNSELECT",
    b"STATUS",
    b"LIST",
    b"LSUB",
    b"AUTHENTICATE PLAIN",
    b"STARTTLS",
    b"CAPABILITY",
    b"NAMESPACE",
    b"ID NIL",
    b"CHECK",
]
_ARGS = [
    b"1",
    b"1:*",
    b"*",
    b"2,3:4",
    b"0",
    b"(FLAGS UID)",
    b"BODY[]",
    b"BODY.PEEK[1.2]<0.5>",
    b"(BODY[HEADER.FIELDS (A B)])",
    b"+FLAGS",
    b"-FLAGS.SILENT",
    b"FLAGS",
    b"(\\Seen \\Deleted)",
    b"\\Flagged",
    b"ALL",
    b"UNSEEN",
    b"OR SEEN",
    b"NOT",
    b"SINCE 1-Jan-2020",
    b"BEFORE 31-Feb-2020",
    b"HEADER Subject hi",
    b"(",
    b")",
    b'"x"',
    b'"',
    b"{3}\r\nabc",
    b"{2+}\r\nxy",
    b"{99999999999}",
    b'"INBOX"',
    b"(MESSAGES UNSEEN)",
    b"\x00",
    b"\xff",
    b"[",
    b"]",
    b"BODY[TEXT]<0.0>",
    b"RFC822",
    b"ENVELOPE",
    b"BODYSTRUCTURE",
    b"CHARSET UTF-8",
    b"LARGER 5",
    b"UID 1:*",
]
_command = st.builds(
    lambda tag, verb, args: tag + b" " + verb + b"".join(b" " + a for a in args) + b"\r\n",
    st.sampled_from([b"a1", b"b2", b"*", b"c.3", b""]),
    st.sampled_from(_WORDS),
    st.lists(st.sampled_from(_ARGS), max_size=4),
)
_garbage = st.binary(max_size=60).map(lambda b: b + b"\r\n")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.one_of(_command, _command, _garbage), max_size=12),
    st.lists(st.integers(1, 40), max_size=20),
    st.booleans(),
)
def test_random_and_malformed_commands_never_crash(commands, cuts, plaintext):
    data = b"a0 LOGIN site pw\r\n" + b"".join(commands)
    chunks, pos = [], 0
    for cut in cuts:
        chunks.append(data[pos : pos + cut])
        pos += cut
    chunks.append(data[pos:])
    wire, _ = run([c for c in chunks if c], plaintext=plaintext)
    # every line the server wrote (outside literals) is a status, an untagged reply or a continuation
    text = re.sub(rb"\{(\d+)\}\r\n", lambda m: b"{" + m.group(1) + b"}\r\n", wire)
    for line in re.split(rb"\r\n", re.sub(rb"F+", b"", text)):
        if line:
            assert (
                line[:1] in b"*+"
                or _TAGGED.match(line)
                or line.startswith((b")", b" "))
                or b"FETCH" in line
                or line.startswith((b"Subject:", b"From:"))
            ), line
