# Receipts (MDNs) are linked only to a mail that went where the receipt comes from
# (storage.lifecycle.record_receipt): a site cannot acknowledge a mail delivered to another site,
# and a receipt from another network (no site) only a mail relayed out. Real SQLite index.
from storage import db, events, lifecycle

MID = "<study-1@alpha.test>"


def tracked(conn, *rows: events.Event) -> None:
    conn.executemany(events.INSERT, [events.row(e) for e in rows])


def receipts(conn) -> list[tuple]:
    return conn.execute("SELECT queue_id, site FROM events WHERE kind = 'receipt' ORDER BY id").fetchall()


def test_a_receipt_links_only_to_a_mail_delivered_to_its_site(tmp_path):
    conn = db.connect(tmp_path)
    tracked(
        conn,
        events.Event(1.0, events.ACCEPTED, "Q1", "alpha", message_id=MID, set_id="1.2.3", set_part=1, set_total=1),
        events.Event(1.0, events.DELIVERED, "Q1", "beta", "alpha", rcpt="beta@hub.test"),
    )
    # gamma never got Q1: its "receipt" for it is recorded, linked to nothing
    assert lifecycle.record_receipt(conn, 2.0, "M1", "gamma", "gamma@hub.test", MID, "displayed") is None
    # beta did: linked
    found = lifecycle.record_receipt(conn, 3.0, "M2", "beta", "beta@hub.test", MID, "displayed")
    assert found == {"queue_id": "Q1", "set_id": "1.2.3", "set_part": 1}
    # from another network (no site): only a mail relayed out; Q1 was not
    assert lifecycle.record_receipt(conn, 4.0, "M3", None, "x@other.test", MID, "displayed") is None
    tracked(conn, events.Event(5.0, events.RELAYED, "Q1", rcpt="x@other.test"))
    assert lifecycle.record_receipt(conn, 6.0, "M4", None, "x@other.test", MID, "displayed")["queue_id"] == "Q1"
    assert receipts(conn) == [(None, "gamma"), ("Q1", "beta"), (None, None), ("Q1", None)]
    conn.close()
