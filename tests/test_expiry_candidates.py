# storage.lifecycle.waiting_entries with a time reads only the entries whose study (or lone mail)
# is due to expire or to be warned of, each study whole: the expiry plan made from them is the one
# made from every waiting entry, while a backlog that is not due stays in the index (it was read
# whole into memory and planned over on the event loop every lifecycle.check_interval). Real SQLite.
import random

from relay.expiry import DAY, plan
from storage import db, lifecycle

T0 = 1_000_000_000.0


def add(conn, uid, site_id, delivered_at, set_id=None, sender="alpha@hub.test", fetched=False):
    qid = f"Q{uid}"
    conn.execute(
        "INSERT INTO messages (queue_id, blob, size, sha256, dot_lines, received_at, mail_from, set_id, refs)"
        " VALUES (?, 'b', 10, 'x', 0, ?, ?, ?, 1)",
        (qid, delivered_at, sender, set_id),
    )
    conn.execute(
        "INSERT INTO mailbox (uid, site_id, queue_id, rcpt, delivered_at, fetched_at) VALUES (?, ?, ?, 'r', ?, ?)",
        (uid, site_id, qid, delivered_at, delivered_at if fetched else None),
    )


def shape(p):
    return (
        sorted((g.site_id, g.set_id or "", g.sender, sorted(g.uids)) for g in p.expire),
        sorted((g.site_id, sorted(g.uids), sorted(g.expires_at.items())) for g in p.warn),
    )


def test_only_due_studies_are_read_and_the_plan_is_the_same(tmp_path):
    conn = db.connect(tmp_path)
    for site_id in (1, 2):
        conn.execute(
            "INSERT INTO sites (id, name, password_hash, created_at) VALUES (?, ?, 'x', 0)", (site_id, f"s{site_id}")
        )
    conn.execute("INSERT INTO site_retention (site_id, days) VALUES (2, 3)")
    rng = random.Random(7)
    for uid in range(1, 400):
        study = rng.choice([None, None, f"S{rng.randrange(40)}"])
        sender = rng.choice(
            ["alpha@hub.test", "Alpha@HUB.test", "gamma@hub.test", "", "\u00c4@hub.test", "\u00e4@hub.test"]
        )
        add(conn, uid, rng.choice((1, 2)), T0 + rng.uniform(0, 30) * DAY, study, sender, fetched=rng.random() < 0.1)
    # a study whose first part is long past the retention but whose newest part is not: not due
    add(conn, 1000, 1, T0 - 100 * DAY, "OLD-NEW")
    add(conn, 1001, 1, T0 + 29 * DAY, "OLD-NEW")
    for days_in in (5, 14, 17, 25, 40):
        now, warn = T0 + days_in * DAY, 2 * DAY
        due = lifecycle.waiting_entries(conn, 14.0, now, warn)
        every = lifecycle.waiting_entries(conn, 14.0)
        assert shape(plan(due, now, warn)) == shape(plan(every, now, warn)), days_in
        assert len(due) < len(every) or days_in == 40
        if days_in < 40:
            assert {1000, 1001}.isdisjoint(e.uid for e in due)  # a study goes whole, by its newest part
    conn.close()
