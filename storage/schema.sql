-- Index schema of the hub (SQLite, WAL). Blobs live as files; this index is the commit point:
-- a blob file without a `messages` row is a leftover of an interrupted transaction.
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', 1), ('sites_version', 0);

CREATE TABLE IF NOT EXISTS sites (
    id            INTEGER PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    created_at    REAL NOT NULL
);

CREATE TABLE IF NOT EXISTS addresses (
    address TEXT PRIMARY KEY COLLATE NOCASE,
    site_id INTEGER NOT NULL REFERENCES sites (id) ON DELETE CASCADE
);

-- One row per stored message (single instance however many recipients); refs counts the
-- mailbox entries (and later queue entries) that point at it. A message is the bytes
-- [blob_offset, blob_offset + size) of its blob file: a file of its own (offset 0), or a pack of
-- small messages (storage/packs.py), freed with its last message.
CREATE TABLE IF NOT EXISTS messages (
    queue_id     TEXT PRIMARY KEY,
    blob         TEXT NOT NULL,
    blob_offset  INTEGER NOT NULL DEFAULT 0,
    size         INTEGER NOT NULL,
    sha256       TEXT NOT NULL,
    dot_lines    INTEGER NOT NULL,
    received_at  REAL NOT NULL,
    mail_from    TEXT NOT NULL,
    sender_site  INTEGER,
    message_id   TEXT,
    set_id       TEXT,
    set_part     INTEGER,
    set_total    INTEGER,
    refs         INTEGER NOT NULL,
    structure    TEXT,     -- MIME structure recorded at ingest (JSON, relay/mime/structure.py)
    crc32        INTEGER   -- zlib CRC-32 of the message bytes, checked while serving (NULL: stored before)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS messages_message_id ON messages (message_id);
CREATE INDEX IF NOT EXISTS messages_set_id ON messages (set_id);
CREATE INDEX IF NOT EXISTS messages_blob ON messages (blob);

-- Packs (storage/packs.py): where the last committed frame of each pack ends. Bytes beyond it
-- belong to a group commit that never committed (start-up recovery moves them aside). Written in
-- each group commit's transaction; a pack's row goes with its last message.
CREATE TABLE IF NOT EXISTS packs (
    blob          TEXT PRIMARY KEY,
    committed_end INTEGER NOT NULL
) WITHOUT ROWID;

-- Group commits whose ledger line (storage/ledger.py) may not be durable yet: seq, attempt id, its
-- mails (JSON {"f": queue IDs stored as files of their own, "x": those left out at the commit for
-- want of room}; '' for none). Rows the ledger holds durably are deleted by
-- a later transaction, except the last one: the index's last group commit (envelope records in
-- packs name it); the index writer appends the others to the ledger when it starts.
CREATE TABLE IF NOT EXISTS commits (
    seq     INTEGER PRIMARY KEY,
    attempt INTEGER NOT NULL,
    mails   TEXT NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('ledger_quiet', 0);

-- Removals the ledger must learn (a mailbox entry removed, an outbound recipient done), filled by
-- the triggers below in the removing transaction, whoever runs it (the hub, `mailhub site remove`,
-- `mailhub queue delete`); the index writer appends them to the ledger after the commit and a later
-- transaction deletes them. meta ledger_quiet = 1 silences the triggers (start-up recovery moving
-- rows of a missing blob aside: not a receiver's deletion, rebuild may bring them back).
CREATE TABLE IF NOT EXISTS ledger_pending (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    kind      TEXT NOT NULL,      -- d: mailbox entry removed, o: outbound recipient done
    queue_id  TEXT NOT NULL,
    site_id   INTEGER,
    site_name TEXT,
    rcpt      TEXT,
    uid       INTEGER,
    at        REAL NOT NULL
);

-- Mailbox entries: uid is strictly ascending across the hub, hence within each mailbox.
CREATE TABLE IF NOT EXISTS mailbox (
    uid          INTEGER PRIMARY KEY AUTOINCREMENT,
    site_id      INTEGER NOT NULL REFERENCES sites (id) ON DELETE CASCADE,
    queue_id     TEXT NOT NULL REFERENCES messages (queue_id),
    rcpt         TEXT NOT NULL,
    delivered_at REAL NOT NULL,
    fetched_at   REAL,           -- first download (POP3 RETR, IMAP body fetch); NULL: still waiting
    flags        INTEGER NOT NULL DEFAULT 0,  -- IMAP flags: \Seen 1, \Answered 2, \Flagged 4, \Deleted 8, \Draft 16
    warned_at    REAL            -- when the site was warned that this entry expires unfetched (storage/lifecycle.py)
);
CREATE INDEX IF NOT EXISTS mailbox_site ON mailbox (site_id, uid);
CREATE INDEX IF NOT EXISTS mailbox_queue_id ON mailbox (queue_id);

-- Blobs whose last reference is gone; their files are removed after the commit, and any
-- left over by a crash are removed on the next start.
CREATE TABLE IF NOT EXISTS blob_trash (
    blob TEXT PRIMARY KEY
) WITHOUT ROWID;

-- What each site has downloaded over POP3 and IMAP, as running totals: one row per site,
-- updated at the end of each session (IMAP: also after each command that fetched mail). A drain rate is the difference of two readings of these
-- counters divided by the time between them (or bytes / send_seconds for the transfer speed
-- alone); last_poll_at tells whether the site still polls at all.
CREATE TABLE IF NOT EXISTS site_downloads (
    site_id       INTEGER PRIMARY KEY REFERENCES sites (id) ON DELETE CASCADE,
    sessions      INTEGER NOT NULL,
    messages      INTEGER NOT NULL,   -- whole messages sent (RETR)
    bytes         INTEGER NOT NULL,   -- message octets sent (RETR and TOP), before dot-stuffing
    send_seconds  REAL NOT NULL,      -- time spent sending those octets
    first_poll_at REAL NOT NULL,      -- login time of the first session
    last_poll_at  REAL NOT NULL,      -- login time of the latest session
    last_fetch_at REAL                -- time of the latest whole mail sent (NULL: none yet)
);


-- A freed message's range of a pack whose other messages live on: its bytes are released (a hole
-- punched, storage/packs.py punch_hole) by the first Storage.empty_trash after the configured
-- delay (storage.release_freed_after) from freed_at (Unix time), so that readers still sending it
-- keep getting its bytes.
CREATE TABLE IF NOT EXISTS blob_holes (
    blob     TEXT NOT NULL,
    start    INTEGER NOT NULL,
    size     INTEGER NOT NULL,
    freed_at REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (blob, start)
) WITHOUT ROWID;

DROP TRIGGER IF EXISTS messages_free;   -- replaced by message_released (blob files shared by packs)
DROP TRIGGER IF EXISTS message_freed;   -- replaced by message_released (holes in packs)
CREATE TRIGGER IF NOT EXISTS message_released AFTER UPDATE OF refs ON messages
WHEN NEW.refs <= 0
BEGIN
    DELETE FROM messages WHERE queue_id = NEW.queue_id;
    INSERT OR IGNORE INTO blob_trash (blob)
        SELECT NEW.blob WHERE NOT EXISTS (SELECT 1 FROM messages WHERE blob = NEW.blob);
    INSERT OR IGNORE INTO blob_holes (blob, start, size, freed_at)
        SELECT NEW.blob, NEW.blob_offset, NEW.size, (julianday('now') - 2440587.5) * 86400.0
        WHERE EXISTS (SELECT 1 FROM messages WHERE blob = NEW.blob);
END;
-- a pack's committed end goes with its last message
CREATE TRIGGER IF NOT EXISTS pack_released AFTER DELETE ON messages
WHEN NOT EXISTS (SELECT 1 FROM messages WHERE blob = OLD.blob)
BEGIN
    DELETE FROM packs WHERE blob = OLD.blob;
END;

CREATE TRIGGER IF NOT EXISTS sites_changed_ins AFTER INSERT ON sites
BEGIN UPDATE meta SET value = value + 1 WHERE key = 'sites_version'; END;
CREATE TRIGGER IF NOT EXISTS sites_changed_upd AFTER UPDATE ON sites
BEGIN UPDATE meta SET value = value + 1 WHERE key = 'sites_version'; END;
CREATE TRIGGER IF NOT EXISTS sites_changed_del AFTER DELETE ON sites
BEGIN UPDATE meta SET value = value + 1 WHERE key = 'sites_version'; END;
CREATE TRIGGER IF NOT EXISTS addresses_changed_ins AFTER INSERT ON addresses
BEGIN UPDATE meta SET value = value + 1 WHERE key = 'sites_version'; END;
CREATE TRIGGER IF NOT EXISTS addresses_changed_del AFTER DELETE ON addresses
BEGIN UPDATE meta SET value = value + 1 WHERE key = 'sites_version'; END;

-- ---- Quotas (issue 5) ----------------------------------------------------------------------
-- Per-site limits set with `mailhub site set`; NULL means the config default, -1 unlimited.
CREATE TABLE IF NOT EXISTS site_limits (
    site_id             INTEGER PRIMARY KEY REFERENCES sites (id) ON DELETE CASCADE,
    mailbox_bytes       INTEGER,
    mailbox_messages    INTEGER,
    max_message_size    INTEGER,
    submitted_per_day   INTEGER,
    submitted_per_month INTEGER,
    received_per_day    INTEGER,
    received_per_month  INTEGER,
    max_drain_time      REAL,
    downlink            REAL
);
CREATE TRIGGER IF NOT EXISTS site_limits_changed_ins AFTER INSERT ON site_limits
BEGIN UPDATE meta SET value = value + 1 WHERE key = 'sites_version'; END;
CREATE TRIGGER IF NOT EXISTS site_limits_changed_upd AFTER UPDATE ON site_limits
BEGIN UPDATE meta SET value = value + 1 WHERE key = 'sites_version'; END;

-- Mailbox usage per (receiving site, sending site; 0 = no site, e.g. a peer network): every
-- entry held, and those not yet downloaded (the backlog the drain time is computed from).
-- Kept by the triggers below in the same transaction as the mailbox, so it never drifts.
CREATE TABLE IF NOT EXISTS mailbox_usage (
    receiver_id      INTEGER NOT NULL REFERENCES sites (id) ON DELETE CASCADE,
    sender_id        INTEGER NOT NULL,
    held_bytes       INTEGER NOT NULL,
    held_messages    INTEGER NOT NULL,
    waiting_bytes    INTEGER NOT NULL,
    waiting_messages INTEGER NOT NULL,
    PRIMARY KEY (receiver_id, sender_id)
) WITHOUT ROWID;

-- Volumes per site and UTC period ('YYYY-MM-DD' and 'YYYY-MM'), in message octets.
CREATE TABLE IF NOT EXISTS site_volume (
    site_id         INTEGER NOT NULL REFERENCES sites (id) ON DELETE CASCADE,
    period          TEXT NOT NULL,
    submitted_bytes INTEGER NOT NULL DEFAULT 0,
    received_bytes  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (site_id, period)
) WITHOUT ROWID;

-- The server's live throttle state per site, written every few seconds for `mailhub site show`.
CREATE TABLE IF NOT EXISTS site_throttle (
    site_id       INTEGER PRIMARY KEY REFERENCES sites (id) ON DELETE CASCADE,
    updated_at    REAL NOT NULL,
    state         TEXT NOT NULL     -- JSON object
);

CREATE TRIGGER IF NOT EXISTS mailbox_added AFTER INSERT ON mailbox
BEGIN
    INSERT INTO mailbox_usage (receiver_id, sender_id, held_bytes, held_messages, waiting_bytes,
                               waiting_messages)
        SELECT NEW.site_id, coalesce(m.sender_site, 0), m.size, 1, m.size, 1
        FROM messages m WHERE m.queue_id = NEW.queue_id
        ON CONFLICT (receiver_id, sender_id) DO UPDATE SET
            held_bytes = held_bytes + excluded.held_bytes, held_messages = held_messages + 1,
            waiting_bytes = waiting_bytes + excluded.waiting_bytes,
            waiting_messages = waiting_messages + 1;
    INSERT INTO site_volume (site_id, period, received_bytes)
        SELECT NEW.site_id, p.period, m.size FROM messages m,
            (SELECT strftime('%Y-%m-%d', NEW.delivered_at, 'unixepoch') AS period
             UNION ALL SELECT strftime('%Y-%m', NEW.delivered_at, 'unixepoch')) p
        WHERE m.queue_id = NEW.queue_id
        ON CONFLICT (site_id, period) DO UPDATE SET received_bytes = received_bytes + excluded.received_bytes;
END;

CREATE TRIGGER IF NOT EXISTS mailbox_fetched AFTER UPDATE OF fetched_at ON mailbox
WHEN OLD.fetched_at IS NULL AND NEW.fetched_at IS NOT NULL
BEGIN
    UPDATE mailbox_usage SET
        waiting_bytes = waiting_bytes - (SELECT size FROM messages WHERE queue_id = NEW.queue_id),
        waiting_messages = waiting_messages - 1
    WHERE receiver_id = NEW.site_id
      AND sender_id = (SELECT coalesce(sender_site, 0) FROM messages WHERE queue_id = NEW.queue_id);
END;

-- One trigger for a removed entry: usage first, then the blob's reference (which may free the
-- messages row the usage update reads).
CREATE TRIGGER IF NOT EXISTS mailbox_removed AFTER DELETE ON mailbox
BEGIN
    UPDATE mailbox_usage SET
        held_bytes = held_bytes - (SELECT size FROM messages WHERE queue_id = OLD.queue_id),
        held_messages = held_messages - 1,
        waiting_bytes = waiting_bytes - CASE WHEN OLD.fetched_at IS NULL
            THEN (SELECT size FROM messages WHERE queue_id = OLD.queue_id) ELSE 0 END,
        waiting_messages = waiting_messages - (OLD.fetched_at IS NULL)
    WHERE receiver_id = OLD.site_id
      AND sender_id = (SELECT coalesce(sender_site, 0) FROM messages WHERE queue_id = OLD.queue_id);
    UPDATE messages SET refs = refs - 1 WHERE queue_id = OLD.queue_id;
END;
DROP TRIGGER IF EXISTS mailbox_unref;   -- replaced by mailbox_removed

CREATE TRIGGER IF NOT EXISTS message_submitted AFTER INSERT ON messages
WHEN NEW.sender_site IS NOT NULL
BEGIN
    INSERT INTO site_volume (site_id, period, submitted_bytes)
        SELECT NEW.sender_site, strftime('%Y-%m-%d', NEW.received_at, 'unixepoch'), NEW.size
        UNION ALL SELECT NEW.sender_site, strftime('%Y-%m', NEW.received_at, 'unixepoch'), NEW.size WHERE true
        ON CONFLICT (site_id, period) DO UPDATE SET submitted_bytes = submitted_bytes + excluded.submitted_bytes;
END;

-- ---- Participant directory and encryption policy (directory/) -------------------------------
-- OpenPGP public keys of the sites: one current key (retired_at NULL) and the keys it replaced,
-- which stay valid for encryption during a grace period after retired_at.
-- encryption_key_ids: space-separated 16-hex-digit IDs of the key's encryption-capable
-- (sub)keys, the IDs that PKESK packets of mails to the site name.
CREATE TABLE IF NOT EXISTS site_keys (
    id                 INTEGER PRIMARY KEY,
    site_id            INTEGER NOT NULL REFERENCES sites (id) ON DELETE CASCADE,
    fingerprint        TEXT NOT NULL,
    encryption_key_ids TEXT NOT NULL,
    armored            TEXT NOT NULL,
    imported_at        REAL NOT NULL,
    retired_at         REAL
);
CREATE INDEX IF NOT EXISTS site_keys_site ON site_keys (site_id, retired_at);

-- Per-site override of the hub's encryption policy ('on' or 'off'; no row = the hub's default).
CREATE TABLE IF NOT EXISTS site_policy (
    site_id    INTEGER PRIMARY KEY REFERENCES sites (id) ON DELETE CASCADE,
    encryption TEXT NOT NULL CHECK (encryption IN ('on', 'off'))
);

-- directory_version counts changes of what the participant list shows (sites, addresses, keys);
-- the server adds directory_sent_version on its first start (so that the sites present then get
-- no update) and then moves it to the version whose update every site was sent, in the same
-- transaction as the update mail. keys_version tells the server's key cache to reload (keys and
-- policy overrides).
INSERT OR IGNORE INTO meta (key, value) VALUES ('directory_version', 0), ('keys_version', 0);
CREATE TRIGGER IF NOT EXISTS directory_sites_ins AFTER INSERT ON sites
BEGIN UPDATE meta SET value = value + 1 WHERE key IN ('directory_version', 'keys_version'); END;
CREATE TRIGGER IF NOT EXISTS directory_sites_del AFTER DELETE ON sites
BEGIN UPDATE meta SET value = value + 1 WHERE key IN ('directory_version', 'keys_version'); END;
CREATE TRIGGER IF NOT EXISTS directory_addresses_ins AFTER INSERT ON addresses
BEGIN UPDATE meta SET value = value + 1 WHERE key = 'directory_version'; END;
CREATE TRIGGER IF NOT EXISTS directory_addresses_del AFTER DELETE ON addresses
BEGIN UPDATE meta SET value = value + 1 WHERE key = 'directory_version'; END;
CREATE TRIGGER IF NOT EXISTS directory_keys_ins AFTER INSERT ON site_keys
BEGIN UPDATE meta SET value = value + 1 WHERE key IN ('directory_version', 'keys_version'); END;
CREATE TRIGGER IF NOT EXISTS directory_keys_upd AFTER UPDATE ON site_keys
BEGIN UPDATE meta SET value = value + 1 WHERE key IN ('directory_version', 'keys_version'); END;
CREATE TRIGGER IF NOT EXISTS directory_policy_ins AFTER INSERT ON site_policy
BEGIN UPDATE meta SET value = value + 1 WHERE key = 'keys_version'; END;
CREATE TRIGGER IF NOT EXISTS directory_policy_upd AFTER UPDATE ON site_policy
BEGIN UPDATE meta SET value = value + 1 WHERE key = 'keys_version'; END;
CREATE TRIGGER IF NOT EXISTS directory_policy_del AFTER DELETE ON site_policy
BEGIN UPDATE meta SET value = value + 1 WHERE key = 'keys_version'; END;

-- Tracking (issue 7): what happened to each mail, kept after the mail itself is gone, pruned after
-- events.retention_days. Written in the same transactions as the state they describe (refusals in
-- batches, best effort). Columns per kind:
--   accepted    site = sending site, sender = envelope sender, peer = client IP, size, sha256 in
--               detail, message_id, set_id/set_part/set_total (one row per mail)
--   delivered   site = receiving site, peer_site = sending site, rcpt, size (one row per mailbox entry)
--   downloaded  site = mailbox site, peer = client IP, size, protocol in detail (per mail per session)
--   deleted     site = mailbox site, peer = client IP, how in detail (pop3, site removed)
--   refused / deferred   an SMTP 5xx / 4xx refusal of a sender, a recipient or the data: site =
--               sending site, peer_site = the recipient's site, sender, rcpt, peer, the reply line
--               in detail; queue_id, message_id, set_id and size when the data had been received
-- Sites are named, not numbered, so that the record outlives a removed site.
CREATE TABLE IF NOT EXISTS events (
    id         INTEGER PRIMARY KEY,
    at         REAL NOT NULL,
    kind       TEXT NOT NULL,
    queue_id   TEXT,
    site       TEXT,
    peer_site  TEXT,
    sender     TEXT COLLATE NOCASE,
    rcpt       TEXT COLLATE NOCASE,
    peer       TEXT,
    size       INTEGER,
    message_id TEXT,
    set_id     TEXT,
    set_part   INTEGER,
    set_total  INTEGER,
    detail     TEXT
);
CREATE INDEX IF NOT EXISTS events_at ON events (at);
CREATE INDEX IF NOT EXISTS events_queue_id ON events (queue_id) WHERE queue_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_message_id ON events (message_id) WHERE message_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_set_id ON events (set_id) WHERE set_id IS NOT NULL;
-- (address, kind): an address's latest mails, or its refusals, without reading its other rows
CREATE INDEX IF NOT EXISTS events_sender ON events (sender, kind) WHERE sender IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_rcpt ON events (rcpt, kind) WHERE rcpt IS NOT NULL;

-- IMAP: the UID the next mail to each site's mailbox gets at the earliest (UIDNEXT must never go
-- down, also when the newest mails are expunged). Kept by a trigger on every delivery.
CREATE TABLE IF NOT EXISTS imap_uid_next (
    site_id  INTEGER PRIMARY KEY REFERENCES sites (id) ON DELETE CASCADE,
    uid_next INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS imap_uid_next_delivery AFTER INSERT ON mailbox
BEGIN
    INSERT INTO imap_uid_next (site_id, uid_next) VALUES (NEW.site_id, NEW.uid + 1)
    ON CONFLICT (site_id) DO UPDATE SET uid_next = max(uid_next, excluded.uid_next);
END;

-- ---- Outbound relay (issue 8) ------------------------------------------------------------------
-- One row per remote recipient of a stored message, waiting for delivery to a next hop. A row is
-- removed only after the next hop's 2xx for that recipient (or after its bounce is stored), so a
-- crash can repeat a delivery but never lose one. Each row holds a reference on its message.
CREATE TABLE IF NOT EXISTS outbound (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    queue_id        TEXT NOT NULL REFERENCES messages (queue_id),
    rcpt            TEXT NOT NULL,
    queued_at       REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_attempt_at REAL,
    last_error      TEXT,
    warned          INTEGER NOT NULL DEFAULT 0,  -- a delay warning was sent
    claimed_by      TEXT,                        -- the node delivering it (several nodes: issue 27)
    claimed_until   REAL                         -- until when (Unix time; renewed while it delivers)
);
CREATE INDEX IF NOT EXISTS outbound_due ON outbound (next_attempt_at);
CREATE INDEX IF NOT EXISTS outbound_queue_id ON outbound (queue_id);

-- Bumped by `mailhub queue retry`: the server then also forgets its back-off of unreachable next hops.
INSERT OR IGNORE INTO meta (key, value) VALUES ('outbound_retry', 0);

CREATE TRIGGER IF NOT EXISTS outbound_unref AFTER DELETE ON outbound
BEGIN
    UPDATE messages SET refs = refs - 1 WHERE queue_id = OLD.queue_id;
END;

CREATE TRIGGER IF NOT EXISTS ledger_mailbox_removed AFTER DELETE ON mailbox
WHEN (SELECT value FROM meta WHERE key = 'ledger_quiet') = 0
BEGIN
    INSERT INTO ledger_pending (kind, queue_id, site_id, site_name, uid, at)
        VALUES ('d', OLD.queue_id, OLD.site_id, (SELECT name FROM sites WHERE id = OLD.site_id), OLD.uid,
                (julianday('now') - 2440587.5) * 86400.0);
END;
CREATE TRIGGER IF NOT EXISTS ledger_outbound_done AFTER DELETE ON outbound
WHEN (SELECT value FROM meta WHERE key = 'ledger_quiet') = 0
BEGIN
    INSERT INTO ledger_pending (kind, queue_id, rcpt, at)
        VALUES ('o', OLD.queue_id, OLD.rcpt, (julianday('now') - 2440587.5) * 86400.0);
END;

-- Mails found damaged (docs/integrity.md): their bytes on disk are not the ones acknowledged (cut
-- short, missing, another SHA-256). Found while serving (size), by the background scrub or by
-- `mailhub storage verify` (SHA-256). POP3 and IMAP refuse to serve them; a gateway can still delete
-- them. A copy of what was on disk is in the quarantine (`quarantine`: its entry). Rows stay as the
-- history after the mail is freed.
CREATE TABLE IF NOT EXISTS damaged (
    queue_id   TEXT PRIMARY KEY,
    reason     TEXT NOT NULL,
    found_by   TEXT NOT NULL,      -- serving, scrub, verify
    found_at   REAL NOT NULL,
    quarantine TEXT                -- the quarantine entry's id, if a copy was made
) WITHOUT ROWID;

-- ---- Audit trail (issue 25, storage/audit.py) ---------------------------------------------------
-- Append-only: one row per mailbox event (accepted, fetched, deleted_by_site, expired,
-- deleted_by_operator, exported, returned) with the site by name (outlives the site and the mail),
-- queue ID, Message-ID, study (SETID), size, SHA-256 and the actor; never content. UPDATE is
-- refused; DELETE only of rows older than meta audit_prune_before, which storage.audit.prune sets
-- for its own transaction (retention: events.audit_retention_days).
CREATE TABLE IF NOT EXISTS audit (
    id         INTEGER PRIMARY KEY,
    at         REAL NOT NULL,
    event      TEXT NOT NULL,
    site       TEXT,
    queue_id   TEXT,
    message_id TEXT,
    study_id   TEXT,
    size       INTEGER,
    sha256     TEXT,
    actor      TEXT,
    detail     TEXT
);
CREATE INDEX IF NOT EXISTS audit_at ON audit (at);
CREATE INDEX IF NOT EXISTS audit_site ON audit (site, at);
CREATE INDEX IF NOT EXISTS audit_study ON audit (study_id) WHERE study_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS audit_queue_id ON audit (queue_id) WHERE queue_id IS NOT NULL;
INSERT OR IGNORE INTO meta (key, value) VALUES ('audit_prune_before', 0);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
WHEN OLD.at >= (SELECT value FROM meta WHERE key = 'audit_prune_before')
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only (records go only when past their retention)'); END;

-- ---- Mailbox lifecycle (issue 25): expiry, quota warnings, notices -------------------------------
-- Per-site retention override in days (0: keep until fetched); no row = lifecycle.retention_days.
CREATE TABLE IF NOT EXISTS site_retention (
    site_id INTEGER PRIMARY KEY REFERENCES sites (id) ON DELETE CASCADE,
    days    REAL NOT NULL CHECK (days >= 0)
);

-- Quota warning levels (percent) a site's mailbox is at or above and was told of: a level notifies
-- once when it is crossed and again only after the mailbox fell below it (the row goes then).
CREATE TABLE IF NOT EXISTS quota_warnings (
    site_id    INTEGER NOT NULL REFERENCES sites (id) ON DELETE CASCADE,
    level      INTEGER NOT NULL,
    crossed_at REAL NOT NULL,
    PRIMARY KEY (site_id, level)
) WITHOUT ROWID;

-- Notices the hub owes (expiry warnings, expiry DSNs, quota warnings), written in the transaction
-- that decided them; the hub sends them in id order, each committed together with meta
-- lifecycle_notice_sent = its id (so a restart neither loses nor repeats one). facts: JSON of IDs,
-- sizes and dates only, never content. rcpt: the envelope recipient ('' for the operator).
CREATE TABLE IF NOT EXISTS lifecycle_notices (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    kind       TEXT NOT NULL,      -- expiry_warning, expiry_dsn, quota_warning, quota_operator
    created_at REAL NOT NULL,
    rcpt       TEXT NOT NULL,
    facts      TEXT NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('lifecycle_notice_sent', 0);
-- ---- Site liveness (issue 26) --------------------------------------------------------------------
-- A site's contact address for liveness notices (`site add/modify --contact`); no row: none.
CREATE TABLE IF NOT EXISTS site_contact (
    site_id INTEGER PRIMARY KEY REFERENCES sites (id) ON DELETE CASCADE,
    address TEXT NOT NULL
);
-- Sites the hub found stale (mail waiting, no fetch for liveness.stale_after): since when, and
-- whether its notices went out. Kept across restarts so a notice is sent once per episode; the row
-- goes when the site recovers (its recovery notice sent).
CREATE TABLE IF NOT EXISTS site_stale (
    site_id     INTEGER PRIMARY KEY REFERENCES sites (id) ON DELETE CASCADE,
    stale_since REAL NOT NULL,
    noticed_at  REAL NOT NULL
);
