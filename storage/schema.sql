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

-- One row per stored blob (single instance however many recipients); refs counts the
-- mailbox entries (and later queue entries) that point at it.
CREATE TABLE IF NOT EXISTS messages (
    queue_id     TEXT PRIMARY KEY,
    blob         TEXT NOT NULL,
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
    refs         INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS messages_message_id ON messages (message_id);
CREATE INDEX IF NOT EXISTS messages_set_id ON messages (set_id);

-- Mailbox entries: uid is strictly ascending across the hub, hence within each mailbox.
CREATE TABLE IF NOT EXISTS mailbox (
    uid          INTEGER PRIMARY KEY AUTOINCREMENT,
    site_id      INTEGER NOT NULL REFERENCES sites (id) ON DELETE CASCADE,
    queue_id     TEXT NOT NULL REFERENCES messages (queue_id),
    rcpt         TEXT NOT NULL,
    delivered_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS mailbox_site ON mailbox (site_id, uid);
CREATE INDEX IF NOT EXISTS mailbox_queue_id ON mailbox (queue_id);

-- Blobs whose last reference is gone; their files are removed after the commit, and any
-- left over by a crash are removed on the next start.
CREATE TABLE IF NOT EXISTS blob_trash (
    blob TEXT PRIMARY KEY
) WITHOUT ROWID;

-- What each site has downloaded over POP3 (IMAP later), as running totals: one row per site,
-- updated once per session at its end. A drain rate is the difference of two readings of these
-- counters divided by the time between them (or bytes / send_seconds for the transfer speed
-- alone); last_poll_at tells whether the site still polls at all.
CREATE TABLE IF NOT EXISTS site_downloads (
    site_id       INTEGER PRIMARY KEY REFERENCES sites (id) ON DELETE CASCADE,
    sessions      INTEGER NOT NULL,
    messages      INTEGER NOT NULL,   -- whole messages sent (RETR)
    bytes         INTEGER NOT NULL,   -- message octets sent (RETR and TOP), before dot-stuffing
    send_seconds  REAL NOT NULL,      -- time spent sending those octets
    first_poll_at REAL NOT NULL,      -- login time of the first session
    last_poll_at  REAL NOT NULL       -- login time of the latest session
);

CREATE TRIGGER IF NOT EXISTS mailbox_unref AFTER DELETE ON mailbox
BEGIN
    UPDATE messages SET refs = refs - 1 WHERE queue_id = OLD.queue_id;
END;

CREATE TRIGGER IF NOT EXISTS messages_free AFTER UPDATE OF refs ON messages
WHEN NEW.refs <= 0
BEGIN
    INSERT OR IGNORE INTO blob_trash (blob) VALUES (NEW.blob);
    DELETE FROM messages WHERE queue_id = NEW.queue_id;
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
