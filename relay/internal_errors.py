# Reporting an unexpected exception (a bug) met while serving a client, for every protocol: one log
# line per error (protocol, type, message, queue ID or session), the full traceback at most once per
# TRACEBACK_INTERVAL seconds in the whole process, so that a client able to trigger a bug again and
# again cannot flood the log; each one counted in mailhub_internal_errors_total.
# Must never raise, and never log the client's bytes unsanitised.
import logging
import time

from relay import metrics
from relay.mailbox_session import printable

TRACEBACK_INTERVAL = 60.0
_last_traceback = [float("-inf")]


def report_internal_error(logger: logging.Logger, protocol: str, error: BaseException, where: str) -> None:
    """Log and count `error`, met while serving `where` (e.g. "qid=... site=..." or a peer)."""
    metrics.internal_error(protocol)
    now = time.monotonic()
    with_traceback = now - _last_traceback[0] >= TRACEBACK_INTERVAL
    if with_traceback:
        _last_traceback[0] = now
    text = printable(str(error))[:300]
    logger.error(
        "%s internal error: %s: %s (%s)%s",
        protocol,
        type(error).__name__,
        text,
        where,
        "" if with_traceback else "; traceback suppressed (one a minute)",
        exc_info=error if with_traceback else None,
    )
