# The SMTP command syntax (relay.smtp.syntax) and the body line-length check
# (relay.smtp.message_scan.LineLengthCheck), in memory: exact results for tables of lines and paths, and
# property tests against a plain oracle (any bytes, any chunking).
import base64

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relay.smtp import replies as R
from relay.smtp.message_scan import MAX_LINE, LineLengthCheck
from relay.smtp.syntax import decode_sasl, parse_bdat, parse_helo, parse_mail_parameters, parse_path, split_command


@pytest.mark.parametrize(
    "line, expected",
    [
        (b"NOOP", ("NOOP", None)),
        (b"mail FROM:<a@b.c>  ", ("MAIL", "FROM:<a@b.c>")),
        (b"RCPT  TO:<a@b.c>", ("RCPT", "TO:<a@b.c>")),
        (b"", R.EMPTY_COMMAND),
        (b"   ", R.EMPTY_COMMAND),
        (b"\x00", R.SYNTAX_ERROR),
        (b"NO\x00OP", R.SYNTAX_ERROR),
        (b"\xff\xfe", R.SYNTAX_ERROR),
        (b"MAIL\tFROM:<a@b.c>", R.SYNTAX_ERROR),
        (b" NOOP", R.SYNTAX_ERROR),
        (b"X" * 17, R.SYNTAX_ERROR),
        (b"MAILFROM:<a@b.c>", R.SYNTAX_ERROR),
        (b"NOOP \x1b[31m", R.CONTROL_CHARACTERS),
        (b"MAIL FROM:<a@b.c>\rRCPT TO:<d@e.f>", R.CONTROL_CHARACTERS),
        (b"MAIL FROM:<\xc3\xa9@b.c>", R.NOT_ASCII),
    ],
)
def test_split_command(line, expected):
    assert split_command(line) == expected


@pytest.mark.parametrize(
    "arg, keyword, expected",
    [
        ("FROM:<a@b.c>", "FROM:", ("a@b.c", {})),
        ("from: <a@b.c> size=10 BODY=8bitmime", "FROM:", ("a@b.c", {"SIZE": "10", "BODY": "8bitmime"})),
        ("FROM:<>", "FROM:", ("", {})),
        ("FROM:<> AUTH=<>", "FROM:", ("", {"AUTH": "<>"})),
        ("FROM:a@b.c SIZE=1", "FROM:", ("a@b.c", {"SIZE": "1"})),  # no brackets, as Postfix allows
        ("TO:<@r1.example,@r2.example:a@b.c>", "TO:", ("a@b.c", {})),  # source route ignored
        ('TO:<"john doe"@b.c>', "TO:", ('"john doe"@b.c', {})),
        ('TO:<"a>b"@b.c>', "TO:", ('"a>b"@b.c', {})),
        ("TO:<a@[127.0.0.1]>", "TO:", ("a@[127.0.0.1]", {})),
        ("TO:<a@[IPv6:::1]>", "TO:", ("a@[IPv6:::1]", {})),
        ("TO:<a@b.c> FLAG", "TO:", ("a@b.c", {"FLAG": ""})),
        ("TO:<>", "TO:", R.BAD_PATH),
        (None, "FROM:", R.MAIL_SYNTAX),
        ("TO:<a@b.c>", "FROM:", R.MAIL_SYNTAX),
        ("FROM <a@b.c>", "FROM:", R.MAIL_SYNTAX),
        (None, "TO:", R.RCPT_SYNTAX),
        ("TO:", "TO:", R.BAD_PATH),
        ("TO:<a@b.c", "TO:", R.BAD_PATH),
        ('TO:<"a>b@b.c', "TO:", R.BAD_PATH),
        ("TO:a@b.c>", "TO:", R.BAD_PATH),
        ("TO:<<a@b.c>>", "TO:", R.BAD_PATH),
        ("TO:<a@b.c>SIZE=1", "TO:", R.BAD_PATH),
        ("TO:<a@>", "TO:", R.BAD_PATH),
        ("TO:<@b.c>", "TO:", R.BAD_PATH),
        ("TO:<@r1:a@b.c>", "TO:", ("a@b.c", {})),
        ("TO:<@r_1:a@b.c>", "TO:", R.BAD_PATH),
        ("TO:<a@b..c>", "TO:", R.BAD_PATH),
        ("TO:<a.@b.c>", "TO:", R.BAD_PATH),
        ("TO:<a b@b.c>", "TO:", R.BAD_PATH),
        ("TO:<a@-b.c>", "TO:", R.BAD_PATH),
        ("TO:<a@[300.1.1.1]>", "TO:", R.BAD_PATH),
        ("TO:<a@[IPv6:zz]>", "TO:", R.BAD_PATH),
        ("TO:<" + "a" * 65 + "@b.c>", "TO:", R.BAD_PATH),
        ("TO:<a@" + "b" * 64 + ".c>", "TO:", R.BAD_PATH),
        ("TO:<a@" + "b." * 130 + "c>", "TO:", R.PATH_TOO_LONG),
        ("FROM:<a@b.c> SIZE=1 SIZE=2", "FROM:", R.DUPLICATE_PARAMETER),
        ("FROM:<a@b.c> SIZE=", "FROM:", R.BAD_PARAMETER),
        ("FROM:<a@b.c> =1", "FROM:", R.BAD_PARAMETER),
        ("FROM:<a@b.c> SIZE=1=2", "FROM:", R.BAD_PARAMETER),
        ("FROM:<a@b.c> -X=1", "FROM:", R.BAD_PARAMETER),
    ],
)
def test_parse_path(arg, keyword, expected):
    assert parse_path(arg, keyword, null_allowed=keyword == "FROM:") == expected


@pytest.mark.parametrize(
    "arg, expected",
    [
        ("0", (0, False)),
        ("10 LAST", (10, True)),
        ("10 last", (10, True)),
        ("10 FIRST", (10, None)),
        ("10 LAST x", (10, None)),
        ("10  LAST", (10, None)),
        (None, (None, None)),
        ("x", (None, None)),
        ("-1", (None, None)),
        ("1" * 19, (None, None)),
        ("1" * 18, (int("1" * 18), False)),
    ],
)
def test_parse_bdat(arg, expected):
    assert parse_bdat(arg) == expected


def test_parse_helo_and_decode_sasl():
    assert parse_helo("gw.example") == "gw.example" and parse_helo("[127.0.0.1]") == "[127.0.0.1]"
    assert parse_helo(None) is None and parse_helo("a b") is None and parse_helo("a" * 256) is None
    assert decode_sasl("=") == b"" and decode_sasl(b"") == b""
    assert decode_sasl(base64.b64encode(b"\0alpha\0pw")) == b"\0alpha\0pw"
    for bad in ("!!!!", "YQ=", "YQ", "YWJj=", "*", "YW Jj", "\xe9"):
        assert decode_sasl(bad) is None, bad


def _too_long_oracle(data: bytes) -> bool:
    return any(len(segment) >= MAX_LINE for segment in data.split(b"\n"))


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.integers(0, 1100).map(lambda n: b"a" * n + b"\r\n"),
            st.integers(0, 1100).map(lambda n: b"b" * n + b"\n"),
            st.binary(max_size=50),
        ),
        max_size=12,
    ),
    st.lists(st.integers(1, 3000), max_size=8),
)
@example(parts=[b"a" * 998 + b"\r\n", b"a" * 1001 + b"\r\n"], cuts=[1000 + 1001])  # a chunk ending in a long line
def test_line_length_check_matches_the_oracle_at_any_chunking(parts, cuts):
    data = b"".join(parts)
    check = LineLengthCheck()
    start = 0
    for cut in cuts:
        check.feed(data[start : start + cut])
        start += cut
    check.feed(data[start:])
    assert check.too_long == _too_long_oracle(data)


def test_line_length_boundary():
    for length, too_long in ((998, False), (999, True)):  # characters before CRLF
        check = LineLengthCheck()
        check.feed(b"x" * length + b"\r\n" + b"y" * 10 + b"\r\n")
        assert check.too_long is too_long, length


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([76, 497, 498, 499, 500, 996, 997, 998]),
    st.integers(0, 1100),
    st.integers(0, 400),
    st.integers(0, 300_000),
    st.booleans(),
)
def test_line_length_check_of_big_chunks_matches_the_oracle(base, odd, where, cut, bare_lf):
    """Chunks over 64 KB take the numpy path first: it must agree with the oracle as well."""
    line = b"x" * base + (b"\n" if bare_lf else b"\r\n")
    lines = [line] * (150_000 // len(line))
    lines.insert(where % len(lines), b"y" * odd + b"\r\n")
    data = b"".join(lines)
    check = LineLengthCheck()
    check.feed(data[:cut])
    check.feed(data[cut:])
    assert check.too_long == _too_long_oracle(data)


@pytest.mark.parametrize(
    "params, result",
    [
        ({}, None),
        ({"SIZE": "1000"}, 1000),
        ({"SIZE": "0", "BODY": "8bitmime", "AUTH": "<>"}, 0),
        ({"BODY": "7BIT"}, None),
        ({"SIZE": "1e3"}, R.BAD_SIZE),
        ({"SIZE": "9" * 19}, R.BAD_SIZE),
        ({"BODY": "BINARYMIME"}, R.BAD_BODY),
        ({"SMTPUTF8": ""}, R.UNKNOWN_PARAMETER),
        ({"SIZE": "10", "RET": "HDRS"}, R.UNKNOWN_PARAMETER),
    ],
)
def test_mail_parameters(params, result):
    assert parse_mail_parameters(params) == result
