# relay.smtp.protocol, the SMTP server's sans-I/O core, in memory: the phase table (every verb in
# every phase, written out here independently), command lines, the exact reply bytes, the EHLO
# reply, and the AUTH exchange (PLAIN, LOGIN) with the exact 334 challenges on the wire.
import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.smtp import replies as R
from relay.smtp.protocol import (
    HELO_FIRST,
    TRANSITIONS,
    AuthExchange,
    Challenge,
    CommandBudget,
    Credentials,
    Phase,
    Refused,
    command,
    ehlo_reply,
    is_syntax_error,
    out_of_sequence,
    phase_of,
    wire,
    with_protocol,
)

C, G, M, T, B, F = (Phase.CONNECTED, Phase.GREETED, Phase.MAIL, Phase.RCPT, Phase.BDAT, Phase.BDAT_FAILED)
VERBS = {
    "HELO",
    "EHLO",
    "MAIL",
    "RCPT",
    "DATA",
    "BDAT",
    "RSET",
    "NOOP",
    "QUIT",
    "VRFY",
    "EXPN",
    "HELP",
    "STARTTLS",
    "AUTH",
}


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


# ---- phases and the table ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "greeted, mail, rcpts, bdat_open, bdat_failed, phase",
    [
        (False, False, False, False, False, C),
        (False, True, True, True, True, C),
        (True, False, False, False, False, G),
        (True, True, False, False, False, M),
        (True, True, True, False, False, T),
        (True, True, True, True, False, B),
        (True, True, True, False, True, F),
        (True, True, True, True, True, F),
    ],
)
def test_phase_of(greeted, mail, rcpts, bdat_open, bdat_failed, phase):
    assert phase_of(greeted, mail, rcpts, bdat_open, bdat_failed) is phase


EXPECTED = {  # verb: the replies in phases C, G, M, T, B, F (None: allowed)
    "MAIL": (HELO_FIRST, None, R.NESTED_MAIL, R.NESTED_MAIL, R.NESTED_MAIL, R.NESTED_MAIL),
    "RCPT": (HELO_FIRST, R.NEED_MAIL, None, None, None, None),
    "DATA": (HELO_FIRST, R.NEED_MAIL, R.NEED_RCPT, None, R.DATA_AFTER_BDAT, R.DATA_AFTER_BDAT),
    "BDAT": (R.BAD_SEQUENCE, R.NEED_MAIL, R.NEED_RCPT, None, None, R.NO_BDAT_TRANSACTION),
    "AUTH": (None, None, R.BAD_SEQUENCE, R.BAD_SEQUENCE, R.BAD_SEQUENCE, R.BAD_SEQUENCE),
}


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_in_every_phase(verb):
    expected = EXPECTED.get(verb, (None,) * 6)
    assert tuple(out_of_sequence(verb, phase) for phase in (C, G, M, T, B, F)) == expected
    assert set(TRANSITIONS) == set(EXPECTED)


def test_helo_first_is_the_reply_aiosmtpd_gave():
    assert wire("503 Error: send HELO first") == wire(HELO_FIRST) == b"503 5.5.1 Error: send HELO first\r\n"


# ---- command lines -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, parsed",
    [
        (b"NOOP", ("NOOP", None)),
        (b"mail FROM:<a@b.example>", ("MAIL", "FROM:<a@b.example>")),
        (b"RCPT   TO:<x@y>  ", ("RCPT", "TO:<x@y>")),
        (b"", R.EMPTY_COMMAND),
        (b"XYZZY now", R.UNKNOWN_COMMAND),
        (b"MAIL\x00FROM", R.SYNTAX_ERROR),
        (b"MAIL FROM:<\x01>", R.CONTROL_CHARACTERS),
        (b"MAIL FROM:<\xc3\xa9@x>", R.NOT_ASCII),
        (None, R.LINE_TOO_LONG),
        (b"NOOP " + b"x" * 507, ("NOOP", "x" * 507)),
        (b"NOOP " + b"x" * 508, R.LINE_TOO_LONG),
    ],
)
def test_command_lines(line, parsed):
    assert command(line, 512, VERBS) == parsed


# ---- replies on the wire ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status, sent",
    [
        ("250 OK", b"250 2.0.0 OK\r\n"),
        ("250 2.1.0 Sender OK", b"250 2.1.0 Sender OK\r\n"),
        ("500 Error: bad syntax", b"500 5.5.2 Error: bad syntax\r\n"),
        ("530 Authentication required", b"530 5.7.0 Authentication required\r\n"),
        ("354 End data with <CR><LF>.<CR><LF>", b"354 End data with <CR><LF>.<CR><LF>\r\n"),
        ("252", b"252 2.0.0\r\n"),
        ("501 5.5.4 Syntax: \x01\x7fx", b"501 5.5.4 Syntax: ??x\r\n"),
        ("250-a\r\n250 b", b"250-a\r\n250 b\r\n"),
        ("550 5.1.1 <\u00e9@x> unknown", b"550 5.1.1 <?@x> unknown\r\n"),
    ],
)
def test_reply_bytes(status, sent):
    assert wire(status) == sent


def test_syntax_errors_are_the_counted_ones():
    assert [code for code in ("500", "501", "502", "503", "504", "535", "555") if is_syntax_error(code + " x")] == [
        "500",
        "501",
        "504",
        "555",
    ]


def test_the_ehlo_reply():
    assert wire(ehlo_reply("hub.example", 52428800, starttls=True, auth=False)) == (
        b"250-hub.example\r\n250-SIZE 52428800\r\n250-8BITMIME\r\n250-PIPELINING\r\n250-CHUNKING\r\n"
        b"250-ENHANCEDSTATUSCODES\r\n250-STARTTLS\r\n250 HELP\r\n"
    )
    assert wire(ehlo_reply("h", 10, starttls=False, auth=True)) == (
        b"250-h\r\n250-SIZE 10\r\n250-8BITMIME\r\n250-PIPELINING\r\n250-CHUNKING\r\n"
        b"250-ENHANCEDSTATUSCODES\r\n250-AUTH PLAIN LOGIN\r\n250 HELP\r\n"
    )


@pytest.mark.parametrize(
    "extended, tls, authenticated, name",
    [
        (False, False, False, "SMTP"),
        (True, False, False, "ESMTP"),
        (True, True, False, "ESMTPS"),
        (True, False, True, "ESMTPA"),
        (True, True, True, "ESMTPSA"),
        (False, True, True, "SMTPSA"),
    ],
)
def test_the_received_with_protocol(extended, tls, authenticated, name):
    assert with_protocol(extended, tls, authenticated) == name


# ---- AUTH ---------------------------------------------------------------------------------------------


def test_plain_with_an_initial_response():
    exchange = AuthExchange("PLAIN " + b64(b"\x00site\x00pw").decode())
    assert exchange.start() == Credentials(b"site", b"pw")
    assert exchange.counts
    assert AuthExchange("plain " + b64(b"site\x00site\x00pw").decode()).start() == Credentials(b"site", b"pw")


def test_plain_with_a_challenge():
    exchange = AuthExchange("PLAIN")
    assert exchange.start() == Challenge(b"334 \r\n")
    assert exchange.receive(b" " + b64(b"\x00site\x00pw") + b" ") == Credentials(b"site", b"pw")


def test_login_asks_for_the_user_then_the_password():
    exchange = AuthExchange("LOGIN")
    assert exchange.start() == Challenge(b"334 VXNlcm5hbWU6\r\n")  # "Username:"
    assert exchange.receive(b64(b"site")) == Challenge(b"334 UGFzc3dvcmQ6\r\n")  # "Password:"
    assert exchange.receive(b64(b"pw")) == Credentials(b"site", b"pw")
    initial = AuthExchange("LOGIN " + b64(b"site").decode())
    assert initial.start() == Challenge(b"334 UGFzc3dvcmQ6\r\n")
    assert initial.receive(b"=") == Credentials(b"site", b"")


@pytest.mark.parametrize(
    "arg, event, counts",
    [
        (None, Refused(R.AUTH_SYNTAX), False),
        ("", Refused(R.AUTH_SYNTAX), False),
        ("PLAIN a b", Refused(R.AUTH_SYNTAX), True),
        ("PLAIN  x", Refused(R.AUTH_SYNTAX), True),
        ("CRAM-MD5", Refused(R.AUTH_UNKNOWN_MECHANISM), False),
        ("PLAIN not*base64", Refused(R.AUTH_BAD_BASE64), True),
        ("PLAIN " + b64(b"site\x00pw").decode(), Refused(R.AUTH_MALFORMED), True),
        ("PLAIN " + b64(b"other\x00site\x00pw").decode(), Refused(R.AUTH_FAILED), True),
        ("PLAIN =", Refused(R.AUTH_MALFORMED), True),
    ],
)
def test_refused_exchanges(arg, event, counts):
    exchange = AuthExchange(arg)
    assert exchange.start() == event
    assert exchange.counts is counts


@pytest.mark.parametrize(
    "line, reply",
    [
        (b"*", R.AUTH_CANCELLED),
        (b"  *  ", R.AUTH_CANCELLED),
        (b"%%%", R.AUTH_BAD_BASE64),
        (None, R.LINE_TOO_LONG),
    ],
)
def test_a_challenge_answered_badly(line, reply):
    exchange = AuthExchange("LOGIN")
    exchange.start()
    assert exchange.receive(line) == Refused(reply)


@settings(max_examples=300, deadline=None)
@given(arg=st.text(max_size=40), lines=st.lists(st.binary(max_size=40), max_size=4))
def test_any_input_gives_an_event_and_never_raises(arg, lines):
    exchange = AuthExchange(arg)
    event = exchange.start()
    for line in lines:
        if not isinstance(event, Challenge):
            break
        event = exchange.receive(line)
    assert isinstance(event, (Challenge, Credentials, Refused))
    if isinstance(event, Challenge):
        assert event.line.startswith(b"334 ") and event.line.endswith(b"\r\n")


# ---- the command budget ---------------------------------------------------------------------------------


def test_each_verb_has_its_own_count():
    budget = CommandBudget(max_commands=2, max_bad_commands=3)
    assert [budget.take("NOOP"), budget.take("NOOP"), budget.take("RSET")] == [None, None, None]
    assert budget.take("NOOP") == "421 4.7.0 NOOP sent too many times"
    assert budget.take("NOOP") == "421 4.7.0 NOOP sent too many times"
    assert budget.take("RSET") is None and budget.take("RSET") == "421 4.7.0 RSET sent too many times"


def test_syntax_error_replies_exhaust_the_budget():
    budget = CommandBudget(max_commands=100, max_bad_commands=3)
    for status in (R.SYNTAX_ERROR, R.NEED_MAIL, R.AUTH_FAILED, R.OK, R.BAD_SIZE):
        budget.replied(status)
    assert budget.errors == 2 and not budget.exhausted
    budget.replied(R.UNKNOWN_PARAMETER)
    assert budget.errors == 3 and budget.exhausted
