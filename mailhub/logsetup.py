# Logging configuration for the hub process: named loggers under "mailhub", readable text lines.
import logging
import sys


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosmtpd logs every command at INFO; that is per-line noise (and cost) on a busy hub.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
