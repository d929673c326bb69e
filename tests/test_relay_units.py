# Pure parts of the outbound relay (issue 8): the route table and the RFC 3464 notices.
import email
import email.policy

import pytest

from relay.outbound.bounce import FailedRecipient, build_dsn, header_of, identifying_fields, status_of
from relay.outbound.client import Reply, mail_command, parse_extensions, parse_reply, size_limit
from relay.outbound.routes import Route, parse_routes, route_for


def test_routes_match_the_most_specific_domain_then_the_default():
    routes = parse_routes(
        [
            {"domain": "Example.ORG", "host": "mx1", "port": 2525},
            {"domain": "deep.example.org", "host": "mx2"},
            {"domain": "*", "host": "smarthost", "tls": "required", "max_connections": 3},
        ]
    )
    assert route_for(routes, "a@example.org").host == "mx1"
    assert route_for(routes, "a@sub.EXAMPLE.org").host == "mx1"
    assert route_for(routes, "a@x.deep.example.org").host == "mx2"
    assert route_for(routes, "a@notexample.org").host == "smarthost"
    assert route_for(routes[:2], "a@other.test") is None
    assert route_for(routes, "postmaster") is None and route_for(routes, "@x.test") is None
    assert routes[0] == Route("example.org", "mx1", 2525) and routes[2].max_connections == 3
    assert parse_routes("a.test=127.0.0.1:25, *=[::1]:2525") == [
        Route("a.test", "127.0.0.1", 25),
        Route("*", "::1", 2525),
    ]
    assert str(Route("*", "::1", 2525)) == "*=[::1]:2525"


@pytest.mark.parametrize(
    "bad, message",
    [
        ([{"domain": "a.test"}], "needs a domain and a host"),
        ([{"domain": "a.test", "host": "h", "tls": "maybe"}], "tls must be one of"),
        ([{"domain": "a.test", "host": "h", "port": 70000}], "port"),
        ([{"domain": "a.test", "host": "h", "colour": "red"}], "unknown route key"),
        ([{"domain": "a.test", "host": "h"}, {"domain": "A.test", "host": "g"}], "two routes"),
        ([{"domain": "a.test", "host": "h", "auth_user": "u"}], "go together"),
        ([{"domain": "a.test", "host": "h", "auth_user": "u", "auth_password_file": "/nonexistent"}], "cannot read"),
        ([{"domain": "bad domain", "host": "h"}], "invalid route domain"),
        ("a.test:25", "DOMAIN=HOST:PORT"),
        (42, "expected"),
    ],
)
def test_bad_routes_are_refused_with_a_reason(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_routes(bad)


def test_reply_and_extension_parsing():
    ehlo = parse_reply([b"250-mx.test hello", b"250-SIZE 1000", b"250-PIPELINING", b"250 CHUNKING"])
    extensions = parse_extensions(ehlo)
    assert set(extensions) == {"SIZE", "PIPELINING", "CHUNKING"} and size_limit(extensions) == 1000
    assert mail_command("a@b.test", 500, extensions) == b"MAIL FROM:<a@b.test> SIZE=500\r\n"
    assert mail_command("", 500, {"8BITMIME": ""}) == b"MAIL FROM:<> BODY=8BITMIME\r\n"
    assert parse_reply([b"450 4.2.0 busy"]) == Reply(450, "4.2.0 busy")
    assert not Reply(450, "").permanent and Reply(550, "").permanent and Reply(354, "").ok


def test_a_dsn_is_a_multipart_report_with_the_original_header_only():
    original = b"From: a@hub.test\r\nSubject: study 7\r\nMessage-ID: <m1@hub.test>\r\n\r\nSECRET BODY\r\n"
    failures = [
        FailedRecipient("x@remote.test", 550, "550 5.1.1 <x@remote.test>: unknown\r\n user", "mx.remote"),
        FailedRecipient("y@remote.test", 554, "554 transaction failed"),
    ]
    dsn = build_dsn(
        reporting_mta="hub.test",
        sender="a@hub.test",
        queue_id="Q1",
        arrival=1.8e9,
        failures=failures,
        delayed=False,
        original_header=header_of(original),
    )
    message = email.message_from_bytes(dsn, policy=email.policy.default)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    human, status, headers = message.iter_parts()
    assert "x@remote.test" in human.get_content() and "permanent" in human.get_content()
    per_message, first, second = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; hub.test"
    assert (first["Final-Recipient"], first["Action"], first["Status"]) == ("rfc822; x@remote.test", "failed", "5.1.1")
    assert first["Remote-MTA"] == "dns; mx.remote" and "\n" not in first["Diagnostic-Code"]
    assert (second["Status"], second["Remote-MTA"]) == ("5.0.0", None)
    assert "Subject: study 7" in headers.get_content() and b"SECRET BODY" not in dsn
    assert b"\r\n" in dsn and b"\n" not in dsn.replace(b"\r\n", b"")  # CRLF only


def test_status_codes_of_temporary_failures():
    assert status_of(FailedRecipient("a@b", 451, "4.4.7 delivery time expired; last error: 450 4.2.1 busy")) == "4.4.7"
    assert status_of(FailedRecipient("a@b", 451, "cannot connect to mx:25")) == "4.0.0"
    assert status_of(FailedRecipient("a@b", 550, "550 4.1.1 inconsistent")) == "5.0.0"


def test_fresh_mail_comes_first_and_deferred_mail_gets_at_most_its_share(index, tmp_path):
    from storage.outbound import due_and_version

    conn = index  # SQLite and PostgreSQL (conftest.py)
    conn.execute(
        "INSERT INTO messages (queue_id, blob, size, sha256, dot_lines, received_at, mail_from, refs)"
        " VALUES ('Q', 'b/Q', 10, 'x', 0, 1, 'a@hub.test', 14)"
    )
    rows = [("Q", f"old{i}@r.test", 1.0, 100.0 + i, 3) for i in range(10)]  # deferred, due long ago
    rows += [("Q", f"new{i}@r.test", 500.0, 500.0, 0) for i in range(3)]  # fresh
    rows += [("Q", "later@r.test", 1.0, 5000.0, 2)]  # deferred, not yet due
    conn.executemany(
        "INSERT INTO outbound (queue_id, rcpt, queued_at, next_attempt_at, attempts) VALUES (?, ?, ?, ?, ?)", rows
    )
    _, picked = due_and_version(conn, tmp_path / "blobs", 1000.0, "[]", 6, 2)
    assert [r.rcpt for r in picked] == ["new0@r.test", "new1@r.test", "new2@r.test", "old0@r.test", "old1@r.test"]
    in_flight = "[" + ",".join(str(r.id) for r in picked) + "]"
    _, again = due_and_version(conn, tmp_path / "blobs", 1000.0, in_flight, 6, 2)
    assert [r.rcpt for r in again] == ["old2@r.test", "old3@r.test"]  # never a row already in flight


def test_a_notice_quotes_only_the_fields_that_name_the_mail():
    header = (
        b"Received: from gw.clinic-a.test by hub.test\r\n\twith ESMTPS id 1A2B3C; Mon, 7 Dec 2026 10:00:00 +0000\r\n"
        b"Received: from modality by gw.clinic-a.test\r\n"
        b'From: "Doe, Jane (patient)" <gw@clinic-a.test>\r\n'
        b"Subject: CT thorax\r\n  Jane Doe 1970-01-01\r\n"
        b"Date: Mon, 7 Dec 2026 10:00:00 +0000\r\n"
        b"message-id: <m1@clinic-a.test>\r\n"
        b"X-TELEMEDICINE-SETID: 1.2.3\r\nX-TELEMEDICINE-SETPART: 2\r\nX-TELEMEDICINE-SETTOTAL: 3\r\n"
        b'Content-Type: multipart/encrypted; boundary="b"\r\n'
    )
    assert identifying_fields(header) == (
        b"Received: from gw.clinic-a.test by hub.test\r\n\twith ESMTPS id 1A2B3C; Mon, 7 Dec 2026 10:00:00 +0000\r\n"
        b"Date: Mon, 7 Dec 2026 10:00:00 +0000\r\n"
        b"message-id: <m1@clinic-a.test>\r\n"
        b"X-TELEMEDICINE-SETID: 1.2.3\r\nX-TELEMEDICINE-SETPART: 2\r\nX-TELEMEDICINE-SETTOTAL: 3\r\n"
    )
