# SMTP reply texts of the hub, as named constants in one place (RFC 5321, RFC 3463 codes).
import math

OK = "250 2.0.0 OK"
SENDER_OK = "250 2.1.0 Sender OK"
RECIPIENT_OK = "250 2.1.5 Recipient OK"
START_DATA = "354 End data with <CR><LF>.<CR><LF>"
BYE = "221 2.0.0 Bye"
READY_TLS = "220 2.0.0 Ready to start TLS"
AUTH_OK = "235 2.7.0 Authentication successful"

SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
KICKED = "421 4.3.2 Closed by the hub's operator, try again later"
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, try again later"
TOO_MANY_CONNECTIONS_FROM_ADDRESS = "421 4.7.0 Too many connections from your address, try again later"
TOO_MANY_UNAUTHENTICATED = "421 4.7.0 Too many connections not yet authenticated, try again later"
TOO_MANY_UNAUTHENTICATED_FROM_ADDRESS = (
    "421 4.7.0 Too many connections not yet authenticated from your address, try again later"
)
TOO_MANY_AUTH_FAILURES = "421 4.7.0 Too many failed authentications, goodbye"
TIMEOUT = "421 4.4.2 Idle timeout, closing connection"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
INTERNAL_ERROR = "451 4.3.0 Internal error, try again later"
TLS_UNAVAILABLE = "454 4.7.0 TLS not available"

# Syntax: a 500 for a line that is no command, 501 for a command's bad argument, 504 for an unknown
# AUTH mechanism, 555 for an unknown MAIL/RCPT parameter (RFC 5321 4.2.2, RFC 3463 codes).
SYNTAX_ERROR = "500 5.5.2 Syntax error, command unrecognized"
EMPTY_COMMAND = "500 5.5.2 Syntax error: empty command line"
CONTROL_CHARACTERS = "500 5.5.2 Syntax error: control characters in the command line"
LINE_TOO_LONG = "500 5.5.6 Command line too long"
UNKNOWN_COMMAND = "500 5.5.1 Command not recognized"
NOT_ASCII = "501 5.5.4 Syntax error: 8-bit characters in the command (SMTPUTF8 is not offered)"
BAD_ARGUMENTS = "501 5.5.4 Syntax error in parameters or arguments"
BAD_PARAMETER = "501 5.5.4 Syntax error in MAIL FROM/RCPT TO parameters"
DUPLICATE_PARAMETER = "501 5.5.4 A MAIL FROM/RCPT TO parameter was given twice"
BAD_SIZE = "501 5.5.4 SIZE needs a number of octets"
BAD_BODY = "501 5.5.4 BODY must be 7BIT or 8BITMIME"
MAIL_SYNTAX = "501 5.5.4 Syntax: MAIL FROM:<address> [SIZE=<size>] [BODY=7BIT|8BITMIME]"
RCPT_SYNTAX = "501 5.5.4 Syntax: RCPT TO:<address>"
BDAT_SYNTAX = "501 5.5.4 Syntax: BDAT <size> [LAST]"
HELO_SYNTAX = "501 5.5.4 Syntax: HELO hostname"
EHLO_SYNTAX = "501 5.5.4 Syntax: EHLO hostname"
BAD_PATH = "501 5.1.3 Bad address syntax"
PATH_TOO_LONG = "501 5.1.3 Address too long"
AUTH_SYNTAX = "501 5.5.4 Syntax: AUTH <mechanism> [<initial response>]"
AUTH_BAD_BASE64 = "501 5.5.2 Cannot decode base64"
AUTH_MALFORMED = "501 5.5.2 Malformed authentication response"
AUTH_CANCELLED = "501 5.0.0 Authentication cancelled"
AUTH_NEEDS_EHLO = "503 5.5.1 Send EHLO first"
TOO_MANY_ERRORS = "421 4.7.0 Too many errors, closing connection"
BAD_SEQUENCE = "503 5.5.1 Bad sequence of commands"
NEED_MAIL = "503 5.5.1 Need MAIL command first"
NEED_RCPT = "503 5.5.1 Need RCPT command first"
NESTED_MAIL = "503 5.5.1 Nested MAIL command"
ALREADY_TLS = "503 5.5.1 TLS already active"
DATA_AFTER_BDAT = "503 5.5.1 DATA not allowed after BDAT in one transaction"
NO_BDAT_TRANSACTION = "503 5.5.1 No valid BDAT transaction; chunk discarded"
UNKNOWN_PARAMETER = "555 5.5.4 MAIL FROM/RCPT TO parameter not recognized"
AUTH_REQUIRED = "530 5.7.0 Authentication required"
AUTH_NEEDS_TLS = "538 5.7.11 Encryption required for requested authentication mechanism"
AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"
AUTH_ALREADY = "503 5.5.1 Already authenticated"
AUTH_UNKNOWN_MECHANISM = "504 5.5.4 Unrecognized authentication type"
RELAY_DENIED = "554 5.7.1 Relay access denied"
UNKNOWN_USER = "550 5.1.1 No such user here"
POSTMASTER_UNSET = (
    "550 5.1.1 No postmaster mailbox is set up on this hub (its operator sets lifecycle.operator_address)"
)
POSTMASTER_UNREACHABLE = "451 4.3.0 The postmaster mailbox is not reachable now, try again later"
POSTMASTER_TOO_BIG = "552 5.3.4 Mail to postmaster from outside the network is limited in size"
NO_ROUTE = "550 5.1.2 No route to that domain"
SENDER_NOT_OWNED = "553 5.7.1 Sender address not owned by the authenticated site"
LINE_TOO_LONG_IN_DATA = (
    "554 5.6.0 Message refused: a line is longer than 998 characters (RFC 5321"
    " 4.5.3.1.6); send long lines in base64 or quoted-printable"
)
MESSAGE_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
DIRECTORY_SITES_ONLY = "550 5.7.1 The directory answers authenticated sites only"
# `mailhub site remove` while a session of (or a transaction to) the site was open
SITE_REMOVED = "530 5.7.0 Authentication required: this site was removed"
RECIPIENT_SITE_REMOVED = "451 4.1.1 A recipient site was removed during this transaction; try again"


def queued(queue_id: str) -> str:
    return f"250 2.0.0 Ok: queued as {queue_id}"


def directory_queued(queue_id: str) -> str:
    return f"250 2.0.0 Ok: directory sent to your mailbox, queued as {queue_id}"


def postmaster_too_often(wait: float) -> str:
    return f"450 4.7.1 Too many mails to postmaster from your address; try again in {max(1, round(wait))} s"


def directory_too_soon(wait: float) -> str:
    return f"450 4.7.1 The directory was sent to your mailbox a moment ago; ask again in {math.ceil(wait)} s"


def login_timeout(peer_network: bool, seconds: float) -> str:
    what = "mail transaction started" if peer_network else "authentication"
    return f"421 4.4.2 No {what} within {seconds:.0f} seconds, closing connection"


def auth_temporary_failure(reason: str) -> str:
    """RFC 4954: 454 4.7.0 for a temporary authentication failure."""
    return f"454 4.7.0 Temporary authentication failure: {reason}"


def sent_too_many_times(verb: str) -> str:
    return f"421 4.7.0 {verb} sent too many times"


def chunk_received(size: int) -> str:
    return f"250 2.0.0 {size} octets received"
