# The pure parts of the IMAP limits (relay/imap/limits.py), in memory: LIST patterns matched against
# a regex reference and in linear time, sequence sets against a naive reading, the MIME structure
# caps (the recorder's record equals capped() of an uncapped record; wide, deep and long-valued
# mails stay within the caps), SEARCH depth and key limits, the text scanner and its budget.
import itertools
import json
import random
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.imap import limits as imap_limits
from relay.imap import parser as imap_parser
from relay.imap.events import ScanBudget
from relay.imap.parser import Atom, Command, ParseError, SequenceSet, tokenize
from relay.imap.protocol import _wildcard_match
from relay.imap.scan import scan_messages
from relay.imap.search import parse_search
from relay.mime import limits as mime_limits
from relay.mime import structure as mime_structure
from relay.mime.stream import MimeStreamParser
from relay.mime.structure import StructureRecorder, bodystructure, capped, envelope, section_range

# ---- LIST patterns --------------------------------------------------------------------------------


def reference_match(pattern: str, name: str) -> bool:
    regex = "".join(".*" if c == "*" else "[^/]*" if c == "%" else re.escape(c) for c in pattern.upper())
    return bool(pattern) and re.fullmatch(regex, name.upper(), re.S) is not None


@settings(max_examples=1000)
@given(pattern=st.text("aB/*%", max_size=12), name=st.text("abB/", max_size=8))
def test_wildcard_match_equals_the_regex_reference(pattern, name):
    assert _wildcard_match(pattern, name) == reference_match(pattern, name)


@pytest.mark.parametrize(
    "pattern",
    [
        "*%" * 30000 + "x",
        "*I" * 30000,
        "%" * 60000 + "INBOX",
        "*" * 60000,
        "I" * 60000,
        "*%*%*%*%*%*%*%*%*%*%*%*%*%*%*%x",
        "%/" * 30000,
    ],
)
def test_wildcard_match_is_linear_on_explosive_patterns(pattern):
    # this thread's CPU time, not the wall clock (other test workers share the 2 cores); a
    # backtracking matcher takes minutes on these patterns, the linear one milliseconds
    started = time.thread_time()
    assert _wildcard_match(pattern, "INBOX") == reference_match(pattern[:40], "INBOX") or len(pattern) > 40
    assert time.thread_time() - started < 1.0


# ---- sequence sets --------------------------------------------------------------------------------


def token(text: str):
    return tokenize(Command("t", (b"t X " + text.encode(),)))[2]


@settings(max_examples=500)
@given(
    ranges=st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30)), min_size=1, max_size=8),
    largest=st.integers(0, 25),
)
def test_sequence_set_equals_a_naive_reading(ranges, largest):
    text = ",".join(f"{lo or '*'}:{hi or '*'}" for lo, hi in ranges)
    numbers = SequenceSet(token(text))
    for n in range(0, 35):
        naive = any(min(lo or largest, hi or largest) <= n <= max(lo or largest, hi or largest) for lo, hi in ranges)
        assert numbers.contains(n, largest) == naive, (text, n)


def test_huge_sequence_sets_cost_little():
    numbers = SequenceSet(token(",".join(str(n) for n in range(1, 12000, 2))))
    started = time.perf_counter()
    assert sum(numbers.contains(n, 200_000) for n in range(1, 200_001)) == 6000
    assert SequenceSet(token("1:4294967295")).highest(5) == 4294967295
    assert time.perf_counter() - started < 2


# ---- MIME structure caps ----------------------------------------------------------------------------


@pytest.fixture
def small_caps(monkeypatch):
    """Caps small enough to reach with generated mails."""
    caps = {
        "STRUCTURE_MAX_PARTS": 6,
        "STRUCTURE_MAX_DEPTH": 3,
        "STRUCTURE_MAX_VALUE": 12,
        "STRUCTURE_MAX_PARAMS": 2,
        "STRUCTURE_MAX_TEXT": 260,
    }
    for name, value in caps.items():
        monkeypatch.setattr(mime_structure, name, value)
    return caps


def uncapped(monkeypatch, blob: bytes) -> dict:
    with monkeypatch.context() as m:
        for name in (
            "STRUCTURE_MAX_PARTS",
            "STRUCTURE_MAX_DEPTH",
            "STRUCTURE_MAX_VALUE",
            "STRUCTURE_MAX_PARAMS",
            "STRUCTURE_MAX_TEXT",
        ):
            m.setattr(mime_structure, name, 10**9)
        return record(blob)


def record(blob: bytes) -> dict:
    recorder = StructureRecorder()
    parser = MimeStreamParser(recorder)
    parser.feed(blob)
    parser.close()
    return json.loads(json.dumps(recorder.structure))  # as stored in the index


_counter = itertools.count()


def mime(node) -> bytes:
    """A MIME entity (header block and body) of a tree: ("leaf", type, params), ("multi", [children])
    or ("message", inner)."""
    kind = node[0]
    if kind == "leaf":
        params = "".join(f'; {k}="{v}"' for k, v in node[2].items())
        return (
            f"Content-Type: {node[1]}{params}\r\nContent-Description: {node[1]} part\r\n\r\nbody of {node[1]}\r\n"
        ).encode()
    if kind == "message":
        return b"Content-Type: message/rfc822\r\n\r\nSubject: inner subject line\r\nFrom: a@b.example\r\n" + mime(
            node[1]
        )
    boundary = f"b{next(_counter)}"
    parts = b"".join(b"--" + boundary.encode() + b"\r\n" + mime(child) for child in node[1])
    return (
        f"Content-Type: multipart/mixed; boundary={boundary}\r\n\r\n".encode()
        + parts
        + b"--"
        + boundary.encode()
        + b"--\r\n"
    )


leaves = st.tuples(
    st.just("leaf"),
    st.sampled_from(["text/plain", "application/dicom", "image/png"]),
    st.dictionaries(st.text("abc", min_size=1, max_size=4), st.text("xyz", max_size=20), max_size=3),
)
trees = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.tuples(st.just("multi"), st.lists(inner, min_size=1, max_size=5)), st.tuples(st.just("message"), inner)
    ),
    max_leaves=25,
)


def walk(part: dict, depth: int = 0):
    yield part, depth
    for child in part.get("parts", ()):
        yield from walk(child, depth + 1)
    if "message" in part:
        yield from walk(part["message"], depth + 1)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=trees)  # the fixtures only set constants: nothing to reset between examples
def test_recorded_structure_equals_capped_of_an_uncapped_record(small_caps, monkeypatch, tree):
    blob = b"Subject: top\r\nFrom: x@y.example\r\n" + mime(tree)
    with_caps = record(blob)
    assert with_caps == capped(uncapped(monkeypatch, blob))
    assert capped(with_caps) == with_caps
    parts = list(walk(with_caps))
    tails = sum(1 for p, _ in parts if "parts" in p and p["parts"] and p["parts"][-1].get("subtype") == "octet-stream")
    assert len(parts) <= small_caps["STRUCTURE_MAX_PARTS"] + small_caps["STRUCTURE_MAX_DEPTH"] + 1 + tails
    assert max(depth for _, depth in parts) <= small_caps["STRUCTURE_MAX_DEPTH"] + 1
    for part, _ in parts:  # every part's range lies in the message and renders
        assert 0 <= part["hs"] <= part["bs"] <= part["be"] <= len(blob)
    bodystructure(with_caps)
    envelope(with_caps)


def test_wide_deep_and_long_valued_mails_stay_within_the_caps():
    wide = mime(("multi", [("leaf", "application/dicom", {}) for _ in range(5000)]))
    deep_tree = ("leaf", "text/plain", {})
    for _ in range(30):
        deep_tree = ("multi", [deep_tree])
    deep = mime(deep_tree)
    huge_params = "".join(f'; p{n}="{"v" * 3000}"' for n in range(40))
    long_values = (
        f"To: {'a@b.example, ' * 3000}\r\nSubject: {'s' * 50000}\r\n"
        f"Content-Type: application/dicom{huge_params}\r\n\r\nx\r\n"
    ).encode()
    for blob in (wide, deep, long_values):
        structure = record(blob)
        parts = list(walk(structure))
        assert len(parts) <= mime_limits.STRUCTURE_MAX_PARTS + mime_limits.STRUCTURE_MAX_DEPTH + 1
        assert max(depth for _, depth in parts) <= mime_limits.STRUCTURE_MAX_DEPTH + 1
        assert len(json.dumps(structure)) < 2 * mime_limits.STRUCTURE_MAX_TEXT + 100 * len(parts)
        assert len(bodystructure(structure)) + len(envelope(structure)) < 2_000_000
    structure = record(wide)
    tail = structure["parts"][-1]
    assert len(structure["parts"]) == mime_limits.STRUCTURE_MAX_PARTS  # the top level is one of them
    assert (tail["type"], tail["subtype"]) == ("application", "octet-stream")
    start, end = section_range(structure, str(len(structure["parts"])))
    assert wide[start:].startswith(b"Content-Type: application/dicom") and wide[:end].endswith(
        b"body of application/dicom"
    )
    assert len(record(long_values)["params"]) == mime_limits.STRUCTURE_MAX_PARAMS


def test_records_made_before_the_caps_are_rendered_within_them(monkeypatch):
    blob = mime(("multi", [("message", ("multi", [("leaf", "text/plain", {})] * 3))] * 800))
    old = uncapped(monkeypatch, blob)
    assert sum(1 for _ in walk(old)) > 4000
    new = capped(old)
    assert sum(1 for _ in walk(new)) <= mime_limits.STRUCTURE_MAX_PARTS + mime_limits.STRUCTURE_MAX_DEPTH + 1
    assert new == record(blob)


# ---- tokens -------------------------------------------------------------------------------------


def tokens_or_error(text: bytes):
    try:
        return tokenize(Command("t", (text,)))
    except ParseError as exc:
        return ("ParseError", str(exc))


@settings(max_examples=3000)
@given(text=st.text(' ()"\\[]{}<>.:aZ09*%\x00\r\x7f\xe9', max_size=24))
def test_tokenizer_fast_path_equals_the_character_loops(text):
    """The one-step regex for plain atoms and strings gives exactly what the character loops give
    (tokens, their types, or the same ParseError)."""
    command = b"t X " + text.encode("latin-1")
    fast = tokens_or_error(command)
    saved = imap_parser._LEXEME
    imap_parser._LEXEME = re.compile(rb"(?!)")  # never matches: every token through the loops
    try:
        slow = tokens_or_error(command)
    finally:
        imap_parser._LEXEME = saved
    assert fast == slow and repr(fast) == repr(slow)


def test_token_count_is_limited():
    limit = imap_limits.MAX_TOKENS
    assert len(tokenize(Command("t", (b"t NOOP " + b"a " * (limit - 4) + b"(b)",)))) == limit - 1  # the list and b
    for text in (b"a " * limit, b'"a" ' * limit, b"() " * limit, b"(" + b"a " * limit + b")"):
        with pytest.raises(ParseError, match=f"too many tokens in one command \\(at most {limit}\\)"):
            tokenize(Command("t", (b"t NOOP " + text,)))
    # a literal counts as one token
    segments = (b"t NOOP " + b"a " * (limit - 3) + b"{1}", b"x", b"")
    assert len(tokenize(Command("t", segments))) == limit
    with pytest.raises(ParseError, match="too many tokens"):
        tokenize(Command("t", (b"t NOOP " + b"a " * (limit - 2) + b"{1}", b"x", b"")))


# ---- SEARCH parsing -------------------------------------------------------------------------------


def search_args(text: str) -> list:
    return tokenize(Command("t", (b"t SEARCH " + text.encode(),)))[2:]


def test_search_depth_and_key_count_are_limited():
    depth = imap_limits.MAX_SEARCH_DEPTH
    parse_search(search_args("NOT " * (depth - 1) + "SEEN"))
    for text in (
        "NOT " * depth + "SEEN",
        "(" * 20 + "SEEN" + ")" * 20 + " " + "OR " * 40 + "SEEN " * 41,
        "NOT " * 2000 + "ALL",
    ):
        with pytest.raises(ParseError, match="nested too deeply"):
            parse_search(search_args(text))
    with pytest.raises(ParseError, match="too many search keys"):
        parse_search(search_args("SEEN " * (imap_limits.MAX_SEARCH_KEYS + 1)))
    with pytest.raises(ParseError, match="nested too deeply"):
        tokenize(Command("t", (b"t SEARCH " + b"(" * 100 + b"ALL" + b")" * 100,)))


def test_search_keys_split_into_cheap_and_reading_ones():
    search = parse_search(search_args('UID 5:* BODY "x" SUBJECT "Hi" SENTSINCE 1-Jan-2020 TEXT y SEEN'))
    assert search.probes == (("B", b"x"), ("H", "SUBJECT", "hi"), ("D",), ("T", b"y"))
    search = parse_search(search_args("UID 5:* SEEN"))
    assert search.probes == ()


# ---- the text scanner -----------------------------------------------------------------------------


def test_scanner_finds_text_across_chunks_and_honours_the_budget(tmp_path):
    body = bytearray(random.Random(1).randbytes(3 * 1024 * 1024).hex().encode())
    body[1024 * 1024 - 3 : 1024 * 1024 + 3] = b"NeEdLe"  # across the first chunk edge
    mail = b"Subject: Scan me\r\nDate: Tue, 2 Feb 2021 10:00:00 +0000\r\n\r\n" + bytes(body)
    path = tmp_path / "blob"
    path.write_bytes(b"xx" + mail)
    probes = (
        ("B", b"needle"),
        ("T", b"scan me"),
        ("B", b"scan me"),
        ("H", "SUBJECT", "scan"),
        ("D",),
        ("B", b"absent"),
    )
    budget = ScanBudget(10**9, 10, time.monotonic() + 10)
    (found,) = scan_messages([(str(path), 2, len(mail))], probes, budget)
    assert found[("B", b"needle")] and found[("T", b"scan me")] and not found[("B", b"scan me")]
    assert found[("H", "SUBJECT", "scan")] and str(found[("D",)]) == "2021-02-02" and not found[("B", b"absent")]
    assert 10**9 - budget.bytes_left >= len(mail)  # the absent text made it read everything
    small = ScanBudget(1024 * 1024, 10, time.monotonic() + 10)
    assert scan_messages([(str(path), 2, len(mail))], (("B", b"absent"),), small) is None
    late = ScanBudget(10**9, 10, time.monotonic() - 1)
    assert scan_messages([(str(path), 2, len(mail))], (("B", b"absent"),), late) is None


def test_header_search_is_linear_in_folded_lines(tmp_path):
    header = b"X-Long: a\r\n" + b" b\r\n" * 60000 + b"Subject: found\r\n\r\nbody"
    path = tmp_path / "blob"
    path.write_bytes(header)
    started = time.perf_counter()
    (found,) = scan_messages(
        [(str(path), 0, len(header))],
        (("H", "X-LONG", "zzz"), ("H", "SUBJECT", "found")),
        ScanBudget(10**9, 10, time.monotonic() + 10),
    )
    assert time.perf_counter() - started < 1
    assert found == {("H", "X-LONG", "zzz"): False, ("H", "SUBJECT", "found"): True}


def test_atom_helper():
    assert isinstance(token("1:*"), Atom)
