# Fuzzing the SMTP session of a real hub over loopback with hypothesis: 10,000 generated sequences
# of commands (real verbs with mangled arguments, junk lines of any bytes, lone CR/LF, overlong
# lines, DATA bodies, BDAT chunks, AUTH exchanges with garbage responses), sent on a few long-lived
# connections; one hypothesis example is a batch of 10 sequences (BATCH). Every reply must be a
# well-formed SMTP reply with an enhanced status code, none an internal error; the hub must answer
# NOOP after every sequence and log no traceback at all. AUTH responses are generated so that no
# password is ever checked (no login delays, no penalties).
import re
import signal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.smtp.stream import dot_stuff_bytes

from conftest import Hub, RawSMTP, hub_env

EXAMPLES = int(__import__("os").environ.get("FUZZ_N", 10_000))
# Sequences per hypothesis example: hypothesis's engine costs about as much per example as drawing a
# sequence does, so one example draws a batch (10,000 sequences: ~40% less CPU than one by one).
BATCH = 10
_REPLY_LINE = re.compile(rb"\d{3}[ -][\x20-\x7e]*\r\n\Z")
_ENHANCED = re.compile(rb"\d{3} [245]\.\d{1,3}\.\d{1,3}( |\r\n)")
_NO_ENHANCED_CODE = (b"220", b"334", b"354")  # greeting, AUTH challenge, DATA go-ahead


@pytest.fixture(scope="module")
def fuzz_hub(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("fuzz") / "data"
    hub = Hub(
        data_dir,
        hub_env(data_dir, MAILHUB_SMTP_PEER_NETWORKS="127.0.0.0/8", MAILHUB_SMTP_MAX_CONNECTIONS_PER_IP="1000"),
    )
    hub.add_site("alpha", "alpha@hub.test")
    hub.add_site("beta", "beta@hub.test")
    hub.start()
    yield hub
    hub.stop(signal.SIGKILL)


# ---- what is generated -----------------------------------------------------------------------


def _defused(line: bytes) -> bytes:
    """A junk line that would make the hub read a BDAT chunk the client never sends is made a NOOP."""
    return b"NOOP " + line if _BDAT_LIKE.match(line) else line


_BDAT_LIKE = re.compile(rb"\s*bdat +\d", re.IGNORECASE)
_junk = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"\r"))
_fragment = st.one_of(
    st.sampled_from(
        [
            b"FROM:<alpha@hub.test>",
            b"TO:<beta@hub.test>",
            b"FROM:<>",
            b"TO:<>",
            b"FROM:",
            b"TO:<beta@hub.test",
            b"FROM:alpha@hub.test>",
            b"<@a,@b:x@y.z>",
            b'<"q>"@hub.test>',
            b"SIZE=100",
            b"SIZE=" + b"9" * 30,
            b"SIZE=-1",
            b"BODY=8BITMIME",
            b"BODY=BINARYMIME",
            b"AUTH=<>",
            b"NOTIFY=NEVER",
            b"=",
            b"==",
            b"*",
            b"<",
            b">",
            b"<>",
            b"[127.0.0.1]",
            b"[IPv6:::1]",
            b"[300.1.1.1]",
            b"gw.example",
            b"\x00",
            b"\r",
            b"\t",
            b"\xff\xfe",
            b"\xc3\xa9",
            b"\x1b[2J",
            b"%s",
            b"{}",
            b"' OR 1=1 --",
        ]
    ),
    _junk,
)
_arg = st.builds(
    lambda parts, sep: sep.join(parts), st.lists(_fragment, max_size=3), st.sampled_from([b" ", b"", b"  "])
)
_verb = st.sampled_from(
    [
        b"HELO",
        b"EHLO",
        b"MAIL",
        b"RCPT",
        b"RSET",
        b"NOOP",
        b"VRFY",
        b"EXPN",
        b"HELP",
        b"STARTTLS",
        b"QUIT",
        b"mail",
        b"Rcpt",
        b"DATA",
        b"XYZZY",
        b"MAIL FROM:",
        b"",
    ]
)
_end = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"])


class Step:
    """One thing the client does: a line (and the bytes that follow it at once: a BDAT chunk), the
    body to send if a 354 comes, the responses to 334 challenges."""

    def __init__(self, line: bytes, chunk: bytes = b"", body: bytes = b".\r\n", responses=()):
        self.line, self.chunk, self.body, self.responses = line, chunk, body, list(responses)

    def __repr__(self) -> str:
        return f"Step({self.line[:120]!r}, chunk={len(self.chunk)}, responses={self.responses!r})"


def _command(verb, arg, end) -> Step:
    if verb and verb[-1:] != b":" and arg and not arg.startswith(b" "):
        arg = b" " + arg
    return Step(_defused(verb + arg) + end)


_commands = st.builds(_command, _verb, _arg, _end)
_junk_lines = st.builds(lambda junk, end: Step(_defused(junk) + end), _junk, _end)
_long_lines = st.builds(
    lambda n, c: Step(b"NOOP " + c * n + b"\r\n"),
    st.sampled_from([600, 2100, 5000, 70_000, 140_000, 300_000]),
    st.sampled_from([b"x", b"\xff", b"\x00"]),
)
_body = st.one_of(
    st.binary(max_size=300),
    st.sampled_from(
        [
            b"x" * 998 + b"\r\n",
            b"x" * 1200 + b"\r\n",
            b".\r\n..\r\n",
            b"a\rb\nc\r\n.\n.\r\n",
            b"",
            b"Subject: x\r\n\r\n" + b"QUFB" * 19 + b"\r\n" * 2000,
        ]
    ),
)
_data = st.builds(lambda body: Step(b"DATA\r\n", body=dot_stuff_bytes(body)), _body)
_bdat = st.builds(
    lambda data, suffix: Step(b"BDAT %d%s\r\n" % (len(data), suffix), chunk=data),
    _body,
    st.sampled_from([b"", b" LAST", b" last", b" FIRST", b"  LAST", b" LAST now"]),
)
_not_base64 = st.one_of(
    st.sampled_from([b"*", b"!!!!", b"YQ=", b"=", b"\x00", b"QUFB" * 3000]), _junk.map(lambda b: b"!" + b)
)
_auth = st.one_of(
    st.builds(
        lambda mech, extra: Step(b"AUTH " + mech + extra + b"\r\n"),
        st.sampled_from([b"PLAIN", b"LOGIN", b"plain", b"CRAM-MD5", b"GSSAPI", b"", b"X" * 40]),
        st.sampled_from([b"", b" !!!!", b" =", b" YQ==", b" a b", b" \xff", b" AGFscGhh"]),
    ),
    st.builds(lambda responses: Step(b"AUTH PLAIN\r\n", responses=responses), st.lists(_not_base64, max_size=2)),
    st.builds(
        lambda responses: Step(b"AUTH LOGIN\r\n", responses=[b"YWxwaGE="] + responses),
        st.lists(_not_base64, min_size=1, max_size=2),
    ),
)
_step = st.one_of(_commands, _commands, _commands, _junk_lines, _junk_lines, _data, _bdat, _auth, _long_lines)


# ---- the client side ---------------------------------------------------------------------------


class Client:
    def __init__(self, port: int):
        self.port = port
        self.smtp: RawSMTP | None = None
        self.replies = 0

    def connection(self) -> RawSMTP:
        if self.smtp is None:
            self.smtp = RawSMTP(self.port, timeout=20)
            check_reply(self.smtp.banner)
        return self.smtp

    def drop(self) -> None:
        if self.smtp is not None:
            self.smtp.close()
            self.smtp = None

    def reply(self) -> bytes:
        reply = self.connection().reply()
        self.replies += 1
        check_reply(reply)
        return reply

    def run(self, step: Step) -> None:
        smtp = self.connection()
        smtp.send(step.line + step.chunk)
        reply = self.reply()
        responses = list(step.responses)
        while reply.startswith(b"334"):
            smtp.send((responses.pop(0) if responses else b"*") + b"\r\n")
            reply = self.reply()
        if reply.startswith(b"354"):
            smtp.send(step.body)
            reply = self.reply()
        if reply[:3] in (b"221", b"421"):
            self.drop()

    def still_serving(self) -> None:
        smtp = self.connection()
        reply = smtp.command("NOOP")
        if reply.startswith(b"421"):  # closed for too many errors: a new connection must work
            self.drop()
            reply = self.connection().command("NOOP")
        assert reply.startswith(b"250 2.0.0"), reply


def check_reply(reply: bytes) -> None:
    lines = reply.splitlines(keepends=True)
    assert lines and all(_REPLY_LINE.match(line) for line in lines), reply
    assert all(line[:3] == lines[0][:3] for line in lines), reply
    assert b"internal error" not in reply.lower(), reply
    if len(lines) == 1 and reply[:3] not in _NO_ENHANCED_CODE:
        assert _ENHANCED.match(reply), reply


@pytest.fixture(scope="module")
def clients(fuzz_hub):
    made = [Client(fuzz_hub.smtp_port) for _ in range(3)]
    yield made
    for client in made:
        client.drop()


def test_fuzzed_smtp_sessions_get_well_formed_replies_and_the_hub_keeps_serving(fuzz_hub, clients):
    examples = [0]

    sequence = st.tuples(st.integers(0, len(clients) - 1), st.lists(_step, min_size=1, max_size=6))

    @settings(
        max_examples=-(-EXAMPLES // BATCH),
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
    )
    @given(st.lists(sequence, min_size=BATCH, max_size=BATCH))
    def run(batch):
        for which, steps in batch:
            client = clients[which]
            for step in steps:
                client.run(step)
            client.still_serving()
            examples[0] += 1

    run()
    replies = sum(client.replies for client in clients)
    print(f"{examples[0]} generated sequences, {replies} replies checked")
    assert examples[0] >= EXAMPLES
    text = fuzz_hub.log_text()
    assert "Traceback" not in text and "internal error" not in text, text[-3000:]
