# `mailhub storage check|rebuild-index|backup|quarantine`: the storage commands of the CLI
# (storage/check.py, rebuild.py, backup.py, quarantine.py do the work). check, backup and quarantine
# run beside a running hub and never change its data; rebuild-index needs the hub stopped (it takes
# the data folder's lock). Exit status as in cli.py: 0 fine, 1 a problem found or the operation
# failed, 2 bad usage.
import json
import sqlite3
import sys
from pathlib import Path

from .report_format import human_size, iso_time, printable

EXIT_FAILED = 1


def storage_parsers(commands, common) -> None:
    storage = commands.add_parser("storage", help="check, rebuild, back up the mail store")
    sub = storage.add_subparsers(dest="storage_command", required=True, metavar="SUBCOMMAND")
    check = sub.add_parser("check", parents=[common], help="report on the index, blobs, ledger and quarantine"
                           " (read-only; exit status 1 when something is wrong)")
    check.add_argument("--json", action="store_true")
    rebuild = sub.add_parser(
        "rebuild-index", parents=[common], help="rebuild or reconcile the index from the blob store (hub stopped)",
        description="Puts every committed mail of the blob store that the index lacks back into its mailboxes,"
                    " removes the entries the ledger says were deleted, and moves rows whose blob is gone into"
                    " the quarantine. The index as it was is kept in the quarantine first.")
    rebuild.add_argument("--from", dest="base", metavar="INDEX",
                         help="start from this index file (e.g. a backup's index.sqlite3) instead of the one in place")
    rebuild.add_argument("--json", action="store_true")
    backup = sub.add_parser("backup", parents=[common], help="consistent online backup into a new folder",
                            description="Copies the index (a consistent snapshot), the blobs (hard links where"
                                        " possible, packs copied), the ledger and the hub's keys into DEST while"
                                        " the hub runs. Restore: docs/storage.md.")
    backup.add_argument("dest", metavar="DEST", help="a new or empty folder")
    backup.add_argument("--json", action="store_true")
    quarantine = sub.add_parser("quarantine", parents=[common], help="list what was moved aside, and why")
    quarantine.add_argument("--json", action="store_true")


def storage_command(cfg, args) -> int:
    action = args.storage_command
    try:
        if action == "check":
            return _check(cfg, args)
        if action == "rebuild-index":
            return _rebuild(cfg, args)
        if action == "backup":
            return _backup(cfg, args)
        return _quarantine(cfg, args)
    except (OSError, sqlite3.Error) as exc:
        print(f"mailhub: storage {action} failed: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _check(cfg, args) -> int:
    from storage.check import check

    report = check(cfg.data_dir)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        r = report
        print(f"data folder   {r.data_dir} (hub {'running' if r.hub_running else 'stopped'})")
        print(f"index         {'ok' if r.index_ok else 'DAMAGED'}: {r.messages} mail(s), {human_size(r.message_bytes)},"
              f" {r.mailbox_entries} mailbox entr(ies), {r.outbound} outbound recipient(s)")
        print(f"blob store    {r.blob_files} file(s) ({r.packs} pack(s)), {human_size(r.blob_bytes)} on disk")
        print(f"ledger        {r.ledger_files} file(s), {human_size(r.ledger_bytes)}; group commit {r.ledger_seq}"
              f" (index: {r.commit_seq}){f', {r.ledger_torn_lines} torn line(s)' if r.ledger_torn_lines else ''}")
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(r.quarantine_reasons.items()))
        print(f"quarantine    {r.quarantine_entries} entr(ies), {human_size(r.quarantine_bytes)}"
              f"{f' ({reasons})' if reasons else ''}")
        for problem in r.problems:
            print(f"PROBLEM: {printable(problem)}")
        if not r.problems:
            print("no problems found")
    return EXIT_FAILED if report.problems else 0


def _rebuild(cfg, args) -> int:
    from storage.errors import StorageError
    from storage.rebuild import rebuild_index

    base = Path(args.base) if args.base else None
    if base is not None and not base.is_file():
        print(f"mailhub: no index file at {base}", file=sys.stderr)
        return 2
    try:
        report = rebuild_index(cfg.data_dir, base)
    except StorageError as exc:
        print(f"mailhub: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    r = report
    print(f"rebuilt from {r.base}; the index as it was is in {r.saved_index or '(there was none)'}")
    print(f"scanned {r.scanned_files} blob file(s): {r.found} mail(s) with an envelope record")
    print(f"restored {r.restored} mail(s): {r.restored_entries} mailbox entr(ies), {r.restored_outbound} outbound"
          f" recipient(s)")
    print(f"removed {r.removed_entries} mailbox entr(ies) and {r.removed_outbound} outbound recipient(s) the ledger"
          f" says were deleted; {r.all_removed} mail(s) not restored: deleted by every receiver")
    if r.uncommitted:
        print(f"{r.uncommitted} record(s) of transactions that never committed (never acknowledged): left out")
    for what, items in (("lost: blob missing, rows moved to the quarantine", r.missing),
                        ("damaged (bytes differ from their record): not restored", r.damaged),
                        ("without a readable envelope record", r.unreadable)):
        if items:
            print(f"{len(items)} {what}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}")
    for name in r.sites_made:
        print(f"site {name} made again from its mails: set its password with `mailhub site passwd {name}`"
              " and import its key")
    for note in r.notes:
        print(f"note: {note}")
    return 0


def _backup(cfg, args) -> int:
    from storage.backup import BackupError, backup

    try:
        report = backup(cfg.data_dir, Path(args.dest))
    except BackupError as exc:
        print(f"mailhub: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(report.__dict__, indent=2))
    else:
        r = report
        print(f"backup in {r.dest}: {r.messages} mail(s), {r.mailbox_entries} mailbox entr(ies);"
              f" {r.linked_files} file(s) linked, {r.copied_files} copied, {r.copied_packs} pack(s) copied,"
              f" {human_size(r.bytes_copied)} copied, {r.ledger_lines} ledger line(s), in {r.seconds:.1f} s")
        if r.gone:
            print(f"{len(r.gone)} mail file(s) freed while the backup ran (deleted meanwhile): {', '.join(r.gone[:5])}")
    return 0


def _quarantine(cfg, args) -> int:
    from storage.quarantine import list_entries

    entries = list_entries(cfg.data_dir)
    if args.json:
        print(json.dumps([{"id": e.id, "path": str(e.path), "original": e.original, "reason": e.reason,
                           "detail": e.detail, "at": iso_time(e.at), "size": e.size, "moved": e.moved, **e.extra}
                          for e in entries], indent=2))
        return 0
    if not entries:
        print("quarantine is empty")
    for e in entries:
        print(f"{iso_time(e.at, millis=False)}  {e.reason:<22} {human_size(e.size):>10}  {printable(e.original)}"
              f"{'' if e.moved else '  (not moved)'}\n    {printable(e.detail)}\n    -> {e.path}")
    return 0
