# Hostile POP3 input (issue 20): line and pipelining limits before and after login, in the core and
# against a real hub, where a well-behaved gateway on other connections still logs in and downloads
# within 1 s while the attack runs.
from test_hostile_imap import GOOD_MAIL, under_attack

from relay.pop3.protocol import MAX_BUFFERED, MAX_LINE, PRE_LOGIN_MAX_BUFFERED, MaildropEntry, Pop3Connection

from conftest import ALPHA_BETA
from pop3util import RawPop3, send


def core() -> Pop3Connection:
    return Pop3Connection(greeting_host="hub.test", stls_available=False, plaintext_login_allowed=True)


def replies(conn: Pop3Connection) -> bytes:
    out = b""
    while (event := conn.next_event()).__class__.__name__ not in ("_Sentinel",):
        if hasattr(event, "data"):
            out += event.data
        elif event.__class__.__name__ == "AuthRequest":
            out += conn.auth_result(True, maildrop=[MaildropEntry("u1", 10, False)])
    return out


def test_pipelined_input_before_login_is_limited_more_tightly():
    conn = core()
    conn.receive_data(b"NOOP\r\n" * (PRE_LOGIN_MAX_BUFFERED // 6 + 1))
    out = replies(conn)
    assert out.endswith(b"-ERR too much pipelined input\r\n")
    assert out.count(b"-ERR NOOP not allowed before login") == PRE_LOGIN_MAX_BUFFERED // 6
    conn = core()
    conn.receive_data(b"USER a\r\nPASS b\r\n")
    assert replies(conn).endswith(b"+OK maildrop has 1 messages (10 octets)\r\n")
    conn.receive_data(b"NOOP\r\n" * (PRE_LOGIN_MAX_BUFFERED // 6 * 4))  # well over the pre-login limit
    assert replies(conn) == b"+OK\r\n" * (PRE_LOGIN_MAX_BUFFERED // 6 * 4)
    conn.receive_data(b"NOOP\r\n" * (MAX_BUFFERED // 6 + 1))
    assert replies(conn).endswith(b"-ERR too much pipelined input\r\n")


def test_an_over_long_line_is_refused_and_never_held():
    conn = core()
    for _ in range(100):
        conn.receive_data(b"A" * 10_000)
        assert conn.buffered_bytes <= MAX_LINE
    conn.receive_data(b"\r\nCAPA\r\n")
    out = replies(conn)
    assert out.startswith(b"-ERR line too long\r\n+OK Capability list follows")


def test_pop3_floods_and_long_lines_against_a_hub(make_hub):
    hub = make_hub(sites=ALPHA_BETA).start()
    send(hub, ["alpha@hub.test"], GOOD_MAIL, login="beta")

    def attack(results):
        pre = RawPop3(hub.ports["pop3"])
        results.append(pre.command(b"USER " + b"x" * 5000))
        results.append(pre.command(b"CAPA").startswith(b"+OK"))
        pre.send(b"NOOP\r\n" * 2000)
        flood_replies = bytes(pre.buf)
        while chunk := pre.sock.recv(1 << 20):  # until the hub closes
            flood_replies += chunk
        results.append(flood_replies)
        pre.sock.close()
        after = RawPop3(hub.ports["pop3"])
        assert after.login("beta").startswith(b"+OK")
        after.send(b"NOOP\r\n" * 2000 + b"STAT\r\n")
        got = b""
        while not got.endswith(b"+OK 0 0\r\n"):
            got += after.sock.recv(1 << 20)
        results.append(got)
        after.sock.close()

    results = under_attack(hub, attack, attackers=1)  # one POP3 session of beta at a time
    assert results[0] == b"-ERR line too long\r\n"
    assert results[1] is True
    assert results[2].endswith(b"-ERR too much pipelined input\r\n")
    assert results[2].count(b"-ERR NOOP not allowed before login\r\n") <= PRE_LOGIN_MAX_BUFFERED // 6
    assert results[3] == b"+OK\r\n" * 2000 + b"+OK 0 0\r\n"
