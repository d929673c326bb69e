# The pure parts of the mailbox lifecycle (issue 25) in memory: quota warning crossings
# (quotas/warnings.py), expiry planning (relay/expiry.py), the notices (relay/notices.py, parsed
# with Python's email) and the receipt fields (relay/receipts.py).
import base64
import email
import time

from quotas import warnings
from relay import lifecycle as runner
from relay.expiry import DAY, MAX_UNSTUDIED, plan
from relay.notices import MAX_LISTED, expiry_dsn, quota_warning
from relay.receipts import MAX_FIELDS_BYTES, disposition_part, parse_fields
from storage.lifecycle import ExpiryGroup, Waiting

LEVELS = (80, 95)


def test_quota_levels_notify_once_per_crossing_and_again_after_leaving():
    recorded: set[int] = set()
    told = []
    for percent in (10, 79.9, 80, 85, 90, 96, 99, 94, 96, 50, 81, 81):
        change = warnings.check(LEVELS, recorded, percent)
        if change is not None:
            if change.crossed:
                told.append((percent, max(change.crossed)))
            recorded = (recorded | set(change.crossed)) - set(change.left)
    # 94 is not clearly below 95 (warnings.LEAVE_MARGIN): 96 is no new crossing; 50 left 80, so 81
    # crosses that again, once
    assert told == [(80, 80), (96, 95), (81, 80)]
    assert warnings.check(LEVELS, {80}, None) == warnings.Crossing(0.0, (), (80,))  # the quota lifted
    assert warnings.check((), {80}, 90.0).left == (80,)  # a level no longer configured is forgotten
    assert warnings.fill_percent(50, 9, 100, 10) == 90.0  # the fuller of bytes and messages
    assert warnings.fill_percent(50, 9, None, None) is None


def test_a_mailbox_hovering_at_a_level_is_warned_once():
    # a gateway fetching while mail comes in: 899 and 900 of 1000 mails, over and over
    recorded: set[int] = set()
    told = 0
    for percent in [89.9, 90.0] * 500 + [84.9, 90.0]:
        change = warnings.check((90,), recorded, percent)
        if change is not None:
            told += bool(change.crossed)
            recorded = (recorded | set(change.crossed)) - set(change.left)
    assert told == 2  # the first crossing, and again only after 84.9 left the level
    assert warnings.check((4,), {4}, 2.1) is None and warnings.check((4,), {4}, 1.9).left == (4,)


def waiting(uid, delivered_at, set_id=None, sender="alpha@hub.test", warned_at=None, days=14.0, site_id=2):
    return Waiting(
        uid,
        site_id,
        "beta",
        f"Q{uid}",
        delivered_at,
        warned_at,
        1000,
        sender,
        f"<m{uid}@x>",
        set_id,
        uid if set_id else None,
        3 if set_id else None,
        days,
        "beta@hub.test",
    )


def test_plan_expires_a_study_with_its_newest_part_and_warns_once():
    t0 = 1_000_000.0
    entries = [
        waiting(1, t0, "S1"),
        waiting(2, t0 + 2 * DAY, "S1"),  # the newest part of S1 decides for all of S1
        waiting(3, t0, None),
        waiting(4, t0, None, sender=""),  # a hub notice: expires, never warned
        waiting(5, t0, "S2", days=0.0),  # a site that keeps mail
    ]
    at = t0 + 14 * DAY + 1
    result = plan(entries, at, 2 * DAY)
    assert sorted((g.set_id, g.uids) for g in result.expire) == [(None, [3]), (None, [4])]
    assert [(g.site, sorted(g.uids)) for g in result.warn] == [("beta", [1, 2])]
    assert result.warn[0].expires_at == {1: t0 + 16 * DAY, 2: t0 + 16 * DAY}
    # the warned parts are not warned again
    entries[0] = waiting(1, t0, "S1", warned_at=at)
    entries[1] = waiting(2, t0 + 2 * DAY, "S1", warned_at=at)
    assert plan(entries, at + 60, 2 * DAY).warn == []
    later = plan(entries, t0 + 16 * DAY, 2 * DAY)
    assert [g.uids for g in later.expire if g.set_id == "S1"] == [[1, 2]]
    assert plan(entries, at, 0).warn == []  # warnings off


def test_mails_without_a_study_of_one_sender_expire_with_one_notice():
    # a gateway that stopped fetching: the receipts (no study) sent to it expire in one round
    t0 = 1_000_000.0
    entries = [waiting(uid, t0 + uid) for uid in range(1, 1201)]
    entries += [waiting(2000, t0, sender="gamma@hub.test"), waiting(2001, t0 + 10 * DAY)]  # not yet: stays
    entries += [waiting(3000, t0, "S1")]
    result = plan(entries, t0 + 14 * DAY + 2000, 0)
    groups = sorted((g.sender, g.set_id or "", len(g.uids)) for g in result.expire)
    assert groups == [
        ("alpha@hub.test", "", 200),
        ("alpha@hub.test", "", MAX_UNSTUDIED),
        ("alpha@hub.test", "", MAX_UNSTUDIED),
        ("alpha@hub.test", "S1", 1),
        ("gamma@hub.test", "", 1),
    ]
    assert 2001 not in result.entries
    mails = [{"queue_id": f"Q{i}", "rcpt": "beta@hub.test", "size": 10, "delivered_at": t0} for i in range(3)]
    facts = {"site": "beta", "set_id": None, "retention_days": 14.0, "expired_at": t0, "mails": mails}
    text = email.message_from_bytes(expiry_dsn(facts, "alpha@hub.test", "hub.test", now=t0)).get_payload()[0]
    assert "Your 3 mails to site beta were not fetched" in text.get_payload()


def test_batches_never_split_a_study():
    groups = [ExpiryGroup(1, "b", "a@x", f"S{i}", list(range(300)), 14) for i in range(4)]
    assert [len(b) for b in runner._batches(groups)] == [2, 2]


def test_expiry_dsn_is_a_real_dsn_without_content_and_capped():
    mails = [
        {
            "queue_id": f"Q{i:04d}",
            "message_id": f"<p{i}@x>",
            "rcpt": "beta@hub.test",
            "set_part": i,
            "set_total": 300,
            "size": 5000,
            "delivered_at": 1_000_000.0 + i,
        }
        for i in range(1, 301)
    ]
    facts = {"site": "beta", "set_id": "1.2.3", "retention_days": 14.0, "expired_at": 2_300_000.0, "mails": mails}
    raw = expiry_dsn(facts, "alpha@hub.test", "hub.test", now=2_300_000.0)
    dsn = email.message_from_bytes(raw)
    assert dsn.get_content_type() == "multipart/report" and dsn.get_param("report-type") == "delivery-status"
    human, status = dsn.get_payload()
    text = human.get_payload()
    assert "Q0001" in text and f"Q{MAX_LISTED:04d}" in text and f"Q{MAX_LISTED + 1:04d}" not in text
    assert f"... and {300 - MAX_LISTED} more" in text
    per_message, per_recipient = status.get_payload()
    assert per_message["Arrival-Date"] and per_recipient["Status"] == "5.4.7"
    assert all(line.endswith(b"\r") or not line for line in raw.split(b"\n")[:-1])  # CRLF throughout


def test_quota_warning_names_figures_only():
    raw = quota_warning(
        {
            "site": "beta",
            "level": 80,
            "percent": 83.4,
            "bytes": 900,
            "bytes_limit": 1000,
            "messages": 3,
            "messages_limit": None,
        },
        "beta@hub.test",
        "hub.test",
        now=0.0,
    )
    message = email.message_from_bytes(raw)
    assert message["Subject"] == "Mailbox of site beta is 80% full" and message["Auto-Submitted"] == "auto-generated"
    assert "83% full" in message.get_payload() and " mails" not in message.get_payload()  # no message quota


FIELDS = (
    b"Reporting-UA: gw; x\r\nFinal-Recipient: rfc822;beta@hub.test\r\nOriginal-Message-ID: <a@b>\r\n"
    b"Disposition: automatic-action/MDN-sent-automatically; processed\r\n\r\n"
)


def test_receipt_fields_and_structure():
    receipt = parse_fields(FIELDS)
    assert receipt is not None and receipt.original_message_id == "<a@b>"
    assert receipt.disposition == "automatic-action/MDN-sent-automatically; processed"
    assert parse_fields(base64.encodebytes(FIELDS), "base64") == receipt
    assert parse_fields(b"Disposition: x\r\n\r\n") is None  # nothing to link it to
    structure = {
        "type": "multipart",
        "subtype": "report",
        "params": {"report-type": "disposition-notification", "boundary": "b"},
        "parts": [
            {"type": "text", "subtype": "plain", "bs": 10, "be": 20},
            {"type": "message", "subtype": "disposition-notification", "bs": 30, "be": 90},
        ],
    }
    assert disposition_part(structure) == (30, 90, None)
    assert disposition_part({**structure, "params": {"report-type": "delivery-status"}}) is None
    assert disposition_part(None) is None


def test_receipt_fields_from_a_hostile_sender_are_bounded_and_never_raise():
    huge_id = b"Original-Message-ID: <" + b"x" * 100_000 + b"@b>\r\n\r\n"
    receipt = parse_fields(huge_id)
    # only MAX_FIELDS_BYTES are read and a value is cut to a line's 998 characters; a field past
    # the bound is never seen
    assert receipt is not None and len(receipt.original_message_id) == 998
    late = b"X-Filler: " + b"y" * MAX_FIELDS_BYTES + b"\r\n" + FIELDS
    assert parse_fields(late) is None
    many = b"".join(b"X-%d: v\r\n" % n for n in range(200_000)) + FIELDS  # megabytes of fields
    started = time.monotonic()
    assert parse_fields(many) is None  # its Original-Message-ID lies past the bound
    assert time.monotonic() - started < 2.0
    folded = b"Original-Message-ID: <a@b>" + b"\r\n " * 5000 + b"\r\n\r\n"
    assert parse_fields(folded).original_message_id == "<a@b>"  # folding whitespace collapses
    for junk in (b"\x00\xff" * 5000, b"Original-Message-ID:\r\n\r\n", b":\r\n" * 1000, b""):
        assert parse_fields(junk) is None
    assert parse_fields(b"!!! not base64 \x00", "base64") is None
    assert parse_fields(b"=ZZ=\r\n" * 1000, "quoted-printable") is None
