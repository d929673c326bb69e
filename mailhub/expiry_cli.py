# `mailhub mailbox expire [--dry-run]`: mail not fetched within its site's retention (issue 25).
# Without --dry-run it asks the running hub to run an expiry round now (the hub also runs one every
# lifecycle.check_interval): warnings to sites, removal, one notice per study to the sender. With
# --dry-run it shows what would go and which sites would be warned, asking the running hub or,
# when none runs, reading the index itself (read-only). `mailhub site set NAME --retention-days`
# (mailhub/cli.py) stores a site's override through set_retention here.
# Must never remove mail itself: removal is the running hub's (its sessions and quota ledger hear of it).
import argparse
import json
import sqlite3
import sys
import time
from typing import Any

from . import config
from .report_format import human_size, iso_time, printable

EXIT_FAILED = 1
EXIT_USAGE = 2


def expiry_parsers(mailbox_commands: Any, common: argparse.ArgumentParser) -> None:
    """Add `expire` to the `mailbox` command's subcommands."""
    expire = mailbox_commands.add_parser(
        "expire",
        parents=[common],
        help="remove mail not fetched within its site's retention now (or show what would go)",
        description="Runs the running hub's expiry round now: sites get their warnings, mail past its"
        " site's retention (lifecycle.retention_days, `site set --retention-days`) is removed and each"
        " study's sender gets one delivery status notification. --dry-run only shows it.",
    )
    expire.add_argument("--dry-run", action="store_true", help="show what would be removed and warned; change nothing")
    expire.add_argument("--json", action="store_true")


def expire_command(cfg: config.Config, args: argparse.Namespace) -> int:
    from .control import ControlError, request

    report: dict[str, Any] | None
    try:
        report = request(cfg.data_dir, "mailbox.expire", timeout=120.0, dry_run=bool(args.dry_run))
    except ControlError as exc:
        if not args.dry_run:
            print(f"mailhub: {exc}", file=sys.stderr)
            return EXIT_FAILED
        report = _offline_dry_run(cfg)
    if report is None:
        return EXIT_FAILED
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(render(report, bool(args.dry_run)))
    return 0


def _offline_dry_run(cfg: config.Config) -> dict[str, Any] | None:
    """The dry run without a running hub: the index read directly (read-only)."""
    from relay.expiry import DAY, plan
    from relay.lifecycle import plan_report
    from storage import lifecycle
    from storage.errors import StorageError

    try:
        conn = cfg.index_location.connect_readonly()
    except (OSError, sqlite3.Error, StorageError) as exc:
        print(f"mailhub: cannot open the index at {cfg.index_location.where()}: {exc}", file=sys.stderr)
        return None
    now, warn_before = time.time(), cfg.lifecycle.warn_before_days * DAY
    try:
        entries = lifecycle.waiting_entries(conn, cfg.lifecycle.retention_days, now, warn_before)
    except sqlite3.Error as exc:
        print(f"mailhub: index error: {exc}", file=sys.stderr)
        return None
    finally:
        conn.close()
    return plan_report(plan(entries, now, warn_before), now)


def render(report: dict[str, Any], dry_run: bool) -> str:
    lines = []
    expire, warn = report["expire"], report["warn"]
    size = sum(e["size"] for e in expire)
    if dry_run:
        lines.append(f"would expire: {len(expire)} mail(s), {human_size(size)} in {report['studies']} group(s)")
    else:  # an entry fetched meanwhile stays: the count is what was removed
        lines.append(
            f"expired: {report.get('removed', 0)} mail(s) of {len(expire)} due, in {report['studies']} group(s)"
        )
    for e in expire:
        lines.append("  " + _entry_line(e))
    lines.append(f"{'would warn' if dry_run else 'warned'}: {len(warn)} mail(s)")
    for e in warn:
        lines.append("  " + _entry_line(e) + f"  expires {iso_time(e['expires_at'], millis=False)}")
    if not dry_run and "notices_queued" in report:
        lines.append(f"notices to senders: {report['notices_queued']}")
    return "\n".join(printable(line) for line in lines)


def _entry_line(e: dict[str, Any]) -> str:
    study = f" set {e['set_id']} part {e['set_part'] or '?'}/{e['set_total'] or '?'}" if e["set_id"] else ""
    return (
        f"{e['site']:<16} {e['queue_id']}  {human_size(e['size']):>10}  delivered"
        f" {iso_time(e['delivered_at'], millis=False)}  from <{e['sender']}>{study}"
    )


def retention_summary(conn: sqlite3.Connection, site_id: int, cfg: config.Config) -> dict[str, Any]:
    """A site's effective retention for `site show`: {"days": N (0: keep), "source": site|config}."""
    from storage import lifecycle

    override = lifecycle.retention_overrides(conn).get(site_id)
    if override is None:
        return {"days": cfg.lifecycle.retention_days, "source": "config"}
    return {"days": override, "source": "site"}


def retention_text(retention: dict[str, Any]) -> str:
    days = retention["days"]
    shown = "keep until fetched" if days == 0 else f"{days:g} days unfetched, then expired"
    return shown + ("  (site)" if retention["source"] == "site" else "")


def parse_retention(text: str) -> float | None:
    """`--retention-days` value: a number of days (0: keep until fetched) or 'default'."""
    from storage import SiteError

    if text == "default":
        return None
    try:
        days = float(text)
    except ValueError:
        days = -1.0
    if not days >= 0 or days == float("inf"):
        raise SiteError(f"--retention-days: expected a number of days (0: keep) or 'default', got {text!r}")
    return days


def set_retention(conn: sqlite3.Connection, name: str, text: str) -> str:
    """Store a site's retention override; the line to print."""
    from storage import db, lifecycle

    days = parse_retention(text)
    with db.transaction(conn):
        lifecycle.set_retention(conn, name, days)
    if days is None:
        return f"retention of site {name}: the default (lifecycle.retention_days)"
    return f"retention of site {name}: {'keep until fetched' if days == 0 else f'{days:g} days'}"
