# SMTP command syntax (RFC 5321 4.1, RFC 1869, RFC 3030, RFC 4954), sans I/O: a received command
# line becomes (verb, argument), an envelope path its address and parameters, a BDAT argument its
# size, an AUTH response its bytes; anything malformed becomes the exact reply that refuses it.
# Every function is linear in its input (no backtracking regex, no email package parser) and never
# raises on any bytes. It must never do I/O and never decide policy (who may send where).
import base64
import ipaddress
import re

from relay.smtp import replies as R

MAX_VERB = 16  # longer first words are not commands of any SMTP extension
MAX_LOCAL_PART = 64  # RFC 5321 4.5.3.1.1
MAX_DOMAIN = 255  # RFC 5321 4.5.3.1.2
MAX_PATH = 256  # RFC 5321 4.5.3.1.3, angle brackets included
MAX_HELO = 255
MAX_SIZE_DIGITS = 18  # SIZE= and BDAT sizes: anything longer cannot be a real size (and int() of
# thousands of digits is slow)

_VERB = re.compile(rb"[A-Za-z]{1,%d}\Z" % MAX_VERB)
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_STRING = re.compile(rf"{_ATOM}(?:\.{_ATOM})*\Z")
_QUOTED_STRING = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"\Z')
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+\Z")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+\Z")
_DIGITS = re.compile(r"[0-9]{1,%d}\Z" % MAX_SIZE_DIGITS)
_HELO = re.compile(r"[\x21-\x7e]{1,%d}\Z" % MAX_HELO)
_BASE64 = re.compile(rb"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?\Z")


def split_command(line: bytes) -> tuple[str, str | None] | str:
    """A command line (its CRLF or LF already removed) as (VERB, argument or None), or the reply
    that refuses it: 500 for an empty line, control bytes or a first word that is no verb, 501 for
    8-bit bytes in the argument (SMTPUTF8 is not offered)."""
    verb, space, rest = line.partition(b" ")
    if not _VERB.match(verb):
        return R.EMPTY_COMMAND if not line.strip() else R.SYNTAX_ERROR
    if _CONTROL.search(rest):
        return R.CONTROL_CHARACTERS
    rest = rest.strip(b" ")
    if not rest:
        return verb.decode("ascii").upper(), None
    if not rest.isascii():
        return R.NOT_ASCII
    return verb.decode("ascii").upper(), rest.decode("ascii")


def parse_path(arg: str | None, keyword: str, null_allowed: bool) -> tuple[str, dict[str, str]] | str:
    """`FROM:<path> params` (keyword "FROM:") or `TO:<path> params` as (address, {KEYWORD: value}),
    or the refusing reply. A source route (<@a,@b:user@c>) is accepted and ignored (RFC 5321 4.1.2);
    a bare address without angle brackets is accepted as most servers do; a path missing either
    bracket is not."""
    usage = R.MAIL_SYNTAX if keyword == "FROM:" else R.RCPT_SYNTAX
    if arg is None or arg[: len(keyword)].upper() != keyword:
        return usage
    rest = arg[len(keyword) :].lstrip(" ")
    if rest.startswith("<"):
        end = _closing_bracket(rest)
        if end < 0:
            return R.BAD_PATH
        path, tail = rest[1:end], rest[end + 1 :]
        if tail and not tail.startswith(" "):
            return R.BAD_PATH
        if len(path) + 2 > MAX_PATH:
            return R.PATH_TOO_LONG
        if path.startswith("@"):
            route, colon, path = path.partition(":")
            if not colon or not all(hop.startswith("@") and is_domain(hop[1:]) for hop in route.split(",")):
                return R.BAD_PATH
    else:
        path, _, tail = rest.partition(" ")
        if not path or ">" in path:
            return R.BAD_PATH
        if len(path) + 2 > MAX_PATH:
            return R.PATH_TOO_LONG
    if path == "":
        if not null_allowed:
            return R.BAD_PATH
    elif not is_mailbox(path) and not (keyword == "TO:" and path.lower() == "postmaster"):
        return R.BAD_PATH  # (RFC 5321 4.1.1.3: RCPT TO:<Postmaster> needs no domain)
    params = parse_params(tail)
    if isinstance(params, str):
        return params
    return path, params


def _closing_bracket(text: str) -> int:
    """Where the path that `text` starts with ("<...") ends: its ">" outside a quoted local part."""
    end = text.find(">")
    if '"' not in text[: end if end >= 0 else len(text)]:
        return end
    quoted = escaped = False
    for i, char in enumerate(text):
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return i
    return -1


def is_mailbox(text: str) -> bool:
    """Local-part "@" (Domain / address-literal), RFC 5321 4.1.2, within the length limits."""
    local, at, domain = text.rpartition("@")
    if not at or not local or len(local) > MAX_LOCAL_PART:
        return False
    if not (_DOT_STRING.match(local) or _QUOTED_STRING.match(local)):
        return False
    if domain.startswith("["):
        return is_address_literal(domain)
    return is_domain(domain)


def is_domain(text: str) -> bool:
    if not text or len(text) > MAX_DOMAIN:
        return False
    return all(_LABEL.match(label) for label in text.split("."))


def is_address_literal(text: str) -> bool:
    if len(text) < 3 or not text.startswith("[") or not text.endswith("]"):
        return False
    inner = text[1:-1]
    try:
        if inner[:5].upper() == "IPV6:":
            return ipaddress.ip_address(inner[5:]).version == 6
        if _GENERAL_LITERAL.match(inner):
            return True
        return ipaddress.ip_address(inner).version == 4
    except ValueError:
        return False


def parse_params(text: str) -> dict[str, str] | str:
    """ESMTP parameters (RFC 5321 4.1.2: keyword[=value], separated by spaces) by upper-case
    keyword; a keyword without a value maps to "". A repeated keyword is refused."""
    params: dict[str, str] = {}
    for word in text.split():
        name, eq, value = word.partition("=")
        if not _KEYWORD.match(name) or (eq and not _VALUE.match(value)):
            return R.BAD_PARAMETER
        name = name.upper()
        if name in params:
            return R.DUPLICATE_PARAMETER
        params[name] = value
    return params


def parse_size(value: str) -> int | None:
    """A SIZE= or BDAT size: up to MAX_SIZE_DIGITS decimal digits, else None."""
    return int(value) if _DIGITS.match(value) else None


def parse_mail_parameters(params: dict[str, str]) -> int | None | str:
    """MAIL FROM's parameters (from parse_path): the declared SIZE (None: not declared), or the
    reply refusing them. BODY=7BIT|8BITMIME is accepted; AUTH=<mailbox> (RFC 4954) is
    informational; any other parameter is refused."""
    size = None
    for name, value in params.items():
        if name == "SIZE":
            size = parse_size(value)
            if size is None:
                return R.BAD_SIZE
        elif name == "BODY":
            if value.upper() not in ("7BIT", "8BITMIME"):
                return R.BAD_BODY
        elif name != "AUTH":
            return R.UNKNOWN_PARAMETER
    return size


def parse_bdat(arg: str | None) -> tuple[int | None, bool | None]:
    """BDAT's argument as (size, last): (size, None) when the size is fine but the rest is not
    (the chunk can still be skipped), (None, None) when the size itself is unusable."""
    words = (arg or "").split(" ")
    size = parse_size(words[0])
    if size is None:
        return None, None
    if len(words) == 1:
        return size, False
    if len(words) == 2 and words[1].upper() == "LAST":
        return size, True
    return size, None


def parse_helo(arg: str | None) -> str | None:
    """The client's name after HELO/EHLO: one word of printable ASCII (a domain or an address
    literal as RFC 5321 asks, but not checked further, as Postfix does not by default)."""
    if arg is None or not _HELO.match(arg):
        return None
    return arg


def decode_sasl(text: bytes | str) -> bytes | None:
    """A SASL response or initial response (RFC 4954): strict base64, "=" for an empty one;
    None when it is not valid base64."""
    data = text.encode("ascii", "replace") if isinstance(text, str) else text
    if data == b"=":
        return b""
    if not _BASE64.match(data):
        return None
    return base64.b64decode(data)
