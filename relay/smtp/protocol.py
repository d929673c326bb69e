# The SMTP server's protocol core, sans-I/O: where a session stands (Phase) and, in one table
# (TRANSITIONS), which commands each phase refuses with which reply; a received command line as
# (verb, argument) or its refusal; the reply bytes on the wire (RFC 3463 codes added, control bytes
# masked); the EHLO reply; and one AUTH exchange (PLAIN, LOGIN) as a small state machine: lines
# in, challenges, credentials or the refusal out. The session (relay/smtp/server.py on
# relay/smtp/connection.py) does the I/O, the limits and the policy around it. Must never do I/O,
# and never decide who may send where.
import base64
import collections
import enum
import re
from collections.abc import Container
from dataclasses import dataclass

from relay.smtp import replies as R
from relay.smtp.syntax import decode_sasl, split_command

HELO_FIRST = "503 5.5.1 Error: send HELO first"
NO_ARGUMENT = {verb: f"501 5.5.4 Syntax: {verb}" for verb in ("DATA", "QUIT", "STARTTLS")}
MECHANISMS = ("PLAIN", "LOGIN")


class Phase(enum.Enum):
    CONNECTED = "connected"  # no HELO/EHLO yet
    GREETED = "greeted"  # HELO/EHLO, no transaction
    MAIL = "mail"  # MAIL FROM accepted, no recipient yet
    RCPT = "rcpt"  # recipients accepted (or the directory asked for)
    BDAT = "bdat"  # a BDAT series is open: chunks received, LAST not yet
    BDAT_FAILED = "bdat_failed"  # a BDAT chunk of this transaction failed: only RSET/MAIL end it


def phase_of(greeted: bool, mail_from: bool, recipients: bool, bdat_open: bool, bdat_failed: bool) -> Phase:
    if not greeted:
        return Phase.CONNECTED
    if bdat_failed:
        return Phase.BDAT_FAILED
    if bdat_open:
        return Phase.BDAT
    if recipients:
        return Phase.RCPT
    return Phase.MAIL if mail_from else Phase.GREETED


C, G, M, T, B, F = (Phase.CONNECTED, Phase.GREETED, Phase.MAIL, Phase.RCPT, Phase.BDAT, Phase.BDAT_FAILED)

# verb -> {phase: the reply refusing the verb there}; a phase not named allows the verb. Verbs not in
# the table (HELO, EHLO, RSET, NOOP, QUIT, VRFY, EXPN, HELP, STARTTLS) are allowed in every phase.
# AUTH is refused before EHLO (HELO is not enough; see AuthExchange for the rest of its checks).
TRANSITIONS: dict[str, dict[Phase, str]] = {
    "MAIL": {C: HELO_FIRST, M: R.NESTED_MAIL, T: R.NESTED_MAIL, B: R.NESTED_MAIL, F: R.NESTED_MAIL},
    "RCPT": {C: HELO_FIRST, G: R.NEED_MAIL},
    "DATA": {C: HELO_FIRST, G: R.NEED_MAIL, M: R.NEED_RCPT, B: R.DATA_AFTER_BDAT, F: R.DATA_AFTER_BDAT},
    "BDAT": {C: R.BAD_SEQUENCE, G: R.NEED_MAIL, M: R.NEED_RCPT, F: R.NO_BDAT_TRANSACTION},
    "AUTH": {M: R.BAD_SEQUENCE, T: R.BAD_SEQUENCE, B: R.BAD_SEQUENCE, F: R.BAD_SEQUENCE},
}


def out_of_sequence(verb: str, phase: Phase) -> str | None:
    """The reply refusing `verb` in `phase`, or None: allowed."""
    return TRANSITIONS.get(verb, {}).get(phase)


def command(line: bytes | None, max_line_length: int, verbs: Container[str]) -> tuple[str, str | None] | str:
    """A command line without its line end (None: longer than the reader holds) as (VERB, argument
    or None), or the reply refusing it: too long, malformed, or a verb not in `verbs`."""
    if line is None or len(line) > max_line_length:
        return R.LINE_TOO_LONG
    parsed = split_command(line)
    if isinstance(parsed, tuple) and parsed[0] not in verbs:
        return R.UNKNOWN_COMMAND
    return parsed


class CommandBudget:
    """What one session may send: each verb at most `max_commands` times, and replies that count
    as syntax errors (is_syntax_error) fewer than `max_bad_commands` times in all."""

    def __init__(self, max_commands: int, max_bad_commands: int):
        self._max_commands = max_commands
        self._max_bad_commands = max_bad_commands
        self._calls: collections.Counter[str] = collections.Counter()
        self.errors = 0

    def take(self, verb: str) -> str | None:
        """Count one run of `verb`; the reply closing the connection when it was sent too often."""
        if self._calls[verb] >= self._max_commands:
            return R.sent_too_many_times(verb)
        self._calls[verb] += 1
        return None

    def replied(self, status: str) -> None:
        if is_syntax_error(status):
            self.errors += 1

    @property
    def exhausted(self) -> bool:
        """Too many syntax errors: close the connection (R.TOO_MANY_ERRORS)."""
        return self.errors >= self._max_bad_commands


# ---- replies -------------------------------------------------------------------------------------

_COUNTED_ERRORS = frozenset(("500", "501", "504", "555"))  # syntax errors (smtp.max_bad_commands)
# ENHANCEDSTATUSCODES promises RFC 3463 codes on every reply; aiosmtpd's own replies lack them.
_DEFAULT_ENHANCED = {
    "221": "2.0.0",
    "250": "2.0.0",
    "252": "2.0.0",
    "421": "4.3.0",
    "451": "4.3.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "535": "5.7.8",
    "554": "5.0.0",
}
_HAS_ENHANCED = re.compile(r"\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")
_CONTROL_CHARS = re.compile(r"[\x00-\x09\x0b\x0c\x0e-\x1f\x7f]")  # all but CR and LF


def is_syntax_error(status: str) -> bool:
    """The reply counts against smtp.max_bad_commands."""
    return status[:3] in _COUNTED_ERRORS


def wire(status: str) -> bytes:
    """A reply as sent, CRLF included: an enhanced status code added where it lacks one (single
    line replies), control characters other than CR and LF masked, non-ASCII as "?"."""
    code = status[:3]
    if code in _DEFAULT_ENHANCED and "\r\n" not in status and not _HAS_ENHANCED.match(status):
        status = f"{code} {_DEFAULT_ENHANCED[code]} {status[4:]}".rstrip()
    if not status.isprintable():  # a reply echoing the client's control bytes (or a multi-line one)
        status = _CONTROL_CHARS.sub("?", status)
    return status.encode("ascii", "replace") + b"\r\n"


def ehlo_reply(hostname: str, max_size: int, starttls: bool, auth: bool) -> str:
    lines = [
        f"250-{hostname}",
        f"250-SIZE {max_size}",
        "250-8BITMIME",
        "250-PIPELINING",
        "250-CHUNKING",
        "250-ENHANCEDSTATUSCODES",
    ]
    if starttls:
        lines.append("250-STARTTLS")
    if auth:
        lines.append("250-AUTH " + " ".join(MECHANISMS))
    lines.append("250 HELP")
    return "\r\n".join(lines)


def with_protocol(extended: bool, tls: bool, authenticated: bool) -> str:
    """The "with" of the Received: line (RFC 3848): SMTP or ESMTP, then S for TLS, A for AUTH."""
    return ("ESMTP" if extended else "SMTP") + ("S" if tls else "") + ("A" if authenticated else "")


# ---- AUTH ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Challenge:
    """Send `line` (a 334 reply, CRLF included) and feed the client's next line to receive()."""

    line: bytes


@dataclass(frozen=True)
class Credentials:
    """The exchange is complete: check these; answer R.AUTH_OK or the failure."""

    login: bytes
    password: bytes


@dataclass(frozen=True)
class Refused:
    """The exchange ended without credentials: send `reply`."""

    reply: str


class AuthExchange:
    """One AUTH command after EHLO, outside a transaction, with TLS where required and not yet
    authenticated (the server checks those first): AUTH PLAIN [initial] (RFC 4616), AUTH LOGIN
    [user]. start() gives the first event; each Challenge's answer goes to receive(line), None for
    a line longer than allowed. `counts` says whether an exchange that does not end in a login
    counts as a failed authentication (the mechanism was PLAIN or LOGIN)."""

    def __init__(self, arg: str | None, login_prompt: str = "Username:", password_prompt: str = "Password:"):
        self._arg = arg or ""
        self._prompts = login_prompt, password_prompt
        self._mechanism = ""
        self._login: bytes | None = None
        first = self._arg.split()
        self.counts = bool(first) and first[0].upper() in MECHANISMS

    def start(self) -> Challenge | Credentials | Refused:
        words = self._arg.split(" ") if self._arg else []
        if not 1 <= len(words) <= 2:
            return Refused(R.AUTH_SYNTAX)
        self._mechanism = words[0].upper()
        if self._mechanism not in MECHANISMS:
            return Refused(R.AUTH_UNKNOWN_MECHANISM)
        if len(words) == 1:
            return self._challenge(b"" if self._mechanism == "PLAIN" else self._prompts[0].encode())
        initial = decode_sasl(words[1])
        if initial is None:
            return Refused(R.AUTH_BAD_BASE64)
        return self._answer(initial)

    def receive(self, line: bytes | None) -> Challenge | Credentials | Refused:
        if line is None:
            return Refused(R.LINE_TOO_LONG)
        line = line.strip(b" ")
        if line == b"*":
            return Refused(R.AUTH_CANCELLED)
        blob = decode_sasl(line)
        if blob is None:
            return Refused(R.AUTH_BAD_BASE64)
        return self._answer(blob)

    def _challenge(self, text: bytes) -> Challenge:
        return Challenge(b"334 " + base64.b64encode(text) + b"\r\n")

    def _answer(self, blob: bytes) -> Challenge | Credentials | Refused:
        if self._mechanism == "LOGIN":
            if self._login is None:
                self._login = blob
                return self._challenge(self._prompts[1].encode())
            return Credentials(self._login, blob)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            return Refused(R.AUTH_MALFORMED)
        authzid, login, password = parts
        if authzid and authzid != login:  # RFC 4616: a site may act only as itself
            return Refused(R.AUTH_FAILED)
        return Credentials(login, password)


__all__ = [
    "Phase",
    "phase_of",
    "TRANSITIONS",
    "out_of_sequence",
    "command",
    "CommandBudget",
    "HELO_FIRST",
    "NO_ARGUMENT",
    "wire",
    "is_syntax_error",
    "ehlo_reply",
    "with_protocol",
    "AuthExchange",
    "Challenge",
    "Credentials",
    "Refused",
]
