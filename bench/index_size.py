# Index bytes per mail, for sizing (docs/sizing.md): a hub (`mailhub serve` in a throw-away folder,
# loopback ports: loadtest.spawn.LocalHub) filled over SMTP by SITES authenticated sites, each mail one part of a
# study (X-TELEMEDICINE-SETID/-SETPART/-SETTOTAL, Disposition-Notification-To, as a gateway sends),
# addressed to another site; then half of the receiving sites fetch and delete everything over POP3.
# Prints the SQLite index's size and each table's rows and bytes (dbstat), per mail. With
# --postgresql URL (an empty database) it copies the index there with `mailhub storage migrate` and
# prints PostgreSQL's sizes (tables with their indexes and TOAST) the same way.
#   .venv/bin/python -m bench.index_size [--mails 20000] [--sites 20] [--postgresql URL]
import os
import poplib
import smtplib
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from bench.common import argument_parser, command_line
from loadtest.spawn import LocalHub, mailhub_command

BODY = (os.urandom(57).hex()[:76] + "\r\n") * 25  # ~2 KB: the body does not reach the index


def _password(site: str) -> str:
    return f"password-of-{site}"


def _mail(sender: str, rcpt: str, study: str, part: int) -> str:
    return (
        f"From: {sender}@hub.test\r\nTo: {rcpt}@hub.test\r\nMessage-ID: <{os.urandom(8).hex()}@{sender}.hub.test>\r\n"
        f"X-TELEMEDICINE-SETID: {study}\r\nX-TELEMEDICINE-SETPART: {part}\r\nX-TELEMEDICINE-SETTOTAL: 330\r\n"
        f"Disposition-Notification-To: {sender}@hub.test\r\nSubject: study\r\n\r\n{BODY}"
    )


def fill(sites: list[str], mails: int, smtp_port: int, pop3_port: int) -> tuple[int, int]:
    sent = 0
    for i, sender in enumerate(sites):
        client = smtplib.SMTP("127.0.0.1", smtp_port, timeout=60)
        client.ehlo("gateway.test")
        client.login(sender, _password(sender))
        for k in range(mails // len(sites)):
            rcpt = sites[(i + 1 + k % 3) % len(sites)]
            client.sendmail(
                f"{sender}@hub.test",
                [f"{rcpt}@hub.test"],
                _mail(sender, rcpt, f"1.2.826.0.1.{i}.{k // 330}", k % 330 + 1),
            )
            sent += 1
        client.quit()
    fetched = 0
    for site in sites[: len(sites) // 2]:
        pop = poplib.POP3("127.0.0.1", pop3_port, timeout=60)
        pop.user(site)
        pop.pass_(_password(site))
        for number in range(1, pop.stat()[0] + 1):
            pop.retr(number)
            pop.dele(number)
            fetched += 1
        pop.quit()
    return sent, fetched


def sqlite_sizes(index: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    with sqlite3.connect(index) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page = con.execute("PRAGMA page_size").fetchone()[0]
        used = (
            con.execute("PRAGMA page_count").fetchone()[0] - con.execute("PRAGMA freelist_count").fetchone()[0]
        ) * page
        tables = [row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        # a table's bytes with its indexes (dbstat names each b-tree; indexes name their table)
        owner = dict(con.execute("SELECT name, tbl_name FROM sqlite_master WHERE type IN ('table', 'index')"))
        size: dict[str, int] = {}
        for name, bytes_ in con.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name"):
            size[owner.get(name, name)] = size.get(owner.get(name, name), 0) + bytes_
        rows = {t: (con.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0], size.get(t, 0)) for t in tables}
    return used, rows


def postgresql_sizes(url: str) -> tuple[int, dict[str, tuple[int, int]]]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as con:
        con.execute("VACUUM ANALYZE")
        tables = con.execute(
            "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relkind = 'r'"
        ).fetchall()
        rows = {
            name: ((con.execute(f'SELECT count(*) FROM "{name}"').fetchone() or (0,))[0], size) for name, size in tables
        }
    return sum(size for _, size in rows.values()), rows


def report(engine: str, total: int, rows: dict[str, tuple[int, int]], sent: int) -> None:
    print(f"{engine}: {total / 1e6:.1f} MB in tables and indexes, {total / sent:.0f} bytes per mail sent")
    for name, (count, size) in sorted(rows.items(), key=lambda item: -item[1][1]):
        if size >= total / 50:  # the tables that matter: 2 % of the whole or more
            per_row = f"{size / count:.0f} bytes/row" if count else ""
            print(f"  {name:<16} {count:>9} rows {size / 1e6:>8.2f} MB  {per_row}")


def main() -> int:
    parser = argument_parser(
        "bench.index_size",
        "Index bytes per mail on SQLite and, with --postgresql, on PostgreSQL: a throw-away hub filled over\n"
        "SMTP with study parts between sites, half of them fetched and deleted over POP3 (docs/sizing.md).",
    )
    parser.add_argument("--mails", type=int, default=20000)
    parser.add_argument("--sites", type=int, default=20)
    parser.add_argument("--postgresql", metavar="URL", help="an empty PostgreSQL database to migrate into")
    args = parser.parse_args()
    sites = [f"site{i:03d}" for i in range(args.sites)]
    with LocalHub("hub.test") as hub:  # a throw-away `mailhub serve`, its folder removed at the end
        hub.add_sites({site: {"address": f"{site}@hub.test", "password": _password(site)} for site in sites})
        ports = hub.start()
        started = time.monotonic()
        sent, fetched = fill(sites, args.mails, ports["smtp"], ports["pop3"])
        print(f"{command_line('bench.index_size')}")
        print(
            f"sent {sent} mails ({args.sites} sites, studies of 330 parts) in {time.monotonic() - started:.0f} s; "
            f"fetched and deleted {fetched} (half the sites)"
        )
        total, rows = sqlite_sizes(hub.data_dir / "index.sqlite3")
        report("SQLite", total, rows, sent)
        if args.postgresql:
            migrate = subprocess.run(
                [*mailhub_command(), "storage", "migrate", args.postgresql, "--quiet"],
                env=hub.env,
                capture_output=True,
                text=True,
            )
            if migrate.returncode != 0:
                raise SystemExit(f"mailhub storage migrate failed: {migrate.stderr.strip() or migrate.stdout.strip()}")
            total, rows = postgresql_sizes(args.postgresql)
            report("PostgreSQL", total, rows, sent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
