-- Schema version 2: the outbound queue's claims, for several hub nodes on one index (issue 27).
-- A node takes due rows with SELECT ... FOR UPDATE SKIP LOCKED and marks them claimed_by its name
-- until claimed_until (Unix time; a lease it renews while the delivery lasts); another node takes a
-- row only once its lease ran out (the node died mid-delivery: at-least-once towards the next hop).
-- storage/schema.sql has the same columns (SQLite: storage/db.py ADDED_COLUMNS).
ALTER TABLE outbound ADD COLUMN claimed_by text;
ALTER TABLE outbound ADD COLUMN claimed_until double precision;
