# `storage rebuild-index`'s reconciliation (storage.rebuild._reconcile) on both engines through the
# `index` fixture (issue 27, docs/postgresql.md): a hub delivers mail (packed and a file of its own)
# and a site deletes one, the hub stops; the blobs and the ledger are then reconciled into an empty
# index, as after a lost index: the sites are made again (RETURNING id), their addresses added once
# (ON CONFLICT DO NOTHING), every mailbox entry but the deleted one put back, and the UID mark raised
# past the deleted mail's UID (sqlite_sequence / the identity's sequence). Run again, it changes
# nothing. Opening the index, saving a copy and salvaging it stay SQLite's (docs/postgresql.md).
import poplib
import smtplib

from storage import db, rebuild, sql

from conftest import ALPHA_BETA, PASSWORD, make_message

SMALL, LARGE = 6_000, 2_600_000  # packed, and a file of its own (over storage.spool.SMALL_MESSAGE)


def send(hub, rcpts, size, n):
    client = smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=60)
    try:
        client.login("alpha", PASSWORD)
        client.sendmail("alpha@hub.test", rcpts, make_message(size, subject=f"mail {n}"))
    finally:
        client.close()


def entries(conn) -> list[tuple]:
    return sorted(
        conn.execute(
            "SELECT s.name, b.queue_id, b.rcpt, b.delivered_at FROM mailbox b JOIN sites s ON s.id = b.site_id"
        ).fetchall()
    )


def test_a_lost_index_is_reconciled_on_both_engines(index, make_hub):
    hub = make_hub(sites=ALPHA_BETA).start()
    send(hub, ["beta@hub.test", "alpha@hub.test"], SMALL, 1)
    send(hub, ["beta@hub.test"], LARGE, 2)
    send(hub, ["beta@hub.test"], SMALL, 3)
    pop = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=60)
    pop.user("beta")
    pop.pass_(PASSWORD)
    count = len(pop.list()[1])
    pop.dele(count)  # the latest mail: the highest UID
    pop.quit()
    assert hub.stop() == 0
    kept = entries(hub.db())
    ((top_uid,),) = hub.query("SELECT seq FROM sqlite_sequence WHERE name = 'mailbox'")
    assert len(kept) == 3 and top_uid == 4

    report = rebuild.RebuildReport()
    rebuild._reconcile(index, hub.data_dir, report)
    assert sorted(report.sites_made) == ["alpha", "beta"]
    assert (report.restored, report.restored_entries, report.all_removed, report.uncommitted) == (2, 3, 1, 0)
    assert entries(index) == kept
    addresses = index.execute("SELECT address FROM addresses ORDER BY address").fetchall()
    assert addresses == [("alpha@hub.test",), ("beta@hub.test",)]
    assert index.execute(sql.id_high_water(index, "mailbox", "uid")).fetchone() == (top_uid,)
    held = index.execute("SELECT sum(held_messages) FROM mailbox_usage").fetchone()[0]
    assert held == 3
    restored = index.execute("SELECT count(*) FROM audit WHERE detail = 'restored by rebuild-index'").fetchone()
    assert restored == (3,)

    again = rebuild.RebuildReport()
    rebuild._reconcile(index, hub.data_dir, again)
    assert (again.restored, again.sites_made, again.removed_entries) == (0, [], 0)
    assert entries(index) == kept
    with db.transaction(index):  # the next UID comes after the deleted mail's
        (uid,) = index.execute(
            "INSERT INTO mailbox (site_id, queue_id, rcpt, delivered_at)"
            " SELECT site_id, queue_id, 'x@hub.test', 1.0 FROM mailbox LIMIT 1 RETURNING uid"
        ).fetchone()
    assert uid == top_uid + 1
