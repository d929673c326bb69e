# Protocol fuzzing of POP3 and IMAP (issue 20: "a fuzzing run of at least 10,000 generated inputs
# per protocol ... 0 crashes, 0 tracebacks in the log, and the hub still serving after each").
# One hub for the module; hypothesis (fixed seed: derandomized) generates sessions of 10-50 inputs
# each: valid commands with odd arguments, mutations of them, random bytes, over-long lines and
# literals, sent pipelined over a real socket from 127.0.0.2, before and after login. After every
# session: the hub closed on its own only after a closing reply (IMAP "* BYE", POP3 "-ERR"/"+OK"),
# closed when we half-closed (never hung), never said "internal error", logged no traceback, and a
# good client from 127.0.0.1 still logs in and reads the mailbox (refilled when the fuzzer deleted).
import base64
import imaplib
import os
import poplib
import smtplib
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import PASSWORD, Hub, hub_env
from fuzzutil import LogWatch, long_line, mutations, random_line, run_session

FUZZ_SOURCE = "127.0.0.2"  # the fuzzer's address; the good client's is 127.0.0.1
# hypothesis examples per protocol (20-25 inputs each); FUZZ_SESSIONS=5000 for a longer local run
SESSIONS = int(os.environ.get("FUZZ_SESSIONS", "500"))
MIN_INPUTS = 10_000
SITES = ("fuzz-pop3", "fuzz-imap", "sender")
MAILBOX_MAILS = 3


def _mails() -> list[bytes]:
    plain = (
        b"From: sender@hub.test\r\nTo: fuzz@hub.test\r\nSubject: =?utf-8?q?plain_=C3=A9?=\r\n"
        b"Date: Mon, 7 Feb 1994 21:52:25 -0800\r\nMessage-ID: <p@hub.test>\r\n\r\nhello\r\n.dot line\r\n"
    )
    nested = (
        b'From: "A, B" <sender@hub.test>\r\nTo: undisclosed-recipients:;\r\nSubject: nested\r\n'
        b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=outer\r\n\r\n"
        b"--outer\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\npart one\r\n"
        b"--outer\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\nContent-Type: multipart/alternative;"
        b" boundary=alt\r\n\r\n--alt\r\nContent-Type: text/plain\r\n\r\ninner text\r\n--alt\r\n"
        b"Content-Type: text/html\r\n\r\n<p>x</p>\r\n--alt--\r\n"
        b"--outer\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        b"AAECAwQ=\r\n--outer--\r\n"
    )
    folded = (
        b"From: sender@hub.test\r\nSubject: a\r\n  folded\r\n\tsubject\r\nX-Empty:\r\n"
        b"Content-Type: text/plain\r\n\r\n" + b"line\r\n" * 50
    )
    return [plain, nested, folded]


@pytest.fixture(scope="module")
def fuzz_hub(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("fuzz") / "data"
    # the seeded mails include MIME the encryption policy refuses (clear data, prefix boundaries):
    # the POP3 and IMAP parsers are under test here
    hub = Hub(data_dir, hub_env(data_dir, MAILHUB_ENCRYPTION_REQUIRED="false"))
    for site in SITES:
        hub.add_site(site)
    hub.start()
    try:
        yield hub
    finally:
        hub.stop()


def refill(hub: Hub, site: str, have: int) -> None:
    if have >= MAILBOX_MAILS:
        return
    with smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30) as smtp:
        smtp.login("sender", PASSWORD)
        for mail in _mails():
            smtp.sendmail("sender@hub.test", [f"{site}@hub.test"], mail)


def pop3_still_serving(hub: Hub) -> int:
    pop = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=30)
    try:
        pop.user("fuzz-pop3")
        pop.pass_(PASSWORD)
        count = pop.stat()[0]
        pop.quit()
        return count
    finally:
        pop.close()


def imap_still_serving(hub: Hub) -> int:
    imap = imaplib.IMAP4("127.0.0.1", hub.ports["imap"], timeout=30)
    imap.login("fuzz-imap", PASSWORD)
    typ, data = imap.select("INBOX")
    assert typ == "OK", data
    imap.logout()
    return int(data[0])


class Campaign:
    """Counts of one protocol's fuzzing, and the checks run after each session."""

    def __init__(self, hub: Hub, protocol: str, closing: tuple[bytes, ...], still_serving, site: str):
        self.hub, self.protocol, self.closing, self.still_serving, self.site = (
            hub,
            protocol,
            closing,
            still_serving,
            site,
        )
        self.log = LogWatch(hub.log_path)
        self.inputs = self.sessions = self.closed_by_hub = self.resets = 0
        self.started = time.monotonic()
        refill(hub, site, still_serving(hub))

    def run(self, inputs: list[bytes], final: bytes) -> None:
        self.log.crashes()  # what an earlier, failed session left is not this one's
        transcript = run_session(self.hub.ports[self.protocol], FUZZ_SOURCE, inputs, final)
        crashes = self.log.crashes()
        self.inputs += len(inputs)
        self.sessions += 1
        self.closed_by_hub += transcript.closed_by_hub
        assert crashes == []
        assert not transcript.hung, f"the hub did not close after our half-close; it sent {transcript.data[-300:]!r}"
        assert b"internal error" not in transcript.data, transcript.data[-500:]
        self.resets += transcript.reset
        if transcript.closed_by_hub and not transcript.reset:
            last = transcript.last_lines(3)
            assert any(line.startswith(self.closing) for line in last), (
                f"the hub closed without {self.closing}; its last lines: {last!r}"
            )
        refill(self.hub, self.site, self.still_serving(self.hub))

    def fuzz(self, sessions, final: bytes) -> None:
        """Run every generated session (hypothesis, derandomized), print the counts, check the total."""

        @FUZZ_SETTINGS
        @given(sessions)
        def session(inputs):
            self.run(inputs, final)

        session()
        print(self.report())
        assert self.inputs >= MIN_INPUTS, self.report()

    def report(self) -> str:
        return (
            f"{self.protocol} fuzz: {self.inputs} inputs in {self.sessions} sessions "
            f"({self.closed_by_hub} closed by the hub: {self.closed_by_hub - self.resets} after a closing "
            f"reply, {self.resets} reset with our input unread), "
            f"{time.monotonic() - self.started:.1f} s, 0 tracebacks"
        )


FUZZ_SETTINGS = settings(
    max_examples=SESSIONS, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)


def _line(strategy):
    return strategy.map(lambda data: data + b"\r\n")


def session_inputs(valid, extra):
    """A session's inputs: mostly valid lines, then mutations, random bytes, over-long lines."""
    one = st.one_of(valid, valid, valid, mutations(valid), random_line(), extra)
    return st.lists(one, min_size=12, max_size=50)


# ------------------------------------------------------------------------- POP3

_NUMBERS = st.sampled_from(
    [
        b"1",
        b"2",
        b"3",
        b"0",
        b"-1",
        b"4294967296",
        b"99999999999999999999",
        b"a",
        b"1 2",
        b"+1",
        b"0x1",
        b"\xef\xbc\x91",
        b"",
        b" 1",
        b"1\t",
    ]
)
_POP3_PLAIN = base64.b64encode(b"\0fuzz-pop3\0" + PASSWORD.encode())


def _pop3_command():
    numbered = st.builds(
        lambda verb, n: verb + b" " + n,
        st.sampled_from([b"LIST", b"RETR", b"DELE", b"UIDL", b"TOP", b"LIST", b"RETR", b"dele", b"TOP 1"]),
        _NUMBERS,
    )
    top = st.builds(lambda a, b: b"TOP " + a + b" " + b, _NUMBERS, _NUMBERS)
    simple = st.sampled_from(
        [
            b"STAT",
            b"LIST",
            b"UIDL",
            b"NOOP",
            b"RSET",
            b"CAPA",
            b"STLS",
            b"AUTH",
            b"AUTH PLAIN",
            b"AUTH LOGIN",
            b"AUTH CRAM-MD5 x",
            b"*",
            b"=",
            b"AUTH PLAIN =",
            b"AUTH PLAIN !!!",
            b"AUTH PLAIN " + base64.b64encode(b"a\0b"),
            b"APOP fuzz-pop3 0123456789abcdef",
            b"LAST",
            b"XTND XLIST",
            b"UTF8",
            b"LANG",
            b"USER",
            b"USER a b",
            b"CAPA x",
            b"STAT 1",
            b"NOOP x",
            b"QUIT x",
            b"stat",
            b"\tSTAT",
            b"STAT\r",
        ]
    )
    return st.one_of(numbered, top, simple)


_POP3_LOGINS = [b"USER fuzz-pop3", b"PASS " + PASSWORD.encode(), b"AUTH PLAIN " + _POP3_PLAIN]


def pop3_session():
    valid = _line(_pop3_command())
    extra = long_line([b"x", b"RETR 1 ", b"USER " + b"u" * 10])
    prefix = st.sampled_from(
        [
            [],
            [_POP3_LOGINS[0] + b"\r\n", _POP3_LOGINS[1] + b"\r\n"],
            [_POP3_LOGINS[2] + b"\r\n"],
            [b"AUTH PLAIN\r\n", _POP3_PLAIN + b"\r\n"],
        ]
    )
    return st.builds(lambda head, body: head + body, prefix, session_inputs(valid, extra))


def test_pop3_fuzz(fuzz_hub):
    campaign = Campaign(fuzz_hub, "pop3", (b"-ERR", b"+OK"), pop3_still_serving, "fuzz-pop3")
    campaign.fuzz(pop3_session(), b"QUIT\r\n")


# ------------------------------------------------------------------------- IMAP

_SEQ = st.sampled_from(
    [
        b"1",
        b"*",
        b"1:*",
        b"2:4",
        b"*:1",
        b"1,3,5",
        b"0",
        b"4294967295",
        b"4294967296",
        b"99999999999999999999",
        b"1:",
        b":",
        b"1,,2",
        b"$",
        b"3:2,1:*,*",
        b"1:0",
    ]
)
_SECTION = st.sampled_from(
    [
        b"",
        b"HEADER",
        b"TEXT",
        b"MIME",
        b"1",
        b"1.2",
        b"1.MIME",
        b"2.HEADER",
        b"2.1.2",
        b"HEADER.FIELDS (SUBJECT FROM)",
        b"HEADER.FIELDS.NOT (TO)",
        b"1.2.3.4.5.6.7.8.9.10",
        b"0",
        b"HEADER.FIELDS ()",
        b"HEADER.FIELDS",
        b"4294967296",
        b"2.TEXT",
        b"3.1",
        b'HEADER.FIELDS ("SUBJECT" {4}\r\nFROM)',
    ]
)
_PARTIAL = st.sampled_from([b"", b"", b"<0.10>", b"<5.0>", b"<0>", b"<4294967296.1>", b"<1.99999999999>", b"<a.b>"])
_FETCH_ATT = st.one_of(
    st.sampled_from(
        [
            b"FLAGS",
            b"UID",
            b"RFC822.SIZE",
            b"INTERNALDATE",
            b"ENVELOPE",
            b"BODYSTRUCTURE",
            b"BODY",
            b"RFC822",
            b"RFC822.HEADER",
            b"RFC822.TEXT",
            b"ALL",
            b"FAST",
            b"FULL",
            b"BINARY[1]",
            b"BINARY.SIZE[1]",
            b"MODSEQ",
            b"X-GM-MSGID",
            b"BODY[",
            b"BODY[]<",
            b"()",
        ]
    ),
    st.builds(
        lambda peek, section, partial: peek + b"[" + section + b"]" + partial,
        st.sampled_from([b"BODY", b"BODY.PEEK", b"body.peek"]),
        _SECTION,
        _PARTIAL,
    ),
)
_FETCH_ITEMS = st.one_of(_FETCH_ATT, st.lists(_FETCH_ATT, max_size=6).map(lambda atts: b"(" + b" ".join(atts) + b")"))
_SEARCH_KEY = st.recursive(
    st.sampled_from(
        [
            b"ALL",
            b"SEEN",
            b"UNSEEN",
            b"DELETED",
            b"NEW",
            b"OLD",
            b"RECENT",
            b"ANSWERED",
            b"FLAGGED",
            b"DRAFT",
            b"UNDRAFT",
            b"LARGER 10",
            b"SMALLER 99999999999999999999",
            b"SUBJECT x",
            b'FROM "a b"',
            b'HEADER Subject ""',
            b"BEFORE 1-Jan-2020",
            b"SINCE 32-Foo-1999",
            b"ON 1-Jan-20000",
            b"SENTBEFORE 1-Jan-2020",
            b"SENTON 7-Feb-1994",
            b"UID 1:*",
            b"KEYWORD \\Seen",
            b"UNKEYWORD $x",
            b"TEXT x",
            b"BODY y",
            b"1:3",
            b"*",
            b"CHARSET UTF-8 ALL",
            b"HEADER",
            b"LARGER",
            b"LARGER -1",
            b"TO {3}\r\nabc",
            b'CC "\\"q\\""',
            b"()",
            b"(",
            b")",
        ]
    ),
    lambda key: st.one_of(
        key.map(lambda k: b"NOT " + k),
        st.builds(lambda a, b: b"OR " + a + b" " + b, key, key),
        st.lists(key, min_size=1, max_size=3).map(lambda ks: b"(" + b" ".join(ks) + b")"),
    ),
    max_leaves=6,
)
_MAILBOX = st.sampled_from(
    [
        b"INBOX",
        b'"INBOX"',
        b"inbox",
        b'""',
        b"a/b",
        b"{5}\r\nINBOX",
        b"{5+}\r\nINBOX",
        b'"quo\\"ted"',
        b"&AAA-",
        b"NIL",
        b"*",
        b"%",
        b"INBOX/x",
        b"{0}\r\n",
        b"~{5}\r\nINBOX",
    ]
)
_FLAGS = st.sampled_from(
    [
        b"(\\Seen)",
        b"(\\Deleted \\Seen)",
        b"\\Flagged",
        b"()",
        b"(\\Recent)",
        b"($Junk)",
        b"(\\Bogus)",
        b"(\\\\)",
        b"(\\Answered \\Draft)",
        b"(",
    ]
)
_IMAP_PLAIN = base64.b64encode(b"\0fuzz-imap\0" + PASSWORD.encode())


def _imap_command():
    return st.one_of(
        st.sampled_from(
            [
                b"CAPABILITY",
                b"NOOP",
                b"CHECK",
                b"EXPUNGE",
                b"UNSELECT",
                b"NAMESPACE",
                b"IDLE\r\nDONE",
                b"IDLE\r\nNOPE",
                b"IDLE x",
                b"CLOSE",
                b'ID ("name" "fuzz" "version" NIL)',
                b"ID NIL",
                b"ID (" + b'"k" "v" ' * 40 + b")",
                b"ENABLE UTF8=ACCEPT",
                b"UID EXPUNGE 1:*",
                b"UID BOGUS",
                b'XLIST "" *',
                b"GETQUOTAROOT INBOX",
                b"CREATE x",
                b"DELETE INBOX",
                b"RENAME a b",
                b"APPEND INBOX {10}\r\n0123456789",
                b"APPEND INBOX (\\Seen) {3+}\r\nabc",
                b"COPY 1 INBOX",
                b"MOVE 1:* x",
                b"STARTTLS",
                b"LOGIN fuzz-imap " + PASSWORD.encode(),
                b"AUTHENTICATE PLAIN " + _IMAP_PLAIN,
                b"AUTHENTICATE PLAIN\r\n" + _IMAP_PLAIN,
                b"AUTHENTICATE PLAIN\r\n*",
                b"AUTHENTICATE PLAIN\r\n!!!",
                b"AUTHENTICATE LOGIN",
                b"LOGIN {9}\r\nfuzz-imap {" + str(len(PASSWORD)).encode() + b"}\r\n" + PASSWORD.encode(),
                b"SELECT {4294967296}",
                b"SELECT {99999999999}",
                b"SELECT {-1}",
                b"SELECT {100000}",
                b"SELECT {70000+}",
                b"SELECT {3}\r\nab",
                b"FETCH",
                b"SEARCH",
                b"STORE 1",
                b"UID",
                b'LSUB "" *',
                b'LIST "" ""',
                b'LIST "" %',
                b"LIST {1}\r\n* *",
            ]
        ),
        st.builds(
            lambda verb, box: verb + b" " + box,
            st.sampled_from([b"SELECT", b"EXAMINE", b"SUBSCRIBE", b"UNSUBSCRIBE", b"STATUS"]),
            _MAILBOX,
        ),
        st.builds(
            lambda box, items: b"STATUS " + box + b" " + items,
            _MAILBOX,
            st.sampled_from(
                [b"(MESSAGES UIDNEXT UIDVALIDITY UNSEEN RECENT)", b"()", b"(BOGUS)", b"MESSAGES", b"(MESSAGES"]
            ),
        ),
        st.builds(
            lambda verb, ref, pattern: verb + b" " + ref + b" " + pattern,
            st.sampled_from([b"LIST", b"LSUB"]),
            st.sampled_from([b'""', b"INBOX", b'"*"', b"%", b"{0}\r\n"]),
            st.sampled_from([b"*", b"%", b'"*%*%*%*%x"', b"INBOX", b'"IN*X"', b'""', b"~{1}\r\n*"]),
        ),
        st.builds(
            lambda uid, seq, items: uid + b"FETCH " + seq + b" " + items,
            st.sampled_from([b"", b"UID "]),
            _SEQ,
            _FETCH_ITEMS,
        ),
        st.builds(
            lambda uid, seq, how, flags: uid + b"STORE " + seq + b" " + how + b" " + flags,
            st.sampled_from([b"", b"UID "]),
            _SEQ,
            st.sampled_from([b"+FLAGS", b"-FLAGS", b"FLAGS", b"+FLAGS.SILENT", b"BOGUS", b"-flags.silent"]),
            _FLAGS,
        ),
        st.builds(
            lambda uid, keys: uid + b"SEARCH " + b" ".join(keys),
            st.sampled_from([b"", b"UID "]),
            st.lists(_SEARCH_KEY, min_size=1, max_size=3),
        ),
    )


_TAGS = st.sampled_from(
    [b"a1", b"a2", b"b3", b"c4", b"d5", b"X", b"A.B", b"1", b"*", b"+", b"a\x00", b"(", b"", b"a" * 70, b"t{1}"]
)


def imap_session():
    valid = st.builds(lambda tag, command: tag + b" " + command + b"\r\n", _TAGS, _imap_command())
    extra = long_line([b"x", b"a FETCH 1 (", b"{1}"])
    login = b"L LOGIN fuzz-imap " + PASSWORD.encode() + b"\r\n"
    prefix = st.sampled_from(
        [
            [],
            [login],
            [login, b"S SELECT INBOX\r\n"],
            [login, b"S EXAMINE INBOX\r\n"],
            [b"L AUTHENTICATE PLAIN " + _IMAP_PLAIN + b"\r\n", b"S SELECT INBOX\r\n"],
        ]
    )
    return st.builds(lambda head, body: head + body, prefix, session_inputs(valid, extra))


def test_imap_fuzz(fuzz_hub):
    campaign = Campaign(fuzz_hub, "imap", (b"* BYE",), imap_still_serving, "fuzz-imap")
    campaign.fuzz(imap_session(), b"ZZ LOGOUT\r\n")
