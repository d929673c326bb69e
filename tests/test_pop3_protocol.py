"""Tests for relay.pop3.protocol: exact wire bytes, in memory, no sockets."""

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.framing import dot_stuff, message_terminator
from relay.pop3 import protocol as pop3_protocol

CLOSED, NEED_DATA, PAUSED = pop3_protocol.CLOSED, pop3_protocol.NEED_DATA, pop3_protocol.PAUSED
AuthRequest, CloseConnection = pop3_protocol.AuthRequest, pop3_protocol.CloseConnection
MaildropEntry, Pop3Connection = pop3_protocol.MaildropEntry, pop3_protocol.Pop3Connection
Pop3ProtocolError, SendBytes = pop3_protocol.Pop3ProtocolError, pop3_protocol.SendBytes
SendMessage, StartTls, State = pop3_protocol.SendMessage, pop3_protocol.StartTls, pop3_protocol.State
CheckMessage = pop3_protocol.CheckMessage
TopFilter, Update = pop3_protocol.TopFilter, pop3_protocol.Update
system_error = pop3_protocol.system_error

HOST = "pop.example.org"
M1 = MaildropEntry("uid-1", 120, False, "ref1")
M2 = MaildropEntry("uid-2", 200, True, "ref2")
M3 = MaildropEntry("uid-3", 300, False, "ref3")
MAILDROP = [M1, M2, M3]
USERS = {"alice": "s3cret", "bob": "pw with spaces"}


def make(**kw):
    args = dict(greeting_host=HOST, stls_available=True, plaintext_login_allowed=True)
    args.update(kw)
    return Pop3Connection(**args)


def b64(s):
    return base64.b64encode(s.encode()).decode()


class FakeAdapter:
    """Plays the adapter: answers every event at once and renders adapter work
    as bracketed markers in the wire transcript."""

    def __init__(self, conn, maildrop=MAILDROP, in_use=False, update_ok=True, damaged=None):
        self.conn, self.maildrop, self.in_use, self.update_ok = conn, maildrop, in_use, update_ok
        self.damaged = damaged or {}  # uid -> the problem check_result is told
        self.events, self.closed, self.auth_requests = [], False, []

    def feed(self, data: bytes) -> bytes:
        self.conn.receive_data(data)
        return self.pump()

    def pump(self) -> bytes:
        out = bytearray()
        while True:
            ev = self.conn.next_event()
            if ev is NEED_DATA or ev is CLOSED:
                return bytes(out)
            assert ev is not PAUSED
            self.events.append(ev)
            if isinstance(ev, SendBytes):
                out += ev.data
            elif isinstance(ev, AuthRequest):
                self.auth_requests.append(ev)
                ok = USERS.get(ev.user) == ev.password
                out += self.conn.auth_result(ok, self.in_use and ok, self.maildrop if ok else None)
            elif isinstance(ev, CheckMessage):
                out += self.conn.check_result(self.damaged.get(ev.entry.uid))
            elif isinstance(ev, SendMessage):
                out += f"[{ev.entry.uid} {ev.body_lines}]".encode() + b".\r\n"
                self.conn.message_sent()
            elif isinstance(ev, Update):
                out += f"[update {' '.join(e.uid for e in ev.deleted)}]".encode()
                out += self.conn.update_result(self.update_ok)
            elif isinstance(ev, StartTls):
                out += b"[tls]"
                self.conn.tls_started()
            elif isinstance(ev, CloseConnection):
                self.closed = True
                out += b"[close]"


def run_script(script, conn=None, **adapter_kw):
    conn = conn or make()
    ad = FakeAdapter(conn, **adapter_kw)
    for line, expected in script:
        assert ad.feed(line) == expected, line
    return ad


CAPA_PRE = (
    b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n"
    b"PIPELINING\r\nUSER\r\nSASL PLAIN\r\nSTLS\r\nIMPLEMENTATION DICOM-Mail-Hub\r\n.\r\n"
)
CAPA_POST = (
    b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n"
    b"PIPELINING\r\nIMPLEMENTATION DICOM-Mail-Hub\r\n.\r\n"
)
LOGIN = [
    (b"USER alice\r\n", b"+OK send PASS\r\n"),
    (b"PASS s3cret\r\n", b"+OK maildrop has 3 messages (620 octets)\r\n"),
]

FULL_SESSION = [
    (b"CAPA\r\n", CAPA_PRE),
    *LOGIN,
    (b"CAPA\r\n", CAPA_POST),
    (b"STAT\r\n", b"+OK 3 620\r\n"),
    (b"LIST\r\n", b"+OK maildrop has 3 messages (620 octets)\r\n1 120\r\n2 200\r\n3 300\r\n.\r\n"),
    (b"LIST 2\r\n", b"+OK 2 200\r\n"),
    (b"UIDL\r\n", b"+OK\r\n1 uid-1\r\n2 uid-2\r\n3 uid-3\r\n.\r\n"),
    (b"UIDL 3\r\n", b"+OK 3 uid-3\r\n"),
    (b"RETR 1\r\n", b"+OK 120 octets\r\n[uid-1 None].\r\n"),
    (b"TOP 2 5\r\n", b"+OK 200 octets\r\n[uid-2 5].\r\n"),
    (b"DELE 2\r\n", b"+OK message 2 deleted\r\n"),
    (b"STAT\r\n", b"+OK 2 420\r\n"),
    (b"LIST\r\n", b"+OK maildrop has 2 messages (420 octets)\r\n1 120\r\n3 300\r\n.\r\n"),
    (b"UIDL\r\n", b"+OK\r\n1 uid-1\r\n3 uid-3\r\n.\r\n"),
    (b"RSET\r\n", b"+OK maildrop has 3 messages (620 octets)\r\n"),
    (b"STAT\r\n", b"+OK 3 620\r\n"),
    (b"DELE 1\r\n", b"+OK message 1 deleted\r\n"),
    (b"DELE 3\r\n", b"+OK message 3 deleted\r\n"),
    (b"NOOP\r\n", b"+OK\r\n"),
    (b"QUIT\r\n", b"[update uid-1 uid-3]+OK pop.example.org POP3 server signing off (1 messages left)\r\n[close]"),
    (b"NOOP\r\n", b""),  # after close, input is ignored
]


def test_greeting():
    assert make().initial_bytes() == b"+OK pop.example.org POP3 server ready\r\n"


def test_full_session_exact_bytes():
    ad = run_script(FULL_SESSION)
    assert ad.closed and ad.conn.state is State.CLOSED
    updates = [e for e in ad.events if isinstance(e, Update)]
    assert updates == [Update([M1, M3])]
    assert [e for e in ad.events if isinstance(e, SendMessage)] == [SendMessage(M1, None), SendMessage(M2, 5)]
    assert ad.auth_requests == [AuthRequest("alice", "s3cret", 0)]


def test_full_session_byte_by_byte_and_in_one_chunk():
    whole = b"".join(line for line, _ in FULL_SESSION)
    expected = b"".join(reply for _, reply in FULL_SESSION)
    ad = FakeAdapter(make())
    assert b"".join(ad.feed(whole[i : i + 1]) for i in range(len(whole))) == expected
    assert FakeAdapter(make()).feed(whole) == expected


def test_auth_request_hides_password_in_repr():
    assert "s3cret" not in repr(AuthRequest("alice", "s3cret", 1))


def test_lowercase_commands_and_password_with_spaces():
    run_script(
        [
            (b"user bob\r\n", b"+OK send PASS\r\n"),
            (b"pass pw with spaces\r\n", b"+OK maildrop has 3 messages (620 octets)\r\n"),
            (b"stat\r\n", b"+OK 3 620\r\n"),
            (b"ReTr 3\n", b"+OK 300 octets\r\n[uid-3 None].\r\n"),  # bare LF accepted
        ]
    )


def test_quit_in_authorization_closes_without_update():
    ad = run_script([(b"QUIT\r\n", b"+OK pop.example.org POP3 server signing off\r\n[close]")])
    assert not any(isinstance(e, Update) for e in ad.events)
    assert ad.conn.next_event() is CLOSED


def test_quit_with_nothing_deleted_still_updates_and_update_failure():
    run_script(
        LOGIN + [(b"QUIT\r\n", b"[update ]+OK pop.example.org POP3 server signing off (3 messages left)\r\n[close]")]
    )
    run_script(
        LOGIN
        + [
            (b"DELE 1\r\n", b"+OK message 1 deleted\r\n"),
            (b"QUIT\r\n", b"[update uid-1]-ERR [SYS/TEMP] some deleted messages not removed\r\n[close]"),
        ],
        update_ok=False,
    )


@pytest.mark.parametrize(
    "script",
    [
        [
            (
                f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 's3cret')}\r\n".encode(),
                b"+OK maildrop has 3 messages (620 octets)\r\n",
            )
        ],
        [
            (b"AUTH PLAIN\r\n", b"+ \r\n"),
            (
                f"{b64(chr(0) + 'alice' + chr(0) + 's3cret')}\r\n".encode(),
                b"+OK maildrop has 3 messages (620 octets)\r\n",
            ),
        ],
        [
            (
                f"auth plain {b64('alice' + chr(0) + 'alice' + chr(0) + 's3cret')}\r\n".encode(),
                b"+OK maildrop has 3 messages (620 octets)\r\n",
            )
        ],
    ],
    ids=["initial-response", "continuation", "authzid-equal"],
)
def test_auth_plain_success(script):
    ad = run_script(script + [(b"STAT\r\n", b"+OK 3 620\r\n")])
    assert ad.auth_requests == [AuthRequest("alice", "s3cret", 0)]


@pytest.mark.parametrize(
    "line,reply",
    [
        (b"AUTH\r\n", b"+OK\r\nPLAIN\r\n.\r\n"),
        (b"AUTH CRAM-MD5\r\n", b"-ERR unsupported authentication mechanism\r\n"),
        (b"AUTH PLAIN !!!!\r\n", b"-ERR invalid base64\r\n"),
        (b"AUTH PLAIN AGFsaWN\r\n", b"-ERR invalid base64\r\n"),  # bad padding
        (b"AUTH PLAIN =\r\n", b"-ERR malformed PLAIN response\r\n"),  # empty response
        (f"AUTH PLAIN {b64('alice')}\r\n".encode(), b"-ERR malformed PLAIN response\r\n"),
        (f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0))}\r\n".encode(), b"-ERR malformed PLAIN response\r\n"),
        (
            f"AUTH PLAIN {b64('root' + chr(0) + 'alice' + chr(0) + 's3cret')}\r\n".encode(),
            b"-ERR authorization identity must be empty or the user name\r\n",
        ),
        (b"AUTH PLAIN " + base64.b64encode(b"\0\xff\0x") + b"\r\n", b"-ERR credentials are not valid UTF-8\r\n"),
        (b"AUTH PLAIN a b\r\n", b"-ERR too many arguments\r\n"),
    ],
)
def test_auth_errors(line, reply):
    ad = run_script([(line, reply), (b"STAT\r\n", b"-ERR STAT not allowed before login\r\n")])
    assert ad.auth_requests == []


def test_auth_continuation_cancel_and_bad_base64():
    run_script(
        [
            (b"AUTH PLAIN\r\n", b"+ \r\n"),
            (b"*\r\n", b"-ERR authentication cancelled\r\n"),
            (b"AUTH PLAIN\r\n", b"+ \r\n"),
            (b"%%%\r\n", b"-ERR invalid base64\r\n"),
            (b"NOOP\r\n", b"-ERR NOOP not allowed before login\r\n"),  # back in AUTHORIZATION
        ]
    )


def test_in_use_is_not_a_failed_login():
    conn = make(max_failed_logins=1)
    ad = run_script(
        [
            (b"USER alice\r\n", b"+OK send PASS\r\n"),
            (b"PASS s3cret\r\n", b"-ERR [IN-USE] maildrop already locked\r\n"),
            (b"STAT\r\n", b"-ERR STAT not allowed before login\r\n"),
        ],
        conn=conn,
        in_use=True,
    )
    assert not ad.closed and conn.state is State.AUTHORIZATION


def test_failed_logins_close_the_connection():
    ad = run_script(
        [
            (b"USER alice\r\n", b"+OK send PASS\r\n"),
            (b"PASS wrong\r\n", b"-ERR [AUTH] invalid user name or password\r\n"),
            (b"USER alice\r\n", b"+OK send PASS\r\n"),
            (b"PASS wrong\r\n", b"-ERR [AUTH] invalid user name or password\r\n"),
            (
                f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 'nope')}\r\n".encode(),
                b"-ERR [AUTH] too many failures\r\n[close]",
            ),
            (b"USER alice\r\n", b""),
        ]
    )
    assert [r.failed_so_far for r in ad.auth_requests] == [0, 1, 2]
    assert ad.conn.state is State.CLOSED and ad.conn.next_event() is CLOSED


def test_pipelined_failed_logins_stop_at_the_limit():
    chunk = b"USER alice\r\nPASS x\r\n" * 5
    assert FakeAdapter(make(max_failed_logins=2)).feed(chunk) == (
        b"+OK send PASS\r\n-ERR [AUTH] invalid user name or password\r\n"
        b"+OK send PASS\r\n-ERR [AUTH] too many failures\r\n[close]"
    )


@pytest.mark.parametrize(
    "before,line,reply",
    [
        ([], b"STAT\r\n", b"-ERR STAT not allowed before login\r\n"),
        ([], b"RETR 1\r\n", b"-ERR RETR not allowed before login\r\n"),
        ([], b"NOOP\r\n", b"-ERR NOOP not allowed before login\r\n"),
        ([], b"PASS s3cret\r\n", b"-ERR PASS must follow USER\r\n"),
        ([b"USER alice\r\n", b"CAPA\r\n"], b"PASS s3cret\r\n", b"-ERR PASS must follow USER\r\n"),
        ([b"USER alice\r\n", b"STAT\r\n"], b"PASS s3cret\r\n", b"-ERR PASS must follow USER\r\n"),
        (LOGIN, b"USER alice\r\n", b"-ERR USER not allowed after login\r\n"),
        (LOGIN, b"PASS s3cret\r\n", b"-ERR PASS not allowed after login\r\n"),
        (LOGIN, b"AUTH PLAIN\r\n", b"-ERR AUTH not allowed after login\r\n"),
        (LOGIN, b"STLS\r\n", b"-ERR STLS not allowed after login\r\n"),
        ([], b"HELO x\r\n", b"-ERR unknown command\r\n"),
        (LOGIN, b"XYZZY\r\n", b"-ERR unknown command\r\n"),
        ([], b"\r\n", b"-ERR unknown command\r\n"),
        ([], b"\xc3\xa9STAT\r\n", b"-ERR unknown command\r\n"),
        ([], b"NO\x00OP\r\n", b"-ERR invalid characters in command\r\n"),
        ([], b"NOOP\rSTAT\r\n", b"-ERR invalid characters in command\r\n"),
        ([], b"USER\r\n", b"-ERR USER requires exactly one argument\r\n"),
        ([], b"USER a b\r\n", b"-ERR USER requires exactly one argument\r\n"),
        ([], b"USER \xff\r\n", b"-ERR user name is not valid UTF-8\r\n"),
        ([b"USER alice\r\n"], b"PASS\r\n", b"-ERR PASS requires a password\r\n"),
        ([b"USER alice\r\n"], b"PASS \xff\r\n", b"-ERR password is not valid UTF-8\r\n"),
        ([], b"CAPA x\r\n", b"-ERR CAPA takes no arguments\r\n"),
        (LOGIN, b"STAT 1\r\n", b"-ERR STAT takes no arguments\r\n"),
        (LOGIN, b"NOOP 1\r\n", b"-ERR NOOP takes no arguments\r\n"),
        (LOGIN, b"RSET 1\r\n", b"-ERR RSET takes no arguments\r\n"),
        (LOGIN, b"QUIT now\r\n", b"-ERR QUIT takes no arguments\r\n"),
        (LOGIN, b"LIST 1 2\r\n", b"-ERR too many arguments\r\n"),
        (LOGIN, b"RETR\r\n", b"-ERR RETR requires one message number\r\n"),
        (LOGIN, b"DELE 1 2\r\n", b"-ERR DELE requires one message number\r\n"),
        (LOGIN, b"TOP 1\r\n", b"-ERR TOP requires a message number and a line count\r\n"),
        (LOGIN, b"TOP 1 -1\r\n", b"-ERR invalid line count\r\n"),
        (LOGIN, b"TOP 1 x\r\n", b"-ERR invalid line count\r\n"),
    ],
)
def test_errors_and_wrong_state(before, line, reply):
    ad = FakeAdapter(make())
    for item in before:
        ad.feed(item[0] if isinstance(item, tuple) else item)
    assert ad.feed(line) == reply
    assert not ad.closed


def test_error_keeps_transaction_state():
    run_script(LOGIN + [(b"BOGUS\r\n", b"-ERR unknown command\r\n"), (b"STAT\r\n", b"+OK 3 620\r\n")])


BAD_NUMBERS = [b"0", b"4", b"abc", b"-1", b"+1", b"1.0", b"0x1", b"99999999999999999999999999999", b"\xd9\xa1", b"\xb2"]


@pytest.mark.parametrize("num", BAD_NUMBERS)
@pytest.mark.parametrize("cmd", [b"RETR %s", b"TOP %s 1", b"DELE %s", b"LIST %s", b"UIDL %s"])
def test_bad_message_numbers(cmd, num):
    ad = run_script(LOGIN)
    assert ad.feed(cmd % num + b"\r\n") == b"-ERR no such message\r\n"
    assert ad.feed(b"STAT\r\n") == b"+OK 3 620\r\n"


@pytest.mark.parametrize("cmd", [b"RETR 2", b"TOP 2 0", b"DELE 2", b"LIST 2", b"UIDL 2"])
def test_deleted_message(cmd):
    ad = run_script(LOGIN + [(b"DELE 2\r\n", b"+OK message 2 deleted\r\n")])
    assert ad.feed(cmd + b"\r\n") == b"-ERR message 2 already deleted\r\n"


def test_leading_zeros_and_extra_spaces_are_accepted():
    run_script(LOGIN + [(b"LIST 0003\r\n", b"+OK 3 300\r\n"), (b"TOP  1  0 \r\n", b"+OK 120 octets\r\n[uid-1 0].\r\n")])


def test_empty_maildrop():
    run_script(
        LOGIN[:1]
        + [
            (b"PASS s3cret\r\n", b"+OK maildrop has 0 messages (0 octets)\r\n"),
            (b"STAT\r\n", b"+OK 0 0\r\n"),
            (b"LIST\r\n", b"+OK maildrop has 0 messages (0 octets)\r\n.\r\n"),
            (b"UIDL\r\n", b"+OK\r\n.\r\n"),
            (b"RETR 1\r\n", b"-ERR no such message\r\n"),
        ],
        maildrop=[],
    )


def test_maildrop_is_a_snapshot():
    drop = [M1]
    ad = run_script(LOGIN[:1] + [(b"PASS s3cret\r\n", b"+OK maildrop has 1 messages (120 octets)\r\n")], maildrop=drop)
    drop.append(M2)  # new mail arrives after login
    assert ad.feed(b"STAT\r\n") == b"+OK 1 120\r\n"


# ---- line length and buffering --------------------------------------------


def test_over_long_line():
    conn = make(max_line_length=64)
    ad = FakeAdapter(conn)
    ok_line = b"NOOP " + b"x" * 57 + b"\r\n"  # exactly 64 octets: wrong args, but read
    assert len(ok_line) == 64
    assert ad.feed(ok_line) == b"-ERR NOOP not allowed before login\r\n"
    assert ad.feed(b"NOOP " + b"x" * 58 + b"\r\nCAPA x\r\n") == (
        b"-ERR line too long\r\n-ERR CAPA takes no arguments\r\n"
    )


def test_over_long_line_is_discarded_without_buffering():
    conn = make(max_line_length=64)
    ad = FakeAdapter(conn)
    out = b""
    for _ in range(1000):
        out += ad.feed(b"y" * 1000)
        assert conn.buffered_bytes <= 64
    out += ad.feed(b"STAT\r\nQUIT\r\n")  # "STAT" belongs to the over-long line
    assert out == b"-ERR line too long\r\n+OK pop.example.org POP3 server signing off\r\n[close]"


def test_over_long_line_cancels_sasl_and_user():
    conn = make(max_line_length=64)
    run_script(
        [
            (b"AUTH PLAIN\r\n", b"+ \r\n"),
            (b"A" * 100 + b"\r\n", b"-ERR line too long\r\n"),
            (b"USER alice\r\n", b"+OK send PASS\r\n"),
            (b"P" * 100 + b"\r\n", b"-ERR line too long\r\n"),
            (b"PASS s3cret\r\n", b"-ERR PASS must follow USER\r\n"),
        ],
        conn=conn,
    )


def test_too_much_pipelined_input_while_paused():
    conn = make(max_buffered_bytes=1024)
    conn.receive_data(b"USER alice\r\nPASS s3cret\r\n")
    events = [conn.next_event(), conn.next_event()]
    assert isinstance(events[1], AuthRequest) and conn.next_event() is PAUSED
    for _ in range(200):
        conn.receive_data(b"NOOP\r\n")
    assert conn.buffered_bytes <= 1024
    out = conn.auth_result(True, maildrop=MAILDROP)
    assert out == b"+OK maildrop has 3 messages (620 octets)\r\n"
    ad = FakeAdapter(conn)
    replies = ad.pump()
    assert replies.endswith(b"+OK\r\n-ERR too much pipelined input\r\n[close]")
    assert replies.count(b"+OK\r\n") == 1024 // 6


def test_eof_closes_without_update():
    conn = make()
    ad = run_script(LOGIN + [(b"DELE 1\r\n", b"+OK message 1 deleted\r\n")], conn=conn)
    conn.receive_data(b"NOOP\r\nSTA")
    conn.receive_data(b"")
    assert ad.pump() == b"+OK\r\n"  # the unterminated "STA" is dropped
    assert conn.state is State.CLOSED and conn.next_event() is CLOSED
    assert not any(isinstance(e, Update) for e in ad.events)


# ---- pipelining ------------------------------------------------------------


def test_pipelined_commands_in_one_chunk():
    ad = FakeAdapter(make())
    assert ad.feed(b"USER alice\r\nPASS s3cret\r\nSTAT\r\nRETR 2\r\nTOP 1 0\r\nDELE 1\r\nLIST\r\nQUIT\r\n") == (
        b"+OK send PASS\r\n+OK maildrop has 3 messages (620 octets)\r\n+OK 3 620\r\n"
        b"+OK 200 octets\r\n[uid-2 None].\r\n+OK 120 octets\r\n[uid-1 0].\r\n+OK message 1 deleted\r\n"
        b"+OK maildrop has 2 messages (500 octets)\r\n2 200\r\n3 300\r\n.\r\n"
        b"[update uid-1]+OK pop.example.org POP3 server signing off (2 messages left)\r\n[close]"
    )


def test_adapter_work_blocks_later_commands():
    conn = make()
    conn.receive_data(b"USER alice\r\nPASS s3cret\r\nSTAT\r\nRETR 1\r\nNOOP\r\nQUIT\r\n")
    assert conn.next_event() == SendBytes(b"+OK send PASS\r\n")
    assert conn.next_event() == AuthRequest("alice", "s3cret", 0)
    assert conn.next_event() is PAUSED and conn.next_event() is PAUSED
    assert conn.state is State.AUTH_PENDING
    assert conn.auth_result(True, maildrop=MAILDROP) == b"+OK maildrop has 3 messages (620 octets)\r\n"
    assert conn.next_event() == SendBytes(b"+OK 3 620\r\n")
    assert conn.next_event() == CheckMessage(M1, None)
    assert conn.next_event() is PAUSED
    assert conn.check_result(None) == b"+OK 120 octets\r\n"
    assert conn.next_event() == SendMessage(M1, None)
    assert conn.next_event() is PAUSED
    conn.message_sent()
    assert conn.next_event() == SendBytes(b"+OK\r\n")
    assert conn.next_event() == Update([])
    assert conn.next_event() is PAUSED
    assert conn.update_result(True) == b"+OK pop.example.org POP3 server signing off (3 messages left)\r\n"
    assert conn.next_event() == CloseConnection()
    assert conn.next_event() is CLOSED


def test_adapter_misuse_raises():
    conn = make()
    for call in (
        lambda: conn.auth_result(True, maildrop=[]),
        conn.message_sent,
        conn.tls_started,
        lambda: conn.update_result(True),
    ):
        with pytest.raises(Pop3ProtocolError):
            call()
    conn.receive_data(b"USER alice\r\nPASS s3cret\r\n")
    conn.next_event(), conn.next_event()
    with pytest.raises(Pop3ProtocolError):
        conn.auth_result(True)  # no maildrop
    with pytest.raises(Pop3ProtocolError):
        conn.auth_result(True, maildrop=[MaildropEntry("bad uid", 1, False)])
    with pytest.raises(Pop3ProtocolError):
        conn.auth_result(True, maildrop=[M1, M1])  # duplicate UID
    assert conn.state is State.AUTH_PENDING  # still answerable
    conn.auth_result(True, maildrop=MAILDROP)
    with pytest.raises(Pop3ProtocolError):
        conn.message_sent()
    with pytest.raises(ValueError):
        make(greeting_host="two words")


# ---- STLS -------------------------------------------------------------------


def test_stls_flow_and_plaintext_refused():
    refused = b"-ERR [AUTH] plaintext login refused; use STLS\r\n"
    capa_plain = (
        b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n"
        b"PIPELINING\r\nSTLS\r\nIMPLEMENTATION DICOM-Mail-Hub\r\n.\r\n"
    )
    capa_tls = (
        b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n"
        b"PIPELINING\r\nUSER\r\nSASL PLAIN\r\nIMPLEMENTATION DICOM-Mail-Hub\r\n.\r\n"
    )
    conn = make(plaintext_login_allowed=False)
    ad = run_script(
        [
            (b"CAPA\r\n", capa_plain),
            (b"USER alice\r\n", refused),
            (b"PASS s3cret\r\n", b"-ERR PASS must follow USER\r\n"),
            (b"AUTH PLAIN\r\n", refused),
            (f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 's3cret')}\r\n".encode(), refused),
            (b"AUTH\r\n", b"+OK\r\n.\r\n"),
            # the injected USER after STLS (same plaintext chunk) must be discarded
            (b"STLS\r\nUSER evil\r\n", b"+OK Begin TLS negotiation\r\n[tls]"),
            (b"CAPA\r\n", capa_tls),
            (b"STLS\r\n", b"-ERR TLS already active\r\n"),
            (b"AUTH\r\n", b"+OK\r\nPLAIN\r\n.\r\n"),
            *LOGIN,
        ],
        conn=conn,
    )
    assert conn.tls_active and ad.auth_requests == [AuthRequest("alice", "s3cret", 0)]
    assert sum(isinstance(e, StartTls) for e in ad.events) == 1


def test_stls_drops_bytes_before_handshake_and_unavailable():
    conn = make(plaintext_login_allowed=False)
    conn.receive_data(b"STLS\r\n")
    assert conn.next_event() == SendBytes(b"+OK Begin TLS negotiation\r\n")
    assert conn.next_event() == StartTls()
    assert conn.next_event() is PAUSED
    conn.receive_data(b"USER evil\r\n")
    conn.tls_started()
    assert conn.next_event() is NEED_DATA and conn.state is State.AUTHORIZATION
    run_script(
        [(b"STLS\r\n", b"-ERR STLS not available\r\n"), (b"USER a\r\n", b"-ERR [AUTH] plaintext login refused\r\n")],
        conn=make(stls_available=False, plaintext_login_allowed=False),
    )
    capa = run_script([], conn=make(stls_available=False)).feed(b"CAPA\r\n")
    assert b"STLS" not in capa and b"USER\r\n" in capa


# ---- dot_stuff / TopFilter ------------------------------------------------------


def stuff_whole(msg: bytes) -> bytes:
    """Reference: a line starts after LF; each one beginning with "." gets one more."""
    return b"\n".join(b"." + ln if ln.startswith(b".") else ln for ln in msg.split(b"\n"))


def stuff_chunks(chunks) -> bytes:
    out, start = b"", True
    for c in chunks:
        part, start = dot_stuff(c, start)
        out += part
    return out + message_terminator(start)


DOT_MESSAGES = [b"", b".", b"..\r\n", b"a\r\n.b\r\n..c\r\n.\r\n", b".x\r\n\r\n.\r\n.", b"no dots\r\n", b"x.\r\ny\r\n."]


@pytest.mark.parametrize("msg", DOT_MESSAGES)
def test_dot_stuff_every_split(msg):
    expected = stuff_whole(msg) + (b".\r\n" if msg.endswith(b"\n") or not msg else b"\r\n.\r\n")
    for i in range(len(msg) + 1):
        for j in range(i, len(msg) + 1):
            assert stuff_chunks([msg[:i], msg[i:j], msg[j:]]) == expected
    assert stuff_chunks([msg[k : k + 1] for k in range(len(msg))]) == expected


def test_dot_stuff_examples():
    assert dot_stuff(b".a\r\n.b", True) == (b"..a\r\n..b", False)
    assert dot_stuff(b".a", False) == (b".a", False)
    assert dot_stuff(b"", True) == (b"", True)
    assert dot_stuff(b"x\n", False) == (b"x\n", True)


def test_system_error_reply_is_one_clean_line():
    assert system_error("too many connections") == b"-ERR [SYS/TEMP] too many connections\r\n"
    assert system_error("bad\r\nX\x00 \u00e9") == b"-ERR [SYS/TEMP] badX ?\r\n"


@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=8))
def test_dot_stuff_property(msg, cuts):
    out, start = b"", True
    for c in chunked(msg, cuts):
        part, start = dot_stuff(c, start)
        out += part
    assert out == stuff_whole(msg)
    assert start == (msg == b"" or msg.endswith(b"\n"))
    unstuffed = (out[1:] if out.startswith(b"..") else out).replace(b"\n..", b"\n.")
    assert unstuffed == msg


MSG = b"Subject: scan\r\nFrom: a@b\r\n\r\nline1\r\nline2\r\n\r\nline4\r\n"
TOP_EXPECTED = {
    0: b"Subject: scan\r\nFrom: a@b\r\n\r\n",
    1: b"Subject: scan\r\nFrom: a@b\r\n\r\nline1\r\n",
    3: b"Subject: scan\r\nFrom: a@b\r\n\r\nline1\r\nline2\r\n\r\n",
    4: MSG,
    10: MSG,
}


def top_chunks(n, chunks):
    f, out = TopFilter(n), b""
    for c in chunks:
        out += f.feed(c)
    return out, f.done


@pytest.mark.parametrize("n", sorted(TOP_EXPECTED))
def test_top_filter_every_split(n):
    for i in range(len(MSG) + 1):
        for j in range(i, len(MSG) + 1):
            out, done = top_chunks(n, [MSG[:i], MSG[i:j], MSG[j:]])
            assert out == TOP_EXPECTED[n], (i, j)
            assert done == (n <= 4)  # MSG has 4 body lines; n=4 finishes on the last LF
    assert top_chunks(n, [MSG[k : k + 1] for k in range(len(MSG))])[0] == TOP_EXPECTED[n]


@pytest.mark.parametrize(
    "msg,n,expected,done",
    [
        (b"A: b\n\nbody1\nbody2\n", 1, b"A: b\n\nbody1\n", True),  # LF-only message
        (b"A: b\r\nC: d\r\n", 0, b"A: b\r\nC: d\r\n", False),  # no body at all
        (b"\r\nbody\r\nmore\r\n", 1, b"\r\nbody\r\n", True),  # no header at all
        (b"A: b\r\n\r\nlast line no CRLF", 5, b"A: b\r\n\r\nlast line no CRLF", False),
        (b"A: \r\r\n\r\nx\r\n", 0, b"A: \r\r\n\r\n", True),  # CR inside a header line
    ],
)
def test_top_filter_cases(msg, n, expected, done):
    for i in range(len(msg) + 1):
        assert top_chunks(n, [msg[:i], msg[i:]]) == (expected, done)


def test_top_filter_after_done_and_bad_arg():
    f = TopFilter(0)
    assert f.feed(b"A: b\r\n\r\nbody\r\n") == b"A: b\r\n\r\n" and f.done
    assert f.feed(b"more\r\n") == b""
    with pytest.raises(ValueError):
        TopFilter(-1)


def top_reference(msg: bytes, n: int) -> bytes:
    lines = msg.split(b"\n")
    ends = [i for i, ln in enumerate(lines[:-1]) if ln in (b"", b"\r")]
    if not ends:
        return msg
    keep = ends[0] + 1 + n
    return msg if keep > len(lines) - 1 else b"\n".join(lines[:keep]) + b"\n"


@given(
    st.lists(st.sampled_from([b"A: b", b"", b"\r", b"x\r", b".", b"body"]), max_size=12),
    st.sampled_from([b"\n", b"\r\n"]),
    st.integers(0, 6),
    st.lists(st.integers(0, 120), max_size=6),
)
def test_top_filter_property(lines, eol, n, cuts):
    msg = eol.join(lines)
    f, out = TopFilter(n), b""
    for c in chunked(msg, cuts):
        out += f.feed(c)
    assert out == top_reference(msg, n)


def test_every_command_in_the_table_has_a_handler():
    verbs = {trigger for (_, trigger) in pop3_protocol._TRANSITIONS if trigger.isalpha()}
    assert verbs == {
        "CAPA",
        "USER",
        "PASS",
        "AUTH",
        "STLS",
        "QUIT",
        "STAT",
        "LIST",
        "UIDL",
        "RETR",
        "TOP",
        "DELE",
        "RSET",
        "NOOP",
    }
    for verb in verbs:
        assert callable(getattr(make(), "_cmd_" + verb.lower()))


# ---- property tests: never raise, always +OK/-ERR ----------------------------------

TOKENS = [
    b"USER alice",
    b"PASS s3cret",
    b"PASS bad",
    b"AUTH PLAIN",
    b"AUTH",
    b"*",
    b"STLS",
    b"CAPA",
    b"STAT",
    b"LIST",
    b"LIST 1",
    b"UIDL 2",
    b"RETR 1",
    b"TOP 1 0",
    b"DELE 1",
    b"DELE 9",
    b"RSET",
    b"NOOP",
    b"QUIT",
    b"AGFsaWNlAHMzY3JldA==",
    b"\r\n",
    b"\n",
    b"\r",
    b" ",
    b"\x00",
    b"x" * 300,
]


def drive(conn, chunks):
    """Feed chunks, play the adapter randomly-but-validly; return every reply."""
    replies = []
    flip = 0
    for chunk in chunks:
        conn.receive_data(chunk)
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA or ev is CLOSED:
                break
            assert ev is not PAUSED
            flip += 1
            if isinstance(ev, SendBytes):
                replies.append(ev.data)
            elif isinstance(ev, AuthRequest):
                replies.append(conn.auth_result(flip % 3 != 0, flip % 5 == 0, MAILDROP))
            elif isinstance(ev, CheckMessage):
                replies.append(conn.check_result(None if flip % 7 else "cut short"))
            elif isinstance(ev, SendMessage):
                conn.message_sent()
            elif isinstance(ev, Update):
                replies.append(conn.update_result(flip % 2 == 0))
            elif isinstance(ev, StartTls):
                conn.tls_started()
            else:
                assert isinstance(ev, CloseConnection)
    return replies


def chunked(data, cuts):
    cuts = sorted(min(c, len(data)) for c in cuts)
    chunks = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
    return [c for c in chunks if c]  # b"" would mean EOF


input_bytes = st.lists(st.one_of(st.binary(max_size=40), st.sampled_from(TOKENS)), max_size=40).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(
    input_bytes,
    st.lists(st.integers(0, 2000), max_size=30),
    st.booleans(),
    st.booleans(),
    st.sampled_from([64, 100, 1024]),
)
def test_random_input_never_raises(data, cuts, stls, plaintext, max_line):
    conn = make(
        stls_available=stls, plaintext_login_allowed=plaintext, max_line_length=max_line, max_buffered_bytes=4096
    )
    replies = drive(conn, chunked(data, cuts) + [b""])
    for r in replies:
        assert r.startswith((b"+OK", b"-ERR", b"+ \r\n")) and r.endswith(b"\r\n"), r
    assert conn.next_event() is CLOSED


LINES = [
    b"USER alice",
    b"PASS s3cret",
    b"PASS bad",
    b"AUTH PLAIN",
    b"AUTH",
    b"*",
    b"CAPA",
    b"STAT",
    b"LIST",
    b"LIST 7",
    b"UIDL",
    b"RETR 1",
    b"TOP 2 1",
    b"DELE 1",
    b"DELE 2",
    b"RSET",
    b"noop",
    b"QUIT",
    b"FOO",
    b"",
    b"x" * 90,
]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(LINES), max_size=30), st.lists(st.integers(0, 2000), max_size=30))
def test_one_reply_per_line(lines, cuts):
    """Pipelining: every line gets exactly one reply, in order, until the close."""
    conn = make(max_line_length=64, max_failed_logins=10)
    data = b"".join(line + b"\r\n" for line in lines)
    replies = drive(conn, chunked(data, cuts))
    if conn.state is State.CLOSED:
        closing = (b"signing off", b"too many failures", b"some deleted messages not removed")
        assert any(c in replies[-1] for c in closing)
        assert not any(c in r for r in replies[:-1] for c in closing)
        assert len(replies) <= len(lines)
    else:
        assert len(replies) == len(lines)


def test_a_damaged_message_is_refused_before_any_byte_and_can_be_deleted():
    ad = run_script(
        LOGIN
        + [
            (
                b"RETR 2\r\n",
                b"-ERR [SYS/PERM] message 2 is damaged on the server (cut\x07 short); delete it\r\n".replace(
                    b"\x07", b""
                ),
            ),
            (b"TOP 2 0\r\n", b"-ERR [SYS/PERM] message 2 is damaged on the server (cut short); delete it\r\n"),
            (b"RETR 1\r\n", b"+OK 120 octets\r\n[uid-1 None].\r\n"),
            (b"DELE 2\r\n", b"+OK message 2 deleted\r\n"),
        ],
        damaged={"uid-2": "cut\x07 short"},
    )
    assert [e.entry.uid for e in ad.events if isinstance(e, SendMessage)] == ["uid-1"]
    assert ad.conn.state is State.TRANSACTION
