# `mailhub audit`: the audit trail of mailbox events (storage/audit.py) by site, study and time
# range, as a table, CSV or JSON; read-only, beside a running hub. Also the operator's user name that
# every admin action is recorded with (SUDO_USER when run through sudo, else the login name).
# Must never: change the index, or print client-controlled text (Message-ID, actor) unescaped in the
# table (CSV and JSON carry it as data).
import csv
import getpass
import json
import os
import sys
import time

from .config import Config
from .report_format import human_size, iso_time, printable

EXIT_FAILED, EXIT_USAGE = 1, 2


def operator_name() -> str:
    """Who runs this command: the user behind sudo, else the login name ('unknown' if neither)."""
    name = os.environ.get("SUDO_USER")
    if name:
        return name
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"


def audit_parser(commands, common) -> None:
    from storage.audit import EVENTS

    parser = commands.add_parser(
        "audit",
        parents=[common],
        help="the audit trail: who received, fetched, expired, deleted, exported or returned which mail",
        description="Records of mailbox events (accepted, fetched, deleted_by_site, expired, deleted_by_operator,"
        " exported, returned) with queue ID, Message-ID, study, size, SHA-256 and who did it; kept for"
        " events.audit_retention_days, also after the mail and its site are gone.",
    )
    parser.add_argument("--site", help="only this site's mailbox")
    parser.add_argument("--study", metavar="SETID", help="only this study (X-TELEMEDICINE-SETID)")
    parser.add_argument("--queue-id", help="only this mail")
    parser.add_argument("--message-id", help="only this Message-ID (with the angle brackets)")
    parser.add_argument("--event", choices=EVENTS, help="only this kind of event")
    parser.add_argument("--since", help="24h, 7d, 2026-11-01, 2026-11-01T12:00 (UTC)")
    parser.add_argument("--until", help="same forms as --since (exclusive)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many records (the oldest first)")
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="a JSON list of records")
    form.add_argument("--csv", action="store_true", help="CSV with a header line")
    parser.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")


def audit_command(cfg: Config, args) -> int:
    import sqlite3

    from storage import audit
    from storage.errors import StorageError

    from .stats import parse_when

    now = time.time()
    try:
        since = parse_when(args.since, now) if args.since else None
        until = parse_when(args.until, now) if args.until else None
    except ValueError as exc:
        print(f"mailhub: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.limit is not None and args.limit < 1:
        print("mailhub: --limit must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        conn = cfg.index_location.connect_readonly()
    except (OSError, sqlite3.Error, StorageError) as exc:
        print(f"mailhub: cannot open the index at {cfg.index_location.where()}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    filters = dict(
        site=args.site,
        study=args.study,
        since=since,
        until=until,
        event=args.event,
        queue_id=args.queue_id,
        message_id=args.message_id,
        limit=args.limit,
    )
    if args.csv:  # an export of any size: written row by row as the index yields them
        try:
            return _export_csv(audit.records(conn, **filters), args.output)
        except sqlite3.Error as exc:
            print(f"mailhub: index error: {exc}", file=sys.stderr)
            return EXIT_FAILED
        finally:
            conn.close()
    try:
        found = audit.query(conn, **filters)
    except sqlite3.Error as exc:
        print(f"mailhub: index error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        conn.close()
    out = open(args.output, "w", newline="", encoding="utf-8") if args.output else sys.stdout
    try:
        if args.json:
            json.dump([_exported(r.as_dict()) for r in found], out, indent=2)
            out.write("\n")
        else:
            _table(found, out)
    finally:
        if out is not sys.stdout:
            out.close()
    if not found and not args.json:
        print("no audit records match", file=sys.stderr)
    if args.output:
        print(f"{len(found)} record(s) written to {args.output}", file=sys.stderr)
    return 0


def _export_csv(records, output: str | None) -> int:
    """CSV with a header line, one row per record as it is read (bounded memory, however many)."""
    out = open(output, "w", newline="", encoding="utf-8") if output else sys.stdout
    count = 0
    try:
        from storage.audit import COLUMNS

        writer = csv.DictWriter(out, fieldnames=["time", *COLUMNS], lineterminator="\n")
        writer.writeheader()
        for r in records:
            writer.writerow({k: v for k, v in _exported(r.as_dict()).items() if k != "id"})
            count += 1
    finally:
        if out is not sys.stdout:
            out.close()
    if output:
        print(f"{count} record(s) written to {output}", file=sys.stderr)
    return 0


def _exported(record: dict) -> dict:
    """A record for CSV/JSON: its time as ISO 8601 UTC next to the Unix time."""
    return {"id": record["id"], "time": iso_time(record["at"]), **{k: v for k, v in record.items() if k != "id"}}


def _table(found, out) -> None:
    if not found:
        return
    out.write(
        f"{'TIME (UTC)':<24} {'EVENT':<19} {'SITE':<14} {'QUEUE ID':<20} {'SIZE':>10}  ACTOR / STUDY / MESSAGE-ID\n"
    )
    for r in found:
        size = human_size(r.size) if r.size is not None else "-"
        who = " ".join(printable(x) for x in (r.actor or "-", r.study_id or "-", r.message_id or "-"))
        out.write(
            f"{iso_time(r.at)!s:<24} {r.event:<19} {printable(r.site or '-'):<14} {r.queue_id or '-':<20}"
            f" {size:>10}  {who}\n"
        )
