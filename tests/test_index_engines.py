# The synchronous storage functions on both engines (issue 27, docs/postgresql.md): every test here
# runs twice through the `index` fixture (conftest.py), once on SQLite (storage.db.connect) and once
# on PostgreSQL (schema v1 from the migrations, storage.postgres.connection.PgConnection), with the
# same function calls and the same expected results: sites, usage, liveness, the directory's rows,
# events, reports, the admin's mailbox reads and the lifecycle. Mail is put into the index with the
# rows a group commit writes (messages, mailbox, events); the counting triggers do the rest on each
# engine. The outbound queue and the audit trail are tested the same way in test_relay_units.py and
# test_audit.py. Also: the wrapper's placeholders and error mapping.
import sqlite3

import psycopg
import pytest

from storage import db, directory_index, events, lifecycle, liveness, mailbox_admin, reports, sites, usage
from storage.errors import StorageFull
from storage.events import Event
from storage.postgres.connection import mapped_error, placeholders
from storage.sites import SiteError

from conftest import PASSWORD

pytestmark = pytest.mark.usefixtures("cheaper_site_passwords")  # sites for their data

DAY = 86400.0
T0 = 1_800_000_000.0  # 2027-01-15 08:00 UTC


def add_sites(conn, *names: str) -> list[int]:
    return [sites.add_site(conn, n, [f"{n}@hub.test", f"{n}2@hub.test"], PASSWORD, ["hub.test"]).id for n in names]


def store(conn, qid, size, at, sender_site, to, set_id=None, part=None, total=None, mail_from="a@hub.test"):
    """A stored mail as a group commit leaves it: its messages row, one mailbox entry per receiving
    site (uids returned), the accepted and delivered events."""
    with db.transaction(conn):
        conn.execute(
            "INSERT INTO messages (queue_id, blob, size, sha256, dot_lines, received_at, mail_from, sender_site,"
            " message_id, set_id, set_part, set_total, refs, structure)"
            " VALUES (?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (qid, f"b/{qid}", size, "ab" * 32, at, mail_from, sender_site, f"<{qid}@x>", set_id, part, total,
             len(to), '{"type": "text/plain"}'),
        )  # fmt: skip
        uids = [
            conn.execute(
                "INSERT INTO mailbox (site_id, queue_id, rcpt, delivered_at) VALUES (?, ?, ?, ?) RETURNING uid",
                (site_id, qid, f"s{site_id}@hub.test", at),
            ).fetchone()[0]
            for site_id in to
        ]
        names = dict(conn.execute("SELECT id, name FROM sites").fetchall())
        rows = [
            Event(
                at,
                events.ACCEPTED,
                qid,
                names.get(sender_site),
                sender=mail_from,
                size=size,
                message_id=f"<{qid}@x>",
                set_id=set_id,
                set_part=part,
                set_total=total,
                detail="ab" * 32,
            )
        ]
        rows += [Event(at, events.DELIVERED, qid, names[s], names.get(sender_site), rcpt=f"s{s}@hub.test", size=size)
                 for s in to]  # fmt: skip
        conn.executemany(events.INSERT, [events.row(e) for e in rows])
    return uids


def fetch(conn, uid, at):
    with db.transaction(conn):
        conn.execute("UPDATE mailbox SET fetched_at = ? WHERE uid = ?", (at, uid))


def test_the_engine_behind_each_connection(index):
    from storage import sql

    assert sql.dialect(index) == ("postgresql" if not isinstance(index, sqlite3.Connection) else "sqlite")
    assert not index.in_transaction
    with db.transaction(index):
        assert index.in_transaction
    assert not index.in_transaction


# ---- sites and usage --------------------------------------------------------------------------------


def test_sites_are_added_listed_changed_and_removed_with_their_mail(index):
    version = sites.sites_version(index)
    alpha, beta = add_sites(index, "alpha", "beta")
    assert sites.sites_version(index) == version + 6  # two sites, four addresses
    assert (alpha, beta) == (1, 2)
    site = sites.get_site(index, "beta")
    assert (site.id, site.name, site.addresses) == (beta, "beta", ["beta2@hub.test", "beta@hub.test"])
    with pytest.raises(SiteError, match="exists already"):
        add_sites(index, "beta")
    # addresses compare without case, on both engines
    with pytest.raises(SiteError, match="belongs to site 'alpha'"):
        sites.add_site(index, "gamma", ["ALPHA@hub.test"], PASSWORD, ["hub.test"])
    assert not index.in_transaction  # the refused add rolled back
    assert [s.name for s in sites.list_sites(index)] == ["alpha", "beta"]
    usage.set_limits(index, "beta", {"mailbox_bytes": 10_000_000, "max_drain_time": 3600.5})
    usage.set_limits(index, "beta", {"mailbox_messages": 500, "mailbox_bytes": None})
    assert sites.list_sites(index)[1].limits == {"mailbox_messages": 500, "max_drain_time": 3600.5}
    assert usage.read_limits(index) == {beta: {"mailbox_messages": 500, "max_drain_time": 3600.5}}
    with pytest.raises(SiteError, match="unknown limit"):
        usage.set_limits(index, "beta", {"speed": 1})
    old_hash = site.password_hash
    sites.set_password(index, "beta", "another password")
    assert sites.get_site(index, "beta").password_hash != old_hash
    with pytest.raises(SiteError, match="no site named 'delta'"):
        sites.set_password(index, "delta", "another password")

    store(index, "Q1", 100, T0, alpha, [beta])
    store(index, "Q2", 200, T0, alpha, [beta, alpha])
    assert sites.remove_site(index, "beta", actor="alice") == 2
    with pytest.raises(SiteError, match="no site named 'beta'"):
        sites.get_site(index, "beta")
    # the mail alpha still holds stays, the other is freed with its last entry
    assert index.execute("SELECT queue_id, refs FROM messages ORDER BY 1").fetchall() == [("Q2", 1)]
    assert index.execute("SELECT event, site, queue_id, actor, detail FROM audit ORDER BY id").fetchall() == [
        ("deleted_by_operator", "beta", "Q1", "alice", "site removed"),
        ("deleted_by_operator", "beta", "Q2", "alice", "site removed"),
    ]
    assert index.execute("SELECT count(*) FROM events WHERE kind = 'deleted' AND site = 'beta'").fetchone() == (2,)


def test_usage_figures_from_the_triggers_and_rebuilt_agree(index):
    alpha, beta, gamma = add_sites(index, "alpha", "beta", "gamma")
    (b1,) = store(index, "Q1", 1000, T0, alpha, [beta])
    store(index, "Q2", 500, T0 + DAY, alpha, [beta, gamma])
    store(index, "Q3", 70, T0 + DAY, None, [beta])  # from another network
    fetch(index, b1, T0 + 10)
    expected = [
        (beta, 0, 70, 1, 70, 1),
        (beta, alpha, 1500, 2, 500, 1),
        (gamma, alpha, 500, 1, 500, 1),
    ]
    assert sorted(usage.read_snapshot(index, T0 + DAY).usage) == expected
    usage.rebuild_usage(index)
    assert sorted(usage.read_snapshot(index, T0 + DAY).usage) == expected
    snapshot = usage.read_snapshot(index, T0 + DAY)
    day0, month = usage.periods(T0)
    day1, _ = usage.periods(T0 + DAY)
    assert snapshot.volumes[(alpha, day0)] == (1000, 0)
    assert snapshot.volumes[(alpha, month)] == (1500, 0)
    assert snapshot.volumes[(beta, day1)] == (0, 570)
    assert usage.site_usage(index, beta, T0 + DAY) == {
        "mailbox_bytes": 1570,
        "mailbox_messages": 3,
        "waiting_bytes": 570,
        "waiting_messages": 2,
        "submitted_per_day": 0,
        "submitted_per_month": 0,
        "received_per_day": 570,
        "received_per_month": 1570,
    }
    assert usage.download_totals(index, beta) == (0, 0, 0, 0.0, None, None)
    # the throttle's state: rows of sites that exist, replaced in place
    with db.transaction(index):
        usage.write_throttle_states(index, {beta: {"rate": 1.5}, 99: {"rate": 2}}, T0)
    with db.transaction(index):
        usage.write_throttle_states(index, {beta: {"rate": 2.5}}, T0 + 1)
    assert usage.read_throttle_state(index, beta) == (T0 + 1, {"rate": 2.5})
    assert usage.read_throttle_state(index, 99) is None


# ---- liveness, reports, the admin's reads -----------------------------------------------------


def test_liveness_backlogs_and_contacts(index):
    alpha, beta, gamma = add_sites(index, "alpha", "beta", "gamma")
    b1, b2 = store(index, "Q1", 1000, T0, alpha, [beta, gamma])
    (b3,) = store(index, "Q2", 300, T0 + 5, alpha, [beta])
    fetch(index, b1, T0 + 9)
    with db.transaction(index):
        liveness.set_contact(index, beta, " staff@beta.example.org ")
        liveness.mark_stale(index, gamma, T0, T0 + 1)
        liveness.mark_stale(index, gamma, T0 + 50, T0 + 51)  # already stale: kept as it was
    with pytest.raises(SiteError, match="invalid contact"):
        liveness.set_contact(index, beta, "nobody")
    assert liveness.contact(index, beta) == "staff@beta.example.org"
    found = {s.name: s for s in liveness.read(index)}
    assert list(found) == ["alpha", "beta", "gamma"]
    b = found["beta"]
    assert (b.held_messages, b.held_bytes, b.waiting_messages, b.waiting_bytes) == (2, 1300, 1, 300)
    assert (b.oldest_waiting_at, b.contact, b.stale_since) == (T0 + 5, "staff@beta.example.org", None)
    assert found["gamma"].stale_since == T0
    assert found["alpha"].held_messages == 0 and found["alpha"].oldest_waiting_at is None
    assert liveness.read(index, gamma)[0].waiting_bytes == 1000
    assert liveness.backlogs(index, 10) == [("gamma", 1, 1000, T0), ("beta", 1, 300, T0 + 5)]
    assert reports.backlogs(index, 1, beta) == [("beta", 1, 300, T0 + 5)]
    with db.transaction(index):
        liveness.mark_recovered(index, gamma)
        liveness.set_contact(index, beta, None)
    assert liveness.read(index, gamma)[0].stale_since is None
    assert liveness.contact(index, beta) is None
    assert (b2, b3) == (2, 3)


def test_reports_over_the_events(index):
    alpha, beta = add_sites(index, "alpha", "beta")
    store(index, "Q1", 1000, T0, alpha, [beta], set_id="1.2.3", part=1, total=2)
    store(index, "Q2", 400, T0 + 10, alpha, [beta], set_id="1.2.3", part=2, total=2)
    refusals = [
        events.refusal(T0 + 20, "452 4.2.2 full", site="alpha", sender="a@hub.test", to_site="beta"),
        events.refusal(T0 + 30, "452 4.2.2 full", site="alpha", sender="a@hub.test", to_site="beta"),
        events.refusal(T0 + 40, "550 5.7.1 no", site=None, sender="x@far.test"),
        Event(T0 + 50, events.DOWNLOADED, "Q1", "beta", size=1000),
    ]
    with db.transaction(index):
        index.executemany(events.INSERT, [events.row(e) for e in refusals])
    assert sorted(reports.volumes(index, T0, T0 + 60)) == [
        ("accepted", "alpha", "-", 2, 1400),
        ("deferred", "alpha", "beta", 2, 0),
        ("delivered", "beta", "alpha", 2, 1400),
        ("downloaded", "beta", "-", 1, 1000),
        ("refused", "-", "-", 1, 0),
    ]
    assert reports.refusal_counts(index, T0, T0 + 60) == [
        ("deferred", "alpha", "beta", "452 4.2.2 full", 2, T0 + 30),
        ("refused", "-", "-", "550 5.7.1 no", 1, T0 + 40),
    ]
    assert reports.refusals_since(index, "peer_site", "beta", T0) == [("deferred", "452 4.2.2 full", 2, T0 + 30)]
    assert reports.mailbox_totals(index, beta) == (2, 1400)
    assert reports.downloads_since(index, "beta", T0) == (1, 1000)
    assert reports.downloads_since(index, "beta", T0 + 51) == (0, 0)
    assert reports.address_known(index, "ALPHA@hub.test")  # a site's address, any case
    assert reports.address_known(index, "x@far.test")
    assert not reports.address_known(index, "y@far.test")
    assert reports.queue_ids_by_message_id(index, ("<Q2@x>", "<none@x>")) == ["Q2"]
    assert sorted(reports.queue_ids_by_set(index, "1.2.3")) == ["Q1", "Q2"]
    assert reports.latest_mails_of(index, "rcpt", f"s{beta}@hub.test", "delivered", 5) == [
        ("Q2", T0 + 10),
        ("Q1", T0),
    ]
    assert [e.queue_id for e in reports.latest_events_of(index, "sender", "a@hub.test", "accepted", 1)] == ["Q2"]
    trail = list(reports.events_of_mails(index, ["Q1"]))
    assert [(e.kind, e.site, e.size) for e in trail] == [
        ("accepted", "alpha", 1000),
        ("delivered", "beta", 1000),
        ("downloaded", "beta", 1000),
    ]
    with pytest.raises(ValueError, match="not a party column"):
        reports.refusals_since(index, "detail; DROP TABLE events", "x", 0)
    # pruning, batch by batch
    assert events.prune(index, T0 + 25) == 5
    assert index.execute("SELECT count(*) FROM events").fetchone() == (3,)
    assert not index.in_transaction


def test_the_admins_mailbox_reads(index):
    alpha, beta = add_sites(index, "alpha", "beta")
    b1, b2 = store(index, "Q1", 1000, T0, alpha, [beta, alpha], set_id="1.2.3", part=1, total=1)
    (b3,) = store(index, "Q2", 50, T0 + 10, None, [beta], mail_from="Far@Other.Test")
    fetch(index, b1, T0 + 20)
    entries = mailbox_admin.site_entries(index, beta)
    assert [(e.uid, e.queue_id, e.size, e.fetched_at, e.dot_lines) for e in entries] == [
        (b1, "Q1", 1000, T0 + 20, False),
        (b3, "Q2", 50, None, False),
    ]
    assert entries[0].as_dict()["fetched"] and entries[0].sha256 == "ab" * 32
    assert [e.uid for e in mailbox_admin.site_entries(index, beta, sender="far@other.test")] == [b3]
    assert [e.uid for e in mailbox_admin.site_entries(index, beta, fetched=False)] == [b3]
    assert [e.uid for e in mailbox_admin.site_entries(index, beta, larger_than=100, study="1.2.3")] == [b1]
    assert [e.uid for e in mailbox_admin.site_entries(index, beta, arrived_before=T0 + 5)] == [b1]
    assert [e.uid for e in mailbox_admin.site_entries(index, beta, queue_ids=["Q2", "Q9"], limit=1)] == [b3]
    assert [(e.site, e.uid) for e in mailbox_admin.search(index, study="1.2.3")] == [("beta", b1), ("alpha", b2)]
    assert [e.uid for e in mailbox_admin.search(index, message_id="<Q2@x>")] == [b3]
    assert mailbox_admin.structure_json(index, "Q1") == '{"type": "text/plain"}'
    assert mailbox_admin.structure_json(index, "Q9") is None
    assert mailbox_admin.site_id_of(index, "beta") == beta
    assert mailbox_admin.site_of_address(index, "Beta2@HUB.test") == (beta, "beta")
    assert mailbox_admin.site_of_address(index, "nobody@hub.test") is None


# ---- the directory's rows ----------------------------------------------------------------------


def test_keys_policies_versions_and_marks(index):
    alpha, beta = add_sites(index, "alpha", "beta")
    keys_version = directory_index.keys_version(index)
    directory_version = directory_index.directory_version(index)
    assert directory_index.replace_site_key(index, "alpha", "FP1", "K1", "armored 1", T0)
    assert not directory_index.replace_site_key(index, "alpha", "FP1", "K1", "armored 1", T0 + 1)
    assert directory_index.replace_site_key(index, "alpha", "FP2", "K2 K3", "armored 2", T0 + 2)
    assert directory_index.site_key_rows(index, alpha) == [
        ("FP2", "K2 K3", "armored 2", T0 + 2, None),
        ("FP1", "K1", "armored 1", T0, T0 + 2),
    ]
    assert directory_index.all_site_key_rows(index) == {alpha: directory_index.site_key_rows(index, alpha)}
    with pytest.raises(SiteError, match="no site named"):
        directory_index.replace_site_key(index, "nobody", "FP3", "K", "a", T0)
    assert directory_index.keys_version(index) == keys_version + 3  # insert, update + insert
    assert directory_index.directory_version(index) == directory_version + 3
    with db.transaction(index):
        directory_index.set_policy_override(index, beta, "on")
        directory_index.set_policy_override(index, beta, "off")
        directory_index.set_policy_override(index, alpha, "on")
        directory_index.set_policy_override(index, alpha, None)
    assert directory_index.policy_overrides(index) == {beta: "off"}
    assert directory_index.keys_version(index) == keys_version + 7
    # the directory mailer's marks
    with db.transaction(index):
        directory_index.set_mark_if_unset(index, "sent", 5)
        directory_index.set_mark_if_unset(index, "sent", 6)  # set already: kept
        directory_index.set_mark(index, "told", 7)
        directory_index.set_mark(index, "told", 8)  # replaced
        directory_index.set_mark_to_version_if_unset(index, "seen")
        directory_index.set_mark_to_version_if_unset(index, "told")
    version = directory_index.directory_version(index)
    assert directory_index.mark(index, "sent") == 5 and directory_index.mark(index, "told") == 8
    assert directory_index.mark(index, "never") is None
    assert directory_index.marks(index, "sent", "seen", "never") == {"directory_version": version, "sent": 5,
                                                                      "seen": version}  # fmt: skip
    marks, listed = directory_index.marks_and_sites(index, "told")
    assert marks == {"directory_version": version, "told": 8} and [s.name for s in listed] == ["alpha", "beta"]
    assert not index.in_transaction


# ---- the lifecycle ---------------------------------------------------------------------------------


def test_retention_expiry_warnings_and_notices(index):
    alpha, beta = add_sites(index, "alpha", "beta")
    b1, b2 = store(index, "S1", 1000, T0, alpha, [beta, alpha], set_id="1.2.3", part=1, total=2)
    (b3,) = store(index, "S2", 400, T0 + DAY, alpha, [beta], set_id="1.2.3", part=2, total=2)
    (b4,) = store(index, "M1", 70, T0, None, [beta], mail_from="x@far.test")
    with db.transaction(index):
        lifecycle.set_retention(index, "alpha", 0)  # alpha keeps its mail
        lifecycle.set_retention(index, "beta", 3)
        lifecycle.set_retention(index, "beta", 2)
    with pytest.raises(SiteError, match="retention must be"):
        lifecycle.set_retention(index, "beta", -1)
    assert lifecycle.retention_overrides(index) == {alpha: 0, beta: 2}
    assert [w.uid for w in lifecycle.waiting_entries(index, 30)] == [b1, b3, b4]
    # by T0 + 2.5 days only the mail without a study is due; the study's newest part is a day younger
    due = lifecycle.waiting_entries(index, 30, now=T0 + 2.5 * DAY)
    assert [(w.uid, w.retention_days, w.site_address) for w in due] == [(b4, 2, "beta2@hub.test")]
    due = lifecycle.waiting_entries(index, 30, now=T0 + 2.5 * DAY, warn_before=DAY)
    assert [w.uid for w in due] == [b1, b3, b4]
    with db.transaction(index):
        warned = lifecycle.warn(
            index, T0 + 2 * DAY, [lifecycle.WarningGroup(beta, "beta", "beta@hub.test", [b1, b3], {b1: 1.0})]
        )
        again = lifecycle.warn(index, T0 + 2 * DAY, [lifecycle.WarningGroup(beta, "beta", "beta@hub.test", [b1])])
    assert (warned, again) == (1, 0)
    fetch(index, b3, T0 + 2 * DAY)
    group = lifecycle.ExpiryGroup(beta, "beta", "a@hub.test", "1.2.3", [b1, b3], 2)
    with db.transaction(index):
        removed, summary = lifecycle.expire(index, T0 + 4 * DAY, [group])
    assert removed == [(beta, b1, alpha, 1000, True)]  # b3 was fetched meanwhile: kept
    assert (summary["mails"], summary["bytes"], summary["notices"]) == (1, 1000, 1)
    assert index.execute("SELECT event, site, queue_id, actor FROM audit").fetchall() == [
        ("expired", "beta", "S1", "hub")
    ]
    notices = lifecycle.pending_notices(index)
    assert [(n.kind, n.rcpt) for n in notices] == [
        (lifecycle.EXPIRY_WARNING, "beta@hub.test"),
        (lifecycle.EXPIRY_DSN, "a@hub.test"),
    ]
    assert notices[1].facts["mails"][0]["queue_id"] == "S1"
    with db.transaction(index):
        lifecycle.notice_done(index, notices[1].id)
        lifecycle.notice_done(index, notices[0].id)  # never moves the mark back
    assert lifecycle.pending_notices(index) == []
    with db.transaction(index):
        assert lifecycle.prune_notices(index) == 2
    # quota levels: crossed once, forgotten when left
    with db.transaction(index):
        lifecycle.quota_crossed(index, T0, beta, [80, 90], [], [("quota_warning", "beta@hub.test", {"level": 90})])
        lifecycle.quota_crossed(index, T0 + 1, beta, [90], [], [])
    assert lifecycle.quota_levels(index) == {beta: {80, 90}}
    with db.transaction(index):
        lifecycle.quota_crossed(index, T0 + 2, beta, [], [90], [])
    assert lifecycle.quota_levels(index) == {beta: {80}}
    assert [n.facts for n in lifecycle.pending_notices(index)] == [{"level": 90}]
    assert b2 != b1


def test_receipts_link_to_the_mail_and_study_figures(index):
    alpha, beta = add_sites(index, "alpha", "beta")
    (b1,) = store(index, "S1", 1000, T0, alpha, [beta], set_id="1.2.3", part=1, total=2)
    store(index, "S2", 400, T0 + 10, alpha, [beta], set_id="1.2.3", part=2, total=2)
    fetch(index, b1, T0 + 20)
    with db.transaction(index):
        index.execute(events.INSERT, events.row(Event(T0 + 20, events.DOWNLOADED, "S1", "beta", size=1000)))
        linked = lifecycle.record_receipt(index, T0 + 30, "MDN1", "beta", "beta@hub.test", "<S1@x>", "displayed")
        foreign = lifecycle.record_receipt(index, T0 + 31, "MDN2", "alpha", "alpha@hub.test", "<S1@x>", "displayed")
    assert linked == {"queue_id": "S1", "set_id": "1.2.3", "set_part": 1}
    assert foreign is None  # alpha never received S1: it cannot acknowledge it
    rows = lifecycle.study_rows(index, T0 - 1)
    assert rows == [
        ("1.2.3", "beta", 2, 2, T0, T0 + 10, 2, 1, T0 + 20, 1, T0 + 30, "displayed [mdn MDN1]", 1),
    ]
    assert lifecycle.study_rows(index, T0 + 100) == []
    assert lifecycle.disposition_of(rows[0][11]) == "displayed"


# ---- the wrapper itself -----------------------------------------------------------------------


def test_placeholders_outside_quoted_text_and_percent_signs():
    assert placeholders("SELECT ? FROM t WHERE a = ?") == "SELECT %s FROM t WHERE a = %s"
    assert placeholders("SELECT '?', \"a?b\", ? WHERE x LIKE '10%'") == "SELECT '?', \"a?b\", %s WHERE x LIKE '10%%'"
    assert placeholders("SELECT 'it''s ?', ?") == "SELECT 'it''s ?', %s"
    assert placeholders("SELECT 7 % 3") == "SELECT 7 %% 3"
    with pytest.raises(ValueError, match="unterminated"):
        placeholders("SELECT 'open ?")


def test_postgresql_errors_arrive_as_the_ones_the_storage_code_catches(index):
    add_sites(index, "alpha")
    with pytest.raises(sqlite3.IntegrityError):
        index.execute("INSERT INTO sites (id, name, password_hash, created_at) VALUES (1, 'again', 'h', 0)")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        with db.transaction(index):
            index.execute("INSERT INTO audit (at, event) VALUES (1, 'accepted')")
            index.execute("UPDATE audit SET event = 'fetched'")
    assert not index.in_transaction
    assert index.execute("SELECT count(*) FROM audit").fetchone() == (0,)  # rolled back
    with pytest.raises(sqlite3.OperationalError):
        index.execute("SELECT * FROM no_such_table")
    # the rest of the table (a real full disk: the test below)
    assert isinstance(mapped_error(psycopg.errors.SerializationFailure("x")), sqlite3.OperationalError)
    assert isinstance(mapped_error(psycopg.errors.ForeignKeyViolation("x")), sqlite3.IntegrityError)
    assert type(mapped_error(psycopg.errors.InternalError_("x"))) is sqlite3.DatabaseError


# ---- the outbound queue (the scheduler's claim: test_relay_units.py) ------------------------------


def test_the_outbound_queue_is_retried_deferred_settled_and_dropped(index, tmp_path):
    from storage import outbound

    with db.transaction(index):
        index.execute(
            "INSERT INTO messages (queue_id, blob, size, sha256, dot_lines, received_at, mail_from, refs)"
            " VALUES ('Q', 'b/Q', 10, 'x', 1, 1, 'a@hub.test', 4)"
        )
        index.executemany(
            "INSERT INTO outbound (queue_id, rcpt, queued_at, next_attempt_at, attempts) VALUES (?, ?, ?, ?, ?)",
            [("Q", f"r{i}@far.test", 1.0, 100.0, 0) for i in range(4)],
        )
    rows = outbound.all_rows(index, tmp_path)
    assert [(r.rcpt, r.dot_lines, r.blob, r.warned) for r in rows] == [
        (f"r{i}@far.test", True, tmp_path / "b/Q", False) for i in range(4)
    ]
    ids = [r.id for r in rows]
    assert outbound.totals(index) == (1, 4, 1.0)
    with db.transaction(index):
        relayed = events.relay_outcome(200.0, events.RELAYED, "Q", "r0@far.test", "mx", 10, "250")
        deferral = outbound.Deferral(ids[1], 500.0, 1, "451 busy" * 100, True)
        outbound.settle(index, [ids[0]], [deferral], 200.0, [events.row(relayed)])
    assert index.execute("SELECT refs FROM messages").fetchone() == (3,)
    deferred = [r for r in outbound.all_rows(index, tmp_path) if r.id == ids[1]][0]
    assert (deferred.attempts, deferred.warned, len(deferred.last_error)) == (1, True, 500)
    assert [r.id for r in outbound.due(index, tmp_path, 300.0, True, 10, f"[{ids[2]}]")] == [ids[3]]
    assert [r.id for r in outbound.due(index, tmp_path, 300.0, False, 10)] == []  # deferred to 500
    version = outbound.retry_version(index)
    assert outbound.retry_queued(index, 300.0, None) == 3
    assert outbound.retry_version(index) == version + 1
    assert [r.id for r in outbound.due(index, tmp_path, 300.0, False, 10)] == [ids[1]]
    assert outbound.drop_queued(index, "Q", "R2@FAR.test") == 1  # recipients compare without case
    assert outbound.drop_queued(index, "Q", None) == 2
    assert index.execute("SELECT count(*) FROM messages").fetchone() == (0,)  # freed with its last row
    assert outbound.totals(index) == (0, 0, None)


# ---- the index writer's group commit and a POP3 session's deletions --------------------------------


def test_a_group_commit_and_a_sessions_deletions(index):
    from storage.index_writer import BatchItem, _delete_entries, _index_batch
    from storage.records import Delivery, Downloads, MessageMeta

    alpha, beta, gamma = add_sites(index, "alpha", "beta", "gamma")

    def item(qid, size, to, remote=(), limit=None):
        meta = MessageMeta(mail_from="a@hub.test", sender_site=alpha, dot_lines=False, message_id=f"<{qid}@x>",
                           set_id="1.2.3", sender_name="alpha")  # fmt: skip
        deliveries = [Delivery(s, f"s{s}@hub.test", f"site{s}", max_messages=limit) for s in to]
        mark = ("directory_sent", 3) if qid == "Q1" else None
        return BatchItem(qid, size, T0, meta, deliveries, list(remote), mark, f"b/{qid}", sha256="ab" * 32, crc32=1)

    batch = [
        item("Q1", 1000, [beta, gamma]),
        item("Q2", 500, [beta], ["far@other.test"]),
        item("Q3", 9, [beta], limit=2),
    ]
    with db.transaction(index):
        refused = _index_batch(index, batch, [])
    assert refused == {2: None}  # beta's limit of 2 messages: the third is left out
    assert directory_index.mark(index, "directory_sent") == 3
    assert index.execute("SELECT queue_id, refs FROM messages ORDER BY 1").fetchall() == [("Q1", 2), ("Q2", 2)]
    assert index.execute("SELECT count(*) FROM audit WHERE event = 'accepted'").fetchone() == (3,)
    uids = dict(index.execute("SELECT queue_id, uid FROM mailbox WHERE site_id = ?", (beta,)).fetchall())
    session = Downloads(polled_at=T0 + 10, messages=1, bytes=1000, send_seconds=0.5, fetched_uids=[uids["Q1"]],
                        retrieved={"Q1": (T0 + 11, 1000)})  # fmt: skip
    with db.transaction(index):
        fetched, removed = _delete_entries(index, beta, [uids["Q2"]], session, "beta")
    assert fetched == [(uids["Q1"], alpha, 1000)]
    assert removed == [(uids["Q2"], alpha, 500, 1)]  # it was still waiting
    later = Downloads(polled_at=T0 + 5, messages=0, retrieved={})  # an earlier poll time: the later one stays
    with db.transaction(index):
        _delete_entries(index, beta, [], later, "beta")
    assert usage.download_totals(index, beta) == (2, 1, 1000, 0.5, T0 + 10, T0 + 10)
    assert index.execute("SELECT last_fetch_at FROM site_downloads WHERE site_id = ?", (beta,)).fetchone() == (T0 + 11,)
    assert sorted(usage.read_snapshot(index, T0).usage) == [
        (beta, alpha, 1000, 1, 0, 0),
        (gamma, alpha, 1000, 1, 1000, 1),
    ]
    assert index.execute(
        "SELECT event, queue_id FROM audit WHERE site = 'beta' AND event != 'accepted' ORDER BY id"
    ).fetchall() == [
        ("fetched", "Q1"),
        ("deleted_by_site", "Q2"),
    ]
    assert index.execute("SELECT refs FROM messages WHERE queue_id = 'Q2'").fetchone() == (1,)  # its outbound row


# ---- damaged mails (storage/verify.py) -------------------------------------------------------------


def test_damaged_mails_are_noted_once_and_listed_with_their_mailboxes(index):
    from storage import verify

    alpha, beta, gamma = add_sites(index, "alpha", "beta", "gamma")
    store(index, "Q1", 1000, T0, alpha, [beta, gamma])
    store(index, "Q2", 20, T0, alpha, [beta])
    with db.transaction(index):
        assert verify.note_damaged(index, "Q1", "sha256 differs", "scrub", T0 + 1, "entry-1")
        assert not verify.note_damaged(index, "Q1", "again", "verify", T0 + 2, None)
        assert verify.note_damaged(index, "Q9", "gone", "verify", T0 + 3, None)
    rows = verify.damaged_mails(index)
    assert [(q, reason, by, at, entry, size) for q, reason, by, at, entry, size, _ in rows] == [
        ("Q1", "sha256 differs", "scrub", T0 + 1, "entry-1", 1000),
        ("Q9", "gone", "verify", T0 + 3, None, None),
    ]
    assert sorted(rows[0][6].split(",")) == ["beta", "gamma"] and rows[1][6] is None
    assert verify.known_damaged(index) == {"Q1", "Q9"}
    assert verify.site_id_of(index, "gamma") == gamma and verify.site_id_of(index, "nobody") is None
    assert [r[0] for r in verify.mails_to_verify(index)] == ["Q1", "Q2"]
    assert verify.mails_to_verify(index, gamma) == [("Q1", "b/Q1", 0, 1000, "ab" * 32)]
    assert verify.still_stored(index, "Q2") and not verify.still_stored(index, "Q9")


# ---- the ledger's catch-up (storage/ledger.py) -----------------------------------------------------


def test_the_ledger_catches_up_with_the_index_and_uids_never_go_down(index, tmp_path):
    from storage import ledger

    alpha, beta = add_sites(index, "alpha", "beta")
    assert ledger.uid_line(index)["u"] == 0 and ledger.last_commit(index) == (0, 0)
    b1, b2 = store(index, "Q1", 10, T0, alpha, [beta, alpha])
    with db.transaction(index):
        index.execute("INSERT INTO commits (seq, attempt, mails) VALUES (1, 7, ?)", ('{"f": ["Q1"]}',))
        index.execute("DELETE FROM mailbox WHERE uid = ?", (b2,))  # the highest uid goes
    assert ledger.last_commit(index) == (1, 7)
    assert ledger.uid_line(index)["u"] == b2  # the high-water mark stays
    pending = ledger.pending_lines(index, 0)
    assert [(d["q"], d["s"], d["n"], d["u"]) for d in pending] == [("Q1", alpha, "alpha", b2)]
    assert ledger.pending_lines(index, pending[0]["d"]) == []
    writer = ledger.LedgerWriter(tmp_path)
    try:
        assert ledger.catch_up(index, writer) == pending[0]["d"]
    finally:
        writer.close()
    state = ledger.read(tmp_path)
    assert (state.commits, state.file_mails, state.max_uid) == ({1: 7}, {"Q1"}, b2)
    assert state.was_removed("Q1", alpha, None) and not state.was_removed("Q1", beta, "beta")
    assert b1 < b2


def test_a_failed_connection_is_one_line_without_the_password(postgres_server):
    from storage.errors import StorageError
    from storage.postgres.connection import PgConnection

    from pgutil import PASSWORD_ROLE

    for url, why in (
        (postgres_server.url("postgres", user=PASSWORD_ROLE, password="Sekr3t-pw"), "password authentication"),
        (f"postgresql://u:Sekr3t-pw@[::1:{postgres_server.port}/db", "IPv6"),  # a URL libpq quotes whole
    ):
        with pytest.raises(StorageError, match=f"cannot connect to the index at .*{why}") as failed:
            PgConnection.connect(url, connect_timeout=5)
        assert "Sekr3t-pw" not in str(failed.value) and "\n" not in str(failed.value)


# ---- start-up recovery (storage/recovery.py) ------------------------------------------------------


def test_start_up_recovery_cleans_up_and_moves_aside_the_rows_of_a_missing_blob(index, tmp_path):
    from storage import recovery

    alpha, beta = add_sites(index, "alpha", "beta")
    data = tmp_path / "data"
    (data / "spool").mkdir(parents=True)
    (data / "spool" / ("0" * 19 + ".tmp")).write_bytes(b"never acknowledged")
    hour = data / "blobs" / "2027011508"
    hour.mkdir(parents=True)
    kept, lost, freed = ("2027011508/" + c * 19 for c in "ABC")
    (data / "blobs" / kept).write_bytes(b"x" * 10)
    (data / "blobs" / freed).write_bytes(b"freed")
    store(index, "QA", 10, T0, alpha, [beta])
    store(index, "QB", 20, T0, alpha, [beta, alpha])
    with db.transaction(index):
        index.execute("UPDATE messages SET blob = ? WHERE queue_id = 'QA'", (kept,))
        index.execute("UPDATE messages SET blob = ? WHERE queue_id = 'QB'", (lost,))
        index.execute("INSERT INTO blob_trash (blob) VALUES (?)", (freed,))
    report = recovery.recover(index, data)
    assert (report.spool_removed, report.trash_removed, report.missing_blobs) == (1, 1, [lost])
    assert len(report.quarantined) == 1 and "2 mailbox entr" in report.quarantined[0]
    assert not (data / "blobs" / freed).exists() and (data / "blobs" / kept).exists()
    assert index.execute("SELECT queue_id FROM messages").fetchall() == [("QA",)]
    assert index.execute("SELECT count(*) FROM mailbox").fetchone() == (1,)
    assert index.execute("SELECT count(*) FROM ledger_pending").fetchone() == (0,)  # not a receiver's deletion
    assert index.execute("SELECT count(*) FROM blob_trash").fetchone() == (0,)
    assert usage.site_usage(index, beta, T0)["mailbox_bytes"] == 10
    assert len(list((data / "quarantine").rglob("index-rows.json"))) == 1
    # a blob store ahead of the index stops the start
    with db.transaction(index):
        index.execute("INSERT INTO commits (seq, attempt, mails) VALUES (1, 1, '{}')")
    (data / "ledger").mkdir(exist_ok=True)
    (data / "ledger" / "20991231.jsonl").write_text('{"c":5,"a":9,"f":[],"at":1}\n')
    with pytest.raises(recovery.IndexBehind, match="ends at group commit 1, the ledger at 5"):
        recovery.recover(index, data)


def test_a_full_disk_on_postgresql_ends_the_transaction_as_storage_full(postgres_server, pg_url):
    """The table of the tracking events on a 1 MB tmpfs (a tablespace; needs root, as in CI): the
    transaction that fills it fails with StorageFull (452 4.3.1) and keeps none of its rows."""
    import os
    import pwd
    import subprocess

    from storage.postgres import migrate_schema
    from storage.postgres.connection import PgConnection

    mount = postgres_server.root / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    conn = None
    try:
        user = pwd.getpwnam("postgres")
        os.chown(mount, user.pw_uid, user.pw_gid)
        postgres_server.admin(f"CREATE TABLESPACE small LOCATION '{mount}'")
        conn = PgConnection.connect(pg_url)
        migrate_schema(conn.raw)
        conn.execute("ALTER TABLE events SET TABLESPACE small")
        row = events.row(Event(T0, events.REFUSED, detail="x" * 300))
        with pytest.raises(StorageFull, match="53100") as full:
            with db.transaction(conn):
                for _ in range(100):  # 100 x 1000 rows of ~400 bytes: far past 1 MB
                    conn.executemany(events.INSERT, [row] * 1000)
        assert full.value.reply.startswith("452 4.3.1")
        assert not conn.in_transaction
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (0,)
    finally:
        if conn is not None:
            conn.execute("DROP TABLE IF EXISTS events")
            conn.close()
        postgres_server.admin("DROP TABLESPACE IF EXISTS small")
        subprocess.run(["umount", "-l", str(mount)], check=False)
