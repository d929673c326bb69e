# Prometheus metrics of the protocol edges (SMTP ingress, POP3 and IMAP serving, outbound relay,
# logins and connection limits): their definitions, in a registry of the relay layer's own, and the
# cheap hooks the protocols call (one counter increment per transaction, message or session, never
# per chunk). mailhub/metrics.py adds this registry to the one it exposes on /metrics.
# Must never: raise into a session, do I/O, or import from mailhub/ (the process layer above).
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

NO_SITE = "-"  # label value for mail from an unauthenticated peer (smtp.peer_networks)

SMTP_SESSIONS = Counter(
    "mailhub_smtp_sessions_total",
    "SMTP connections, by whether they were admitted or refused (and why).",
    ["outcome"],
    registry=REGISTRY,
)
SMTP_TRANSACTIONS = Counter(
    "mailhub_smtp_transactions_total",
    "SMTP mail transactions that reached the end of data, by outcome (accepted, deferred = 4xx, "
    "rejected = 5xx) and reply code.",
    ["outcome", "code"],
    registry=REGISTRY,
)
SMTP_REFUSALS = Counter(
    "mailhub_smtp_refusals_total",
    "MAIL FROM and RCPT TO commands refused by policy or limits, by command and reply code.",
    ["command", "code"],
    registry=REGISTRY,
)
RECEIVED_MESSAGES = Counter(
    "mailhub_smtp_received_messages_total",
    "Mails accepted (250 after end of data), by sending site.",
    ["site"],
    registry=REGISTRY,
)
RECEIVED_BYTES = Counter(
    "mailhub_smtp_received_bytes_total",
    "Octets of accepted mails as the site sent them (without the hub's Received: header), by sending site.",
    ["site"],
    registry=REGISTRY,
)
DELIVERED_MESSAGES = Counter(
    "mailhub_smtp_delivered_messages_total",
    "Mailbox entries created by accepted mails, by receiving site.",
    ["site"],
    registry=REGISTRY,
)
DELIVERED_BYTES = Counter(
    "mailhub_smtp_delivered_bytes_total",
    "Octets of accepted mails, counted once per receiving site.",
    ["site"],
    registry=REGISTRY,
)
INGEST_SECONDS = Histogram(
    "mailhub_smtp_ingest_duration_seconds",
    "Time from the end of data to the 250 reply (durable commit) of accepted mails.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
POP3_SESSIONS = Counter(
    "mailhub_pop3_sessions_total",
    "POP3 connections, by how they ended (quit, closed, idle_timeout, login_timeout, connection_lost, error, refused).",
    ["outcome"],
    registry=REGISTRY,
)
POP3_MESSAGES = Counter(
    "mailhub_pop3_messages_served_total", "Whole messages sent by RETR, by site.", ["site"], registry=REGISTRY
)
POP3_BYTES = Counter(
    "mailhub_pop3_served_bytes_total",
    "Message octets sent by RETR and TOP (before dot-stuffing), by site.",
    ["site"],
    registry=REGISTRY,
)
SMTP_DEFERRALS = Counter(
    "mailhub_smtp_deferrals_total",
    "Recipients (at RCPT) and mails (at end of data) deferred with a 4xx by "
    "the quota and drain-time policy, by reason (drain_time, over_fair_share, mailbox_bytes, "
    "mailbox_messages, received_per_day, ...).",
    ["reason"],
    registry=REGISTRY,
)
SITE_DEFERRALS = Counter(
    "mailhub_site_deferrals_total",
    "Deferrals (4xx) by the quota and drain-time policy, by the site they were for: side=receiver, the "
    "recipient's site whose mailbox or drain time refused it; side=sender, the sending site's own quota.",
    ["site", "side"],
    registry=REGISTRY,
)
ENCRYPTION_REFUSALS = Counter(
    "mailhub_encryption_refusals_total",
    "Mails refused by the encryption policy at the end of data, by reason "
    "(cleartext_dicom, cleartext_data, malformed, ambiguous, unsupported, structure_limit, fragment, wrong_key, "
    "hidden_recipient; docs/encryption-policy.md).",
    ["reason"],
    registry=REGISTRY,
)
IMAP_SESSIONS = Counter(
    "mailhub_imap_sessions_total",
    "IMAP connections, by how they ended (logout, closed, idle_timeout, "
    "login_timeout, connection_lost, error, refused).",
    ["outcome"],
    registry=REGISTRY,
)
IMAP_MESSAGES = Counter(
    "mailhub_imap_messages_served_total",
    "Whole messages sent by FETCH (BODY[], RFC822), by site.",
    ["site"],
    registry=REGISTRY,
)
IMAP_BYTES = Counter(
    "mailhub_imap_served_bytes_total",
    "Message octets sent as FETCH body literals, by site.",
    ["site"],
    registry=REGISTRY,
)
OUTBOUND_DELIVERIES = Counter(
    "mailhub_outbound_deliveries_total",
    "Outbound relay results per recipient (delivered, deferred, "
    "bounced = permanent failure, expired = lifetime exceeded).",
    ["outcome"],
    registry=REGISTRY,
)
INTERNAL_ERRORS = Counter(
    "mailhub_internal_errors_total",
    "Unexpected errors (bugs) met while serving a client, by protocol; each"
    " is logged in one line, its traceback at most once a minute.",
    ["protocol"],
    registry=REGISTRY,
)
SMTP_ABORTED = Counter(
    "mailhub_smtp_aborted_transactions_total",
    "Transactions that ended while their data was being received"
    " or committed, without a reply (client gone, idle timeout, shutdown, RSET between BDAT chunks), by"
    " reason.",
    ["reason"],
    registry=REGISTRY,
)
SMTP_ACTIVE = Gauge("mailhub_smtp_sessions_active", "Open SMTP sessions.", registry=REGISTRY)
POP3_ACTIVE = Gauge("mailhub_pop3_sessions_active", "Open POP3 sessions.", registry=REGISTRY)
IMAP_ACTIVE = Gauge("mailhub_imap_sessions_active", "Open IMAP sessions.", registry=REGISTRY)
CONNECTIONS_REFUSED = Counter(
    "mailhub_connections_refused_total",
    "Connections refused at once by the connection limits, by protocol and "
    "reason (total, per_address, unauthenticated = not logged in in total, unauthenticated_per_address, "
    "proxy_header = from a balancer without a valid PROXY header).",
    ["protocol", "reason"],
    registry=REGISTRY,
)
LOGIN_TIMEOUTS = Counter(
    "mailhub_login_timeouts_total",
    "Connections closed for not logging in within <protocol>.login_timeout (SMTP "
    "from a peer network: for not starting a transaction), by protocol.",
    ["protocol"],
    registry=REGISTRY,
)
LOGIN_FAILURES = Counter(
    "mailhub_login_failures_total",
    "Failed logins (wrong password or unknown account), by protocol.",
    ["protocol"],
    registry=REGISTRY,
)
LOGIN_PENALTIES = Counter(
    "mailhub_login_penalties_total",
    "Login attempts and failure replies held back by their address's penalty (auth.failure_delay), by protocol.",
    ["protocol"],
    registry=REGISTRY,
)
LOGIN_PENALTY_SECONDS = Counter(
    "mailhub_login_penalty_seconds_total",
    "Seconds logins were held back by their address's penalty, by protocol.",
    ["protocol"],
    registry=REGISTRY,
)
LOGIN_BLOCKS = Counter(
    "mailhub_login_blocks_total",
    "(account, address) pairs blocked for auth.block_time after auth.max_failures failures.",
    registry=REGISTRY,
)
LOGIN_REFUSED = Counter(
    "mailhub_login_refused_total",
    "Login attempts refused with a temporary failure and no password check, by "
    "protocol and reason (blocked = the pair is blocked, queue = the address's turn too far off, busy = too many "
    "password checks waiting).",
    ["protocol", "reason"],
    registry=REGISTRY,
)


# ---- hooks called by the protocol edges (cheap; they never raise into a session) -------------

_children: dict = {}


def _labelled(metric, *values):
    """metric.labels(*values), kept: labels() checks its arguments and takes a lock on every call,
    and the SMTP hooks run several times per mail."""
    child = _children.get((metric, values))
    if child is None:
        child = _children[(metric, values)] = metric.labels(*values)
    return child


def smtp_session(outcome: str) -> None:
    _labelled(SMTP_SESSIONS, outcome).inc()


def smtp_refusal(command: str, reply: str) -> None:
    _labelled(SMTP_REFUSALS, command, reply[:3]).inc()


def internal_error(protocol: str) -> None:
    _labelled(INTERNAL_ERRORS, protocol).inc()


def smtp_aborted(reason: str) -> None:
    _labelled(SMTP_ABORTED, reason).inc()


def encryption_refusal(reason: str) -> None:
    _labelled(ENCRYPTION_REFUSALS, reason).inc()


def smtp_deferral(reason: str, site: str | None = None, side: str = "sender") -> None:
    _labelled(SMTP_DEFERRALS, reason).inc()
    if site:
        _labelled(SITE_DEFERRALS, site, side).inc()


def smtp_transaction(reply: str, size: int, sender_site: str | None, receiving_sites, seconds: float) -> None:
    """One transaction at its end of data: `receiving_sites` are the names of the mailboxes it went to."""
    code = reply[:3]
    outcome = "accepted" if code[0] == "2" else "deferred" if code[0] == "4" else "rejected"
    _labelled(SMTP_TRANSACTIONS, outcome, code).inc()
    if outcome != "accepted":
        return
    sender = sender_site or NO_SITE
    _labelled(RECEIVED_MESSAGES, sender).inc()
    _labelled(RECEIVED_BYTES, sender).inc(size)
    for name in receiving_sites:
        _labelled(DELIVERED_MESSAGES, name).inc()
        _labelled(DELIVERED_BYTES, name).inc(size)
    INGEST_SECONDS.observe(seconds)


def pop3_message(site: str, octets: int, whole: bool) -> None:
    if whole:
        _labelled(POP3_MESSAGES, site).inc()
    _labelled(POP3_BYTES, site).inc(octets)


def outbound_delivery(outcome: str) -> None:
    _labelled(OUTBOUND_DELIVERIES, outcome).inc()


def pop3_session(outcome: str) -> None:
    """`outcome` as the POP3 adapter logs it; details after the first word are dropped."""
    _labelled(POP3_SESSIONS, _session_outcome(outcome, "quit")).inc()


def imap_message(site: str, octets: int, whole: bool) -> None:
    if whole:
        _labelled(IMAP_MESSAGES, site).inc()
    _labelled(IMAP_BYTES, site).inc(octets)


def imap_session(outcome: str) -> None:
    """`outcome` as the IMAP adapter logs it."""
    _labelled(IMAP_SESSIONS, _session_outcome(outcome, "logout")).inc()


def connection_refused(protocol: str, reason: str) -> None:
    _labelled(CONNECTIONS_REFUSED, protocol, reason).inc()


def login_timeout(protocol: str) -> None:
    _labelled(LOGIN_TIMEOUTS, protocol).inc()


def login_failure(protocol: str) -> None:
    _labelled(LOGIN_FAILURES, protocol).inc()


def login_penalty(protocol: str, seconds: float) -> None:
    _labelled(LOGIN_PENALTIES, protocol).inc()
    _labelled(LOGIN_PENALTY_SECONDS, protocol).inc(seconds)


def login_block() -> None:
    LOGIN_BLOCKS.inc()


def login_refused(protocol: str, reason: str) -> None:
    _labelled(LOGIN_REFUSED, protocol, reason).inc()


def _session_outcome(outcome: str, clean_end: str) -> str:
    if outcome.startswith("connection lost"):
        key = "connection_lost"
    elif outcome.startswith(("I/O error", "internal error")):
        key = "error"
    elif outcome in ("idle timeout", "login timeout"):
        key = outcome.replace(" ", "_")
    elif outcome in (clean_end, "refused"):
        key = outcome
    else:
        key = "closed"
    return key


# ---- the mailbox lifecycle (relay/lifecycle.py): expiry, notices, quota warnings, receipts ----------
EXPIRED_MAILS = Counter(
    "mailhub_expired_mails_total",
    "Mailbox entries removed unfetched after their site's retention (lifecycle.retention_days), by site.",
    ["site"],
    registry=REGISTRY,
)
EXPIRED_BYTES = Counter(
    "mailhub_expired_bytes_total",
    "Octets of the mailbox entries removed unfetched, by site.",
    ["site"],
    registry=REGISTRY,
)
LIFECYCLE_NOTICES = Counter(
    "mailhub_lifecycle_notices_total",
    "Notices the hub sent: expiry_warning (to a site), expiry_dsn (one per study, to its sender), "
    "quota_warning (to a site), quota_operator; by kind and outcome (sent, undeliverable).",
    ["kind", "outcome"],
    registry=REGISTRY,
)
QUOTA_WARNINGS = Counter(
    "mailhub_quota_warnings_total",
    "Crossings of a quota warning level (lifecycle.quota_warning_levels), by level.",
    ["level"],
    registry=REGISTRY,
)
RECEIPTS = Counter(
    "mailhub_receipts_total",
    "Receipts (RFC 8098 disposition notifications) passed through, by whether the mail they answer is "
    "known (linked) or not (unlinked).",
    ["outcome"],
    registry=REGISTRY,
)
STUDIES_UNFETCHED = Gauge(
    "mailhub_studies_unfetched",
    "Studies (X-TELEMEDICINE-SETID, per receiving site) received complete more than "
    "lifecycle.study_alert_hours ago with parts still unfetched (of the last 8 days).",
    registry=REGISTRY,
)
STUDIES_UNACKNOWLEDGED = Gauge(
    "mailhub_studies_unacknowledged",
    "Studies (per receiving site) fetched complete more than lifecycle.study_alert_hours ago with a part "
    "still without its receipt from that site (of the last 8 days).",
    registry=REGISTRY,
)


def expired(site: str, octets: int) -> None:
    _labelled(EXPIRED_MAILS, site).inc()
    _labelled(EXPIRED_BYTES, site).inc(octets)


def lifecycle_notice(kind: str, outcome: str) -> None:
    _labelled(LIFECYCLE_NOTICES, kind, outcome).inc()


def quota_warning(level: int) -> None:
    _labelled(QUOTA_WARNINGS, str(level)).inc()


def receipt(linked: bool) -> None:
    _labelled(RECEIPTS, "linked" if linked else "unlinked").inc()
