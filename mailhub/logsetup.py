# Logging configuration for the hub process: named loggers under "mailhub", readable text lines by
# default, or one JSON object per line for log shippers (log.format = "json"). A JSON line has the
# fields time, level, logger, event and msg always, and those of FIELDS that the line's code gave
# (logging's `extra`: the transaction, session and login lines); docs/operator-guide.md#logs lists
# them. The text lines are the same either way. Must never: let a field's value break the line
# (every value is JSON-encoded; client-controlled text is sanitised where it is logged).
import json
import logging
import sys
import time

# The structured fields a JSON line may carry besides time, level, logger, event and msg, in this
# order. Names and meanings are stable: log shippers and alert rules depend on them.
FIELDS = (
    "queue_id",  # the mail's queue ID
    "protocol",  # smtp, pop3, imap
    "site",  # the logged-in (sending, fetching) site, null before login
    "client",  # the client's IP address
    "sender",  # envelope sender (MAIL FROM)
    "recipients",  # envelope recipients (list)
    "size",  # octets: of the mail, or sent in a session
    "sha256",  # of the stored mail
    "outcome",  # the reply code of a transaction, or how a session or login ended
    "reason",  # why, for refusals and aborts
    "messages",  # mails downloaded in a session
    "deleted",  # mails deleted (POP3 DELE, IMAP EXPUNGE) in a session
    "duration_s",  # seconds: a session's length, a transaction's commit
    "user",  # the login name given (failed logins)
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", "log"),
            "msg": record.getMessage(),
        }
        fields = record.__dict__
        for name in FIELDS:
            if name in fields:
                entry[name] = fields[name]
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def formatter(fmt: str = "text") -> logging.Formatter:
    """The hub's log line format: "text" or "json" (log.format)."""
    return JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosmtpd logs every command at INFO and deprecation notes at WARNING: per-line noise (and cost).
    logging.getLogger("mail.log").setLevel(logging.ERROR)
