# `mailhub storage check|rebuild-index|backup|restore|quarantine|verify|damaged|migrate`: the storage
# commands of the CLI (storage/check.py, rebuild.py, backup.py, backup_s3.py, quarantine.py, verify.py,
# postgres/ do the work). check, backup, quarantine, damaged and migrate run beside a running hub and never
# change its data; restore writes only into a new folder; verify reads every mail and has the damaged ones
# marked (by the running hub over its control socket, or itself under the data folder's lock); rebuild-index
# needs the hub stopped (it takes the data folder's lock); compact-ledger works on the past days' files
# beside a running hub, on all of them when it can take the lock. Exit status as in cli.py: 0 fine, 1 a
# problem found or the operation failed, 2 bad usage. The long transfers (backup and restore to object
# storage, migrate) take SIGTERM as Ctrl-C: they clean up (uploaded objects, a half restore, the
# temporary copy) and say what is left, instead of dying with it left behind.
import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import sys
import threading
from pathlib import Path

from storage.errors import StorageError

from .config import Config
from .report_format import human_size, iso_time, printable

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130  # as a shell reports a command ended by Ctrl-C


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM does what SIGINT does while the block runs (KeyboardInterrupt; inside asyncio.run, the
    main task cancelled first, so that its cleanup runs in the loop): the cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def as_sigint(_signum: int, _frame: object) -> None:
        signal.raise_signal(signal.SIGINT)

    # A command started with SIGINT ignored (a background job of a script, nohup, some schedulers)
    # would ignore the SIGINT raised for SIGTERM too, and run on: Python's own handler while the
    # block runs (asyncio.run then installs its own over it).
    interrupt_before = signal.getsignal(signal.SIGINT)
    if interrupt_before == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    before = signal.signal(signal.SIGTERM, as_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)
        if interrupt_before == signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def storage_parsers(commands, common) -> None:
    storage = commands.add_parser("storage", help="check, rebuild, back up the mail store")
    sub = storage.add_subparsers(dest="storage_command", required=True, metavar="SUBCOMMAND")
    check = sub.add_parser(
        "check",
        parents=[common],
        help="report on the index, blobs, ledger and quarantine (read-only; exit status 1 when something is wrong)",
    )
    check.add_argument("--json", action="store_true")
    rebuild = sub.add_parser(
        "rebuild-index",
        parents=[common],
        help="rebuild or reconcile the index from the blob store (hub stopped)",
        description="Puts every committed mail of the blob store that the index lacks back into its mailboxes,"
        " removes the entries the ledger says were deleted, and moves rows whose blob is gone into"
        " the quarantine. The index as it was is kept in the quarantine first.",
    )
    rebuild.add_argument(
        "--from",
        dest="base",
        metavar="INDEX",
        help="start from this index file (e.g. a backup's index.sqlite3) instead of the one in place",
    )
    rebuild.add_argument("--json", action="store_true")
    backup = sub.add_parser(
        "backup",
        parents=[common],
        help="consistent online backup into a new folder",
        description="Copies the index (a consistent snapshot), the blobs (hard links where"
        " possible, packs copied), the ledger and the hub's keys into DEST while"
        " the hub runs. Restore: docs/storage.md.",
    )
    backup.add_argument(
        "dest",
        metavar="DEST",
        help="a new or empty folder, or s3://BUCKET/PREFIX (uploaded to the [s3] object store; a new prefix)",
    )
    backup.add_argument("--json", action="store_true")
    restore = sub.add_parser(
        "restore",
        parents=[common],
        help="download a backup from object storage into a new folder",
        description="Downloads the backup that `mailhub storage backup s3://BUCKET/PREFIX` uploaded into DEST,"
        " checking every file against the backup's manifest (size and SHA-256). DEST is then a data folder:"
        " check it with `mailhub storage check`, and serve it (data_dir) or copy it in place (docs/storage.md).",
    )
    restore.add_argument("source", metavar="s3://BUCKET/PREFIX")
    restore.add_argument("dest", metavar="DEST", help="a new or empty folder")
    restore.add_argument("--json", action="store_true")
    verify = sub.add_parser(
        "verify",
        parents=[common],
        help="check every stored mail (or one site's) against its SHA-256",
        description="Reads every stored mail (or those in one site's mailbox) and checks its bytes against the"
        " SHA-256 recorded at ingest. Damaged mails are listed, copied to the quarantine and refused to"
        " POP3/IMAP from then on (their receivers can delete them). Progress goes to stderr. Exit"
        " status: 0 all whole, 1 damaged mails found (or the check failed), 2 bad usage.",
    )
    verify.add_argument("--site", metavar="NAME", help="only the mails in this site's mailbox")
    verify.add_argument(
        "--rate",
        metavar="BYTES",
        default="0",
        help="read at most this many bytes a second (e.g. 50M; default: as fast as the disk goes)",
    )
    verify.add_argument("--quiet", action="store_true", help="no progress lines")
    damaged = sub.add_parser("damaged", parents=[common], help="list the mails found damaged, and where")
    damaged.add_argument("--json", action="store_true")
    compact = sub.add_parser(
        "compact-ledger",
        parents=[common],
        help="drop the ledger's lines about mails whose bytes are gone",
        description="Rewrites the ledger's files into one snapshot that keeps what rebuild-index needs about the"
        " mails the blob store still holds. Beside a running hub it compacts the files of past days;"
        " with the hub stopped, all of them. Safe to interrupt at any point.",
    )
    compact.add_argument("--json", action="store_true")
    quarantine = sub.add_parser("quarantine", parents=[common], help="list what was moved aside, and why")
    quarantine.add_argument("--json", action="store_true")
    migrate = sub.add_parser(
        "migrate",
        parents=[common],
        help="copy the index into an empty PostgreSQL database and check the copy",
        description="Copies a consistent snapshot of the index (the hub may run) into an empty PostgreSQL"
        " database at the current schema version, in one transaction, then compares every table's row count"
        " and digest on both sides. The hub keeps serving from SQLite (docs/postgresql.md). Exit status: 0 the"
        " copy is equal, 1 it differs or failed (nothing kept), 2 the database is not empty or bad usage.",
    )
    migrate.add_argument(
        "url",
        metavar="URL",
        help="postgresql://USER@HOST[:PORT]/DATABASE (a password: PGPASSWORD or ~/.pgpass rather than the URL)",
    )
    migrate.add_argument("--json", action="store_true")
    migrate.add_argument("--quiet", action="store_true", help="no progress lines (on stderr)")


# What works on the SQLite index file only, and what to use on a PostgreSQL index instead.
SQLITE_ONLY = {
    "rebuild-index": "PostgreSQL's own backups to restore the index (pg_dump/pg_restore, or pg_basebackup"
    " with point-in-time recovery)",
    "backup": "pg_dump (or pg_basebackup) for the index, and a copy of the data folder's blobs/",
    "restore": "pg_restore (or the base backup) for the index, and the blobs copied back",
    "migrate": "pg_dump/pg_restore to copy a PostgreSQL index (storage migrate copies an SQLite one into PostgreSQL)",
}

# With the mail on object storage (storage.blobs = "s3://...") data_dir/blobs/ is only the node's
# cache: these commands would take it for the whole store (report, quarantine or forget every mail
# not cached), so they refuse, saying why.
NOT_ON_OBJECT_STORAGE = {
    "rebuild-index": "it would take the node's cache for the whole store and move the mails not cached to"
    " the quarantine",
    "compact-ledger": "it would drop the ledger lines of every mail not in the node's cache",
    "backup": "it would copy only the mails in the node's cache; the object store holds them all (use its"
    " replication or versioning)",
}


def storage_command(cfg: Config, args) -> int:
    action = args.storage_command
    if action in NOT_ON_OBJECT_STORAGE and cfg.storage.object_store:
        print(
            f"mailhub: storage {action} is not built for storage.blobs = {cfg.storage.object_store!r}:"
            f" {NOT_ON_OBJECT_STORAGE[action]} (docs/storage.md, Mail on object storage)",
            file=sys.stderr,
        )
        return 2
    if action in SQLITE_ONLY and cfg.storage.index:
        from storage.index import NotOnPostgres

        try:
            cfg.index_location.require_sqlite(f"mailhub storage {action}", SQLITE_ONLY[action])
        except NotOnPostgres as exc:
            print(f"mailhub: {exc}", file=sys.stderr)
            return 2
    try:
        if action == "check":
            return _check_objects(cfg, args) if cfg.storage.object_store else _check(cfg, args)
        if action == "rebuild-index":
            return _rebuild(cfg, args)
        if action == "backup":
            return _backup_s3(cfg, args) if args.dest.startswith("s3://") else _backup(cfg, args)
        if action == "restore":
            return _restore_s3(cfg, args)
        if action == "verify":
            return _verify(cfg, args)
        if action == "damaged":
            return _damaged(cfg, args)
        if action == "compact-ledger":
            return _compact_ledger(cfg, args)
        if action == "migrate":
            return _migrate(cfg, args)
        return _quarantine(cfg, args)
    except (OSError, sqlite3.Error, StorageError) as exc:
        print(f"mailhub: storage {action} failed: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _check(cfg: Config, args) -> int:
    from storage.check import check

    report = check(cfg.data_dir, cfg.storage.index)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        r = report
        bad = "UNREADABLE" if cfg.storage.index else "DAMAGED"  # (PostgreSQL: down, or a query failed)
        print(f"data folder   {r.data_dir} (hub {'running' if r.hub_running else 'stopped'})")
        print(
            f"index         {'ok' if r.index_ok else bad}: {r.messages} mail(s), {human_size(r.message_bytes)},"
            f" {r.mailbox_entries} mailbox entr(ies), {r.outbound} outbound recipient(s)"
        )
        print(f"blob store    {r.blob_files} file(s) ({r.packs} pack(s)), {human_size(r.blob_bytes)} on disk")
        print(
            f"ledger        {r.ledger_files} file(s), {human_size(r.ledger_bytes)}; group commit {r.ledger_seq}"
            f" (index: {r.commit_seq}){f', {r.ledger_torn_lines} torn line(s)' if r.ledger_torn_lines else ''}"
        )
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(r.quarantine_reasons.items()))
        print(
            f"quarantine    {r.quarantine_entries} entr(ies), {human_size(r.quarantine_bytes)}"
            f"{f' ({reasons})' if reasons else ''}"
        )
        for problem in r.problems:
            print(f"PROBLEM: {printable(problem)}")
        if not r.problems:
            print("no problems found")
    return EXIT_FAILED if report.problems else 0


def _check_objects(cfg: Config, args) -> int:
    """storage check with the mail on object storage: each index row's object, and the orphans."""
    from storage.index import IndexLocation
    from storage.object_check import check_objects
    from storage.s3 import S3Client, S3Error, S3Location

    try:
        settings = s3_settings(cfg)
    except S3SetupError as exc:
        print(f"mailhub: {exc}", file=sys.stderr)
        return 2
    location = S3Location.parse(cfg.storage.object_store)
    conn = IndexLocation(cfg.data_dir, cfg.storage.index).connect_readonly()
    try:
        with _terminate_as_interrupt():
            report = asyncio.run(
                check_objects(conn, S3Client(settings), location, lambda line: print(line, file=sys.stderr))
            )
    except S3Error as exc:
        print(f"mailhub: storage check failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("mailhub: storage check interrupted (it changes nothing)", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        conn.close()
    r = report
    if args.json:
        print(json.dumps(r.as_dict(), indent=2))
    else:
        print(f"object store  {r.location}: {r.objects} object(s), {human_size(r.object_bytes)}")
        print(
            f"index         {r.messages} mail(s), {human_size(r.message_bytes)}: {r.missing} object(s) missing,"
            f" {r.short} short"
        )
        print(f"orphans       {r.orphans} object(s) no index row names (report only: docs/storage.md)")
        for key in r.orphan_keys:
            print(f"ORPHAN: {printable(key)}")
        for problem in r.problems:
            print(f"PROBLEM: {printable(problem)}")
        if not r.problems:
            print("no problems found")
    return EXIT_FAILED if r.problems else 0


def _rebuild(cfg: Config, args) -> int:
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
    print(
        f"restored {r.restored} mail(s): {r.restored_entries} mailbox entr(ies), {r.restored_outbound} outbound"
        f" recipient(s)"
    )
    print(
        f"removed {r.removed_entries} mailbox entr(ies) and {r.removed_outbound} outbound recipient(s) the ledger"
        f" says were deleted; {r.all_removed} mail(s) not restored: deleted by every receiver"
    )
    if r.damaged_marked:
        print(
            f"{r.damaged_marked} mail(s) marked damaged again from the quarantine's records"
            " (refused to clients; see `mailhub storage damaged`)"
        )
    if r.uncommitted:
        print(f"{r.uncommitted} record(s) of transactions that never committed (never acknowledged): left out")
    for what, items in (
        ("lost: blob missing, rows moved to the quarantine", r.missing),
        ("damaged (bytes differ from their record): not restored", r.damaged),
        ("without a readable envelope record", r.unreadable),
    ):
        if items:
            print(f"{len(items)} {what}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}")
    for name in r.sites_made:
        print(
            f"site {name} made again from its mails: set its password with `mailhub site passwd {name}`"
            " and import its key"
        )
    for note in r.notes:
        print(f"note: {note}")
    return 0


def _compact_ledger(cfg: Config, args) -> int:
    from storage.folder_lock import DataFolderInUse, lock_data_folder
    from storage.ledger_compact import CompactionRunning, compact

    try:
        lock = lock_data_folder(cfg.data_dir)
    except DataFolderInUse:
        lock = None  # a hub serves the folder: today's file is its to append to
    try:
        report = compact(cfg.data_dir, include_today=lock is not None)
    except CompactionRunning as exc:
        print(f"mailhub: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if lock is not None:
            os.close(lock)
    if args.json:
        print(json.dumps(report.__dict__, indent=2))
        return 0
    r = report
    which = "all ledger files (hub stopped)" if r.today_included else "the ledger files of past days (hub running)"
    print(
        f"compacted {which}: {r.files_before} file(s), {r.lines_before} line(s), {human_size(r.bytes_before)}"
        f" -> 1 file, {r.lines_after} line(s), {human_size(r.bytes_after)} in {r.seconds:.1f} s;"
        f" lines of {r.mails_dropped} mail(s) whose bytes are gone dropped, of {r.mails_kept} still stored kept"
    )
    return 0


def _migrate(cfg: Config, args) -> int:
    if not args.url.startswith(("postgresql://", "postgres://")):
        print("mailhub: storage migrate: give a postgresql://USER@HOST[:PORT]/DATABASE URL", file=sys.stderr)
        return 2
    try:
        from storage.errors import StorageError
        from storage.postgres import TargetNotEmpty, migrate
    except ImportError as exc:
        print(
            f"mailhub: storage migrate needs psycopg 3 ({exc}): pip install 'dicom-mail-hub[postgresql]'",
            file=sys.stderr,
        )
        return EXIT_FAILED
    try:
        with _terminate_as_interrupt():
            report = migrate(cfg.data_dir, args.url, progress=None if args.quiet else _progress)
    except KeyboardInterrupt:
        print(
            "mailhub: storage migrate interrupted: the copy was rolled back unless it had been committed (then"
            " unchecked); start again into a new, empty database",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except TargetNotEmpty as exc:
        print(f"mailhub: {exc}", file=sys.stderr)
        return 2
    except StorageError as exc:  # MigrateError (one line, no password), a damaged index
        print(f"mailhub: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(f"{'table':<20} {'SQLite rows':>12} {'PostgreSQL rows':>16}  digest")
        for t in report.tables:
            print(
                f"{t.table:<20} {t.sqlite_rows:>12} {t.postgresql_rows:>16}  "
                f"{'equal' if t.equal else 'DIFFERENT'} ({t.postgresql_digest[:12]})"
            )
        outcome = "every table equal" if report.equal else "DIFFERENCES (see above)"
        print(
            f"copied {report.rows_copied} row(s) of {len(report.tables)} table(s) into {report.target}"
            f" (schema version {report.schema_version}) in {report.seconds:.1f} s: {outcome}"
        )
    return 0 if report.equal else EXIT_FAILED


def _progress(line: str) -> None:
    print(f"migrate: {line}", file=sys.stderr, flush=True)


def _backup(cfg: Config, args) -> int:
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
        print(
            f"backup in {r.dest}: {r.messages} mail(s), {r.mailbox_entries} mailbox entr(ies);"
            f" {r.linked_files} file(s) linked, {r.copied_files} copied, {r.copied_packs} pack(s) copied,"
            f" {human_size(r.bytes_copied)} copied, {r.ledger_lines} ledger line(s), in {r.seconds:.1f} s"
        )
        if r.gone:
            print(f"{len(r.gone)} mail file(s) freed while the backup ran (deleted meanwhile): {', '.join(r.gone[:5])}")
    return 0


class S3SetupError(Exception):
    pass


def s3_settings(cfg: Config, environ=os.environ):
    """The object store's settings from [s3], the credentials from there or from the environment
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY). Never puts the secret into a message."""
    from storage.s3 import Credentials, S3Settings

    s3 = cfg.s3
    if not s3.endpoint:
        raise S3SetupError("no object store configured: set s3.endpoint (e.g. MAILHUB_S3_ENDPOINT=http://HOST:8333)")
    access = s3.access_key or environ.get("AWS_ACCESS_KEY_ID", "")
    secret = s3.secret_key
    if not secret and s3.secret_key_file is not None:
        try:
            with open(s3.secret_key_file, encoding="utf-8") as f:
                secret = f.readline(1024).strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not text"
            raise S3SetupError(f"s3.secret_key_file: cannot read {s3.secret_key_file}: {reason}") from None
    secret = secret or environ.get("AWS_SECRET_ACCESS_KEY", "")
    if not access or not secret:
        raise S3SetupError(
            "no S3 credentials: set s3.access_key and s3.secret_key_file (or the environment's"
            " AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
        )
    return S3Settings(s3.endpoint, s3.region, Credentials(access, secret), s3.part_size, s3.addressing, s3.timeout)


def _s3_run(cfg: Config, url: str, work):
    """Run work(location, settings); its failures as one line each (exit status 1, 2 for bad usage)."""
    from storage.backup import BackupError
    from storage.backup_s3 import BackupInterrupted
    from storage.s3 import S3Error, S3Location

    try:
        location = S3Location.parse(url)
    except ValueError as exc:
        print(f"mailhub: {exc}", file=sys.stderr)
        return None, 2
    try:
        with _terminate_as_interrupt():
            return work(location, s3_settings(cfg)), 0
    except (S3SetupError, S3Error, BackupError) as exc:
        print(f"mailhub: {exc}", file=sys.stderr)
        return None, EXIT_INTERRUPTED if isinstance(exc, BackupInterrupted) else EXIT_FAILED
    except KeyboardInterrupt:  # (a backup's upload turns it into BackupInterrupted, saying what it removed)
        print(
            "mailhub: interrupted; nothing was uploaded or restored (the temporary copy and a half restore removed)",
            file=sys.stderr,
        )
        return None, EXIT_INTERRUPTED


def _backup_s3(cfg: Config, args) -> int:
    from storage.backup_s3 import backup_to_s3

    report, status = _s3_run(cfg, args.dest, lambda location, settings: backup_to_s3(cfg.data_dir, location, settings))
    if report is None:
        return status
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    r = report
    print(
        f"backup in {r.location}: {r.messages} mail(s); {r.files} file(s), {human_size(r.bytes)} uploaded"
        f" ({r.multipart} in parts) and checked in {r.seconds:.1f} s ({r.mb_per_s:.1f} MB/s);"
        f" local copy in {r.local_seconds:.1f} s"
    )
    if r.gone:
        print(f"{r.gone} mail file(s) freed while the backup ran (deleted meanwhile)")
    return 0


def _restore_s3(cfg: Config, args) -> int:
    from storage.backup_s3 import restore_from_s3
    from storage.check import check

    dest = Path(args.dest)
    report, status = _s3_run(cfg, args.source, lambda location, settings: restore_from_s3(location, settings, dest))
    if report is None:
        return status
    checked = check(dest)  # what `MAILHUB_DATA_DIR=DEST mailhub storage check` says
    if args.json:
        print(json.dumps({**report.as_dict(), "check_problems": checked.problems}, indent=2))
        return EXIT_FAILED if checked.problems else 0
    r = report
    print(
        f"restored {r.location} into {dest}: {r.files} file(s), {human_size(r.bytes)} in {r.seconds:.1f} s"
        f" ({r.mb_per_s:.1f} MB/s), each checked against the backup's manifest"
    )
    print(
        f"storage check of {dest}: {checked.messages} mail(s), {checked.mailbox_entries} mailbox entr(ies),"
        f" {len(checked.problems) or 'no'} problem(s)"
    )
    for problem in checked.problems:
        print(f"PROBLEM: {printable(problem)}")
    print(f"next: serve that folder (data_dir = {dest}) or copy it in place (docs/storage.md, restore from a backup)")
    return EXIT_FAILED if checked.problems else 0


def _quarantine(cfg: Config, args) -> int:
    from storage.quarantine import list_entries

    entries = list_entries(cfg.data_dir)
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "id": e.id,
                        "path": str(e.path),
                        "original": e.original,
                        "reason": e.reason,
                        "detail": e.detail,
                        "at": iso_time(e.at),
                        "size": e.size,
                        "moved": e.moved,
                        **e.extra,
                    }
                    for e in entries
                ],
                indent=2,
            )
        )
        return 0
    if not entries:
        print("quarantine is empty")
    for e in entries:
        print(
            f"{iso_time(e.at, millis=False)}  {e.reason:<22} {human_size(e.size):>10}  {printable(e.original)}"
            f"{'' if e.moved else '  (not moved)'}\n    {printable(e.detail)}\n    -> {e.path}"
        )
    return 0


def _verify(cfg: Config, args) -> int:
    import time

    from storage.folder_lock import DataFolderInUse
    from storage.s3 import S3Error
    from storage.verify import (
        Pacer,
        content_problem,
        known_damaged,
        mails_to_verify,
        mark_with_hub_stopped,
        site_id_of,
        still_stored,
    )

    from .config import ConfigError, parse_size
    from .control import ControlError, request

    try:
        rate = parse_size(args.rate)
    except (ConfigError, ValueError):
        print(f"mailhub: --rate: not a size: {args.rate!r}", file=sys.stderr)
        return 2
    conn = cfg.index_location.connect_readonly()
    site_id = None
    if args.site:
        site_id = site_id_of(conn, args.site)
        if site_id is None:
            print(f"mailhub: no site named {args.site!r}", file=sys.stderr)
            return 2
    known = known_damaged(conn)
    if cfg.storage.object_store:
        try:
            count, total, found, started = _verify_objects(cfg, args, conn, site_id, rate, known)
        except (S3SetupError, S3Error) as exc:
            print(f"mailhub: storage verify failed: {exc}", file=sys.stderr)
            return EXIT_FAILED
        finally:
            conn.close()
        new = [[qid, problem] for qid, problem in found if qid not in known]
    else:
        mails = mails_to_verify(conn, site_id)
        total = sum(m[3] for m in mails)
        blob_dir = Path(cfg.data_dir) / "blobs"
        pacer, started, shown = Pacer(rate), time.monotonic(), time.monotonic()
        done_bytes, found = 0, []
        for n, (queue_id, blob, offset, size, sha256) in enumerate(mails, 1):
            problem = content_problem(blob_dir / blob, offset, size, sha256, pacer)
            if problem is not None and still_stored(conn, queue_id):
                found.append((queue_id, problem))  # (a mail deleted meanwhile is no damage)
                print(f"DAMAGED {queue_id}: {problem}{' (known before)' if queue_id in known else ''}", flush=True)
            done_bytes += size
            if not args.quiet and (time.monotonic() - shown >= 2.0 or n == len(mails)):
                shown = time.monotonic()
                print(
                    f"verify: {n}/{len(mails)} mail(s), {human_size(done_bytes)} of {human_size(total)},"
                    f" {human_size(done_bytes / max(shown - started, 1e-3))}/s, {len(found)} damaged",
                    file=sys.stderr,
                    flush=True,
                )
        conn.close()
        count = len(mails)
        new = [[qid, problem] for qid, problem in found if qid not in known]
    if new:
        try:
            marked = mark_with_hub_stopped(
                cfg.data_dir, [(qid, problem) for qid, problem in new], "verify", cfg.storage.index
            )
            how = "marked (hub stopped)"
        except DataFolderInUse:
            try:
                marked = sum(
                    request(cfg.data_dir, "storage-damaged", timeout=120, mails=new[i : i + 100])["marked"]
                    for i in range(0, len(new), 100)
                )
            except ControlError as exc:
                print(f"mailhub: the damaged mails could not be marked: {exc}", file=sys.stderr)
                return EXIT_FAILED
            how = "marked by the running hub"
        print(f"{marked} newly damaged mail(s) {how}: copied to the quarantine, refused to POP3/IMAP")
    print(
        f"verified {count} mail(s), {human_size(total)} in {time.monotonic() - started:.1f} s:"
        f" {len(found)} damaged ({len(found) - len(new)} known before)"
    )
    return EXIT_FAILED if found else 0


def _verify_objects(cfg: Config, args, conn, site_id, rate: float, known: set[str]):
    """storage verify's reading with the mail on object storage: each object downloaded (streamed,
    not cached) and hashed. Returns (mails, bytes, [(queue ID, problem)], start time)."""
    import time

    from storage.object_check import verify_objects
    from storage.s3 import S3Client, S3Location

    started = shown = time.monotonic()
    count = done_bytes = 0
    found: list[tuple[str, str]] = []

    def note(queue_id: str, size: int, problem: str | None) -> None:
        nonlocal count, done_bytes, shown
        count += 1
        done_bytes += size
        if problem is not None:
            found.append((queue_id, problem))
            print(f"DAMAGED {queue_id}: {problem}{' (known before)' if queue_id in known else ''}", flush=True)
        if not args.quiet and time.monotonic() - shown >= 2.0:
            shown = time.monotonic()
            print(
                f"verify: {count} mail(s), {human_size(done_bytes)},"
                f" {human_size(done_bytes / max(shown - started, 1e-3))}/s, {len(found)} damaged",
                file=sys.stderr,
                flush=True,
            )

    client = S3Client(s3_settings(cfg))
    location = S3Location.parse(cfg.storage.object_store)
    with _terminate_as_interrupt():
        asyncio.run(verify_objects(conn, client, location, note, site_id, rate))
    return count, done_bytes, found, started


def _damaged(cfg: Config, args) -> int:
    from storage.verify import damaged_mails

    conn = cfg.index_location.connect_readonly()
    try:
        rows = damaged_mails(conn)
    finally:
        conn.close()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "queue_id": q,
                        "reason": r,
                        "found_by": by,
                        "found_at": iso_time(at),
                        "quarantine": e,
                        "stored": size is not None,
                        "size": size,
                        "mailboxes": (sites or "").split(",") if sites else [],
                    }
                    for q, r, by, at, e, size, sites in rows
                ],
                indent=2,
            )
        )
        return 0
    if not rows:
        print("no damaged mails known")
    for queue_id, reason, by, at, entry, size, sites in rows:
        where = f"in the mailbox of {sites}" if sites else ("stored" if size is not None else "deleted since")
        print(
            f"{iso_time(at, millis=False)}  {queue_id}  found by {by}: {printable(reason)}\n    {where};"
            f" quarantine copy: {entry or '(none)'}"
        )
    return 0
