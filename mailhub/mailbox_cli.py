# `mailhub mailbox list|show|export|delete|return|search`: what an operator does with one mail or a
# few when a site calls (Postfix's postqueue/postcat/postsuper, Dovecot's doveadm fetch/expunge/
# search). Reading (list, show, search, export's bytes) goes to the index and the blob files
# directly, beside a running hub. Changes (delete, return, export's audit record) go to the running
# hub over its control socket (mailhub/mailbox_ops.py), so that its POP3 and IMAP sessions hear of
# them; with the hub stopped, this command opens the storage itself under the data folder's lock.
# Every change is audited with the operator's user name (storage/audit.py).
# Must never: decrypt or interpret a mail's body, export bytes that do not match the stored SHA-256
# into a file, write a mail to a terminal, delete more than what was listed and confirmed, or print
# client-controlled text (headers, addresses) unescaped.
import asyncio
import contextlib
import hashlib
import json
import os
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .audit_cli import operator_name
from .config import Config, parse_size
from .report_format import human_size, iso_time, printable

EXIT_FAILED, EXIT_USAGE = 1, 2
CHUNK = 1024 * 1024
MAX_HEADER = 64 * 1024  # bytes of a mail's header block `show` reads
SHOW_LIMIT = 20  # mails listed before a deletion is confirmed


class MailboxCommandError(Exception):
    """One line for the operator; exit status 1 (or 2 for usage)."""

    def __init__(self, message: str, status: int = EXIT_FAILED):
        super().__init__(message)
        self.status = status


def mailbox_parsers(commands, common):
    """Add `mailbox` and its subcommands; returns its subparsers (expiry adds `expire` to them)."""
    mailbox = commands.add_parser(
        "mailbox", help="mailbox administration: list, show, export, delete, return, search, expire"
    )
    sub = mailbox.add_subparsers(dest="mailbox_command", required=True, metavar="SUBCOMMAND")
    filters = _filter_options()
    listing = sub.add_parser("list", parents=[common, filters], help="a site's mailbox, one line per mail")
    listing.add_argument("site")
    listing.add_argument("--json", action="store_true")
    show = sub.add_parser("show", parents=[common], help="one mail's headers and MIME structure (never its body)")
    show.add_argument("site")
    show.add_argument("queue_id")
    show.add_argument("--json", action="store_true")
    export = sub.add_parser(
        "export",
        parents=[common],
        help="one mail's raw bytes, checked against its SHA-256",
        description="Writes the mail as stored (CRLF, with the hub's Received: line) to FILE or to stdout (not a"
        " terminal). Refused when the bytes do not match the SHA-256 recorded at ingest. Audited.",
    )
    export.add_argument("site")
    export.add_argument("queue_id")
    export.add_argument("-o", "--output", metavar="FILE", help="a new file (default: stdout)")
    delete = sub.add_parser(
        "delete",
        parents=[common, filters],
        help="delete one mail, several, or those matching filters",
        description="Deletes the mails named by queue ID, or those matching the filters (--all: every mail of the"
        " mailbox). Lists them and asks first unless --yes. Audited as deleted_by_operator.",
    )
    delete.add_argument("site")
    delete.add_argument("queue_ids", nargs="*", metavar="QUEUE_ID")
    delete.add_argument("--all", action="store_true", help="every mail of the mailbox (with the filters: all matching)")
    delete.add_argument("--yes", action="store_true", help="do not ask")
    delete.add_argument("--json", action="store_true")
    ret = sub.add_parser(
        "return",
        parents=[common],
        help='remove a mail and send its sender an RFC 3464 notice naming it ("not for us")',
        description="The notice names the mail by queue ID, Message-ID and study, never its content. Audited as"
        " returned.",
    )
    ret.add_argument("site")
    ret.add_argument("queue_id")
    ret.add_argument("--reason", default="not for this site", help="said in the notice (default: not for this site)")
    ret.add_argument("--yes", action="store_true", help="do not ask")
    ret.add_argument("--json", action="store_true")
    search = sub.add_parser("search", parents=[common], help="find a mail or a study in every mailbox")
    by = search.add_mutually_exclusive_group(required=True)
    by.add_argument("--message-id", help="with the angle brackets, as in the header")
    by.add_argument("--study", metavar="SETID", help="X-TELEMEDICINE-SETID")
    search.add_argument("--json", action="store_true")
    return sub


def _filter_options():
    import argparse

    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument("--older-than", metavar="SPAN", help="arrived longer ago than this: 12h, 7d, 2w")
    filters.add_argument("--study", metavar="SETID", help="of this study (X-TELEMEDICINE-SETID)")
    filters.add_argument("--sender", metavar="ADDRESS", help="from this envelope sender")
    filters.add_argument("--larger-than", metavar="SIZE", help="larger than this: 10M, 500K, 1G")
    return filters


def mailbox_command(cfg: Config, args) -> int:
    try:
        handler = {
            "list": _list,
            "show": _show,
            "export": _export,
            "delete": _delete,
            "return": _return,
            "search": _search,
        }[args.mailbox_command]
        return handler(cfg, args)
    except MailboxCommandError as exc:
        print(f"mailhub: {exc}", file=sys.stderr)
        return exc.status
    except sqlite3.Error as exc:
        print(f"mailhub: index error: {exc}", file=sys.stderr)
        return EXIT_FAILED


# ---- reading ------------------------------------------------------------------------------------


def _read(cfg: Config, function, *args, **kwargs):
    from storage.errors import StorageError

    try:
        conn = cfg.index_location.connect_readonly()
    except (OSError, sqlite3.Error, StorageError) as exc:
        raise MailboxCommandError(f"cannot open the index at {cfg.index_location.where()}: {exc}") from None
    try:
        return function(conn, *args, **kwargs)
    finally:
        conn.close()


def _site_id(cfg: Config, site: str) -> int:
    from storage import mailbox_admin

    site_id = _read(cfg, mailbox_admin.site_id_of, site)
    if site_id is None:
        raise MailboxCommandError(f"no site named {printable(site)!r} (mailhub site list shows them)")
    return int(site_id)


def _filters(args) -> dict[str, Any]:
    from .stats import parse_when

    found: dict[str, Any] = {}
    try:
        if args.older_than:
            found["arrived_before"] = parse_when(args.older_than, time.time())
        if args.larger_than:
            found["larger_than"] = parse_size(args.larger_than)
    except ValueError as exc:
        raise MailboxCommandError(str(exc), EXIT_USAGE) from None
    if args.study:
        found["study"] = args.study
    if args.sender:
        found["sender"] = args.sender
    return found


def _entries(cfg: Config, site: str, queue_ids: list[str] | None = None, **filters):
    from storage import mailbox_admin

    site_id = _site_id(cfg, site)
    return _read(cfg, mailbox_admin.site_entries, site_id, queue_ids=queue_ids, **filters)


def _one(cfg: Config, site: str, queue_id: str):
    entries = _entries(cfg, site, [queue_id])
    if not entries:
        raise MailboxCommandError(
            f"no mail {printable(queue_id)} in the mailbox of {printable(site)}"
            f" (mailhub mailbox search, mailhub trace {printable(queue_id)} tell where it went)"
        )
    return entries[0]


def _study(e) -> str:
    if not e.set_id:
        return "-"
    return f"{printable(e.set_id)} {e.set_part or '?'}/{e.set_total or '?'}"


def _print_entries(entries, as_json: bool, with_site: bool = False) -> None:
    if as_json:
        print(json.dumps([_entry_json(e) for e in entries], indent=2))
        return
    if not entries:
        print("no mail matches", file=sys.stderr)
        return
    site_column = f"{'SITE':<16} " if with_site else ""
    print(
        f"{site_column}{'QUEUE ID':<20} {'ARRIVED (UTC)':<20} {'SIZE':>10} {'FETCHED':<7} {'SENDER':<28}"
        " MESSAGE-ID  STUDY PART/TOTAL"
    )
    for e in entries:
        site = f"{printable(e.site):<16} " if with_site else ""
        print(
            f"{site}{e.queue_id:<20} {iso_time(e.arrived_at, millis=False)!s:<20} {human_size(e.size):>10}"
            f" {'yes' if e.fetched_at is not None else 'no':<7} {printable(e.sender or '<>'):<28}"
            f" {printable(e.message_id or '-')}  {_study(e)}"
        )


def _entry_json(e) -> dict[str, Any]:
    d = e.as_dict()
    d["arrived"] = iso_time(e.arrived_at)
    d["fetched_time"] = iso_time(e.fetched_at)
    return d


def _list(cfg: Config, args) -> int:
    _print_entries(_entries(cfg, args.site, **_filters(args)), args.json)
    return 0


def _search(cfg: Config, args) -> int:
    from storage import mailbox_admin

    entries = _read(cfg, mailbox_admin.search, message_id=args.message_id, study=args.study)
    _print_entries(entries, args.json, with_site=True)
    return 0 if entries else EXIT_FAILED


def _show(cfg: Config, args) -> int:
    from storage import mailbox_admin

    entry = _one(cfg, args.site, args.queue_id)
    structure_text = _read(cfg, mailbox_admin.structure_json, entry.queue_id)
    with _blob_file(cfg, entry) as path:
        head = _read_header(path, entry.offset, entry.size)
    headers = _header_fields(head)
    parts = _parts(json.loads(structure_text)) if structure_text else None
    if args.json:
        print(json.dumps({"mail": _entry_json(entry), "headers": headers, "structure": parts}, indent=2))
        return 0
    print(f"mail {entry.queue_id} in the mailbox of {printable(entry.site)} (uid {entry.uid})")
    print(f"  arrived   {iso_time(entry.arrived_at)}   size {human_size(entry.size)} ({entry.size} bytes)")
    print(f"  sender    {printable(entry.sender or '<>')}   recipient {printable(entry.rcpt)}")
    print(f"  fetched   {iso_time(entry.fetched_at) or 'no'}   study {_study(entry)}")
    print(f"  sha256    {entry.sha256}")
    print("headers:")
    for name, value in headers:
        print(f"  {printable(name)}: {printable(value)}")
    print("structure:" if parts is not None else "structure: not recorded (stored before structures were)")
    for part in parts or []:
        extra = ", ".join(
            printable(f"{k} {part[k]}") for k in ("encoding", "filename", "description") if part.get(k) is not None
        )
        print(
            f"  {'  ' * part['depth']}{part['part']:<8} {printable(part['type']):<40} {human_size(part['size']):>10}"
            + (f"  ({extra})" if extra else "")
        )
    return 0


def _read_header(path, offset: int, size: int) -> bytes:
    """The mail's header block (up to MAX_HEADER bytes): the hub's Received: line and the sender's."""
    try:
        with open(path, "rb") as f:
            data = os.pread(f.fileno(), min(size, MAX_HEADER), offset)
    except OSError as exc:
        raise MailboxCommandError(f"cannot read the mail's blob {path}: {exc.strerror}") from None
    end = data.find(b"\r\n\r\n")
    return data[: end + 2] if end >= 0 else data


def _header_fields(head: bytes) -> list[list[str]]:
    """[name, unfolded value] per header field, in order."""
    fields: list[list[str]] = []
    for line in head.decode("utf-8", "replace").split("\r\n"):
        if not line:
            continue
        if line[0] in " \t" and fields:
            fields[-1][1] += " " + line.strip()
        elif ":" in line:
            name, _, value = line.partition(":")
            fields.append([name, value.strip()])
    return fields


def _parts(record: dict, number: str = "", depth: int = 0) -> list[dict[str, Any]]:
    """The MIME parts of a recorded structure (relay/mime/structure.py), numbered as IMAP does."""
    disposition = record.get("disposition") or [None, {}]
    params = disposition[1] if isinstance(disposition, list) and len(disposition) > 1 else {}
    found = [
        {
            "part": number or "mail",
            "depth": depth,
            "type": f"{record.get('type', '?')}/{record.get('subtype', '?')}".lower(),
            "size": max(0, int(record.get("be", 0)) - int(record.get("bs", 0))),
            "encoding": record.get("encoding"),
            "filename": (params or {}).get("filename") or (record.get("params") or {}).get("name"),
            "description": record.get("description"),
        }
    ]
    children = record.get("parts") or []
    for i, child in enumerate(children, 1):
        found += _parts(child, f"{number}.{i}" if number else str(i), depth + 1)
    inner = record.get("message")
    if isinstance(inner, dict):
        found += _parts(inner, number or "1", depth + 1)
    return found


# ---- export -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _blob_file(cfg: Config, entry) -> Iterator[Path]:
    """The mail's blob file to read: its file in data_dir/blobs/, or (the mail on object storage and
    not in this node's cache) a copy of its object downloaded into spool/ for this command (a name
    start-up recovery removes if the command dies) and removed after."""
    path = entry.path(cfg.data_dir)
    if not cfg.storage.object_store or path.exists():
        yield path
        return
    from storage import envelope
    from storage.files import unlink_quietly
    from storage.s3 import S3Client, S3Error, S3Location
    from storage.spool import new_queue_id

    from .storage_cli import S3SetupError, s3_settings

    try:
        settings = s3_settings(cfg)
    except S3SetupError as exc:
        raise MailboxCommandError(str(exc)) from None
    location = S3Location.parse(cfg.storage.object_store)
    copy = Path(cfg.data_dir).absolute() / "spool" / f"{new_queue_id()}.tmp"
    limit = entry.size + envelope.MAX_RECORD + envelope.HEADER_SIZE
    try:
        asyncio.run(S3Client(settings).get_file(location.bucket, location.key(entry.blob), copy, limit))
    except S3Error as exc:
        raise MailboxCommandError(f"cannot read mail {entry.queue_id} from the object store: {exc}") from None
    try:
        yield copy
    finally:
        unlink_quietly(copy)


def _export(cfg: Config, args) -> int:
    entry = _one(cfg, args.site, args.queue_id)
    with _blob_file(cfg, entry) as path:
        return _export_from(cfg, args, entry, path)


def _export_from(cfg: Config, args, entry, path: Path) -> int:
    actor = operator_name()
    record = [entry.site, entry.queue_id, entry.message_id, entry.set_id, entry.size, entry.sha256, actor]
    if args.output is None:
        if sys.stdout.isatty():
            raise MailboxCommandError("stdout is a terminal: give -o FILE or redirect the output", EXIT_USAGE)
        _verify(path, entry)
        _change(cfg, "mailbox.audit", rows=[record + ["to stdout"]])
        digest = _copy(path, entry, sys.stdout.buffer)
        sys.stdout.buffer.flush()
        if digest != entry.sha256:
            raise MailboxCommandError(f"mail {entry.queue_id} changed on disk while it was written: discard the output")
        return 0
    target = os.path.abspath(args.output)
    if os.path.lexists(target):
        raise MailboxCommandError(f"{args.output} exists already; give a new file name")
    partial = f"{target}.part-{os.getpid()}"
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise MailboxCommandError(f"cannot create {partial}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _copy(path, entry, out)
            out.flush()
            os.fsync(out.fileno())
        if digest != entry.sha256:
            raise MailboxCommandError(_mismatch(entry, digest))
        os.link(partial, target)  # never replaces a file that appeared meanwhile
    except FileExistsError:
        raise MailboxCommandError(f"{args.output} exists already; give a new file name") from None
    finally:
        try:
            os.unlink(partial)
        except FileNotFoundError:
            pass
    _change(cfg, "mailbox.audit", rows=[record + [f"to file {target}"]])
    print(f"mail {entry.queue_id} ({entry.size} bytes, SHA-256 verified) written to {args.output}", file=sys.stderr)
    return 0


def _mismatch(entry, digest: str | None) -> str:
    found = "cut short or missing" if digest is None else f"SHA-256 {digest}"
    return (
        f"refused: the stored bytes of mail {entry.queue_id} do not match what was acknowledged"
        f" ({found}, expected {entry.sha256}); nothing was exported."
        f" Run: mailhub storage verify --site {printable(entry.site)} (docs/integrity.md)"
    )


def _verify(path, entry) -> None:
    digest = _copy(path, entry, None)
    if digest != entry.sha256:
        raise MailboxCommandError(_mismatch(entry, digest))


def _copy(path, entry, out) -> str | None:
    """Stream the mail's bytes (1 MB at a time) into `out` (None: only hash them); their SHA-256,
    or None when the blob is missing or shorter than the mail."""
    sha = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            done = 0
            while done < entry.size:
                chunk = os.pread(f.fileno(), min(CHUNK, entry.size - done), entry.offset + done)
                if not chunk:
                    return None
                sha.update(chunk)
                if out is not None:
                    out.write(chunk)
                done += len(chunk)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise MailboxCommandError(f"cannot read the mail's blob {path}: {exc.strerror}") from None
    return sha.hexdigest()


# ---- changes ------------------------------------------------------------------------------------


def _change(cfg: Config, cmd: str, **fields) -> dict:
    """Ask the running hub (control socket) to make a change; with the hub stopped, make it here
    with a Storage of this process (under the data folder's lock, as the hub would)."""
    from storage.folder_lock import DataFolderInUse, lock_data_folder

    from .control import ControlError, request

    if not cfg.storage.index and not (cfg.data_dir / "index.sqlite3").exists():
        raise MailboxCommandError(f"no index in {cfg.data_dir}: is the data folder right?")
    try:
        os.close(lock_data_folder(cfg.data_dir))
    except DataFolderInUse:  # the hub runs
        try:
            return request(cfg.data_dir, cmd, timeout=120, **fields)
        except ControlError as exc:
            raise MailboxCommandError(str(exc)) from None
    return asyncio.run(_change_here(cfg, cmd, fields))


async def _change_here(cfg: Config, cmd: str, fields: dict) -> dict:
    from storage import Storage, StorageError

    from . import mailbox_ops
    from .control import ControlError

    storage = Storage(
        cfg.data_dir,
        release_freed_after=cfg.storage.release_freed_after,
        reserve_bytes=cfg.storage.reserve_bytes,
        min_free_bytes=cfg.storage.min_free_bytes,
        blobs=cfg.storage.shared_folder,
        node=cfg.node.resolved_name,
        index_url=cfg.storage.index,
    )
    try:
        await storage.open()
    except (StorageError, OSError, sqlite3.Error) as exc:
        raise MailboxCommandError(f"cannot open the mail store (the hub is not running): {exc}") from None
    try:
        if cmd == "mailbox.remove":
            return await mailbox_ops.remove(
                storage, fields["site"], fields["uids"], fields["event"], fields["actor"], fields.get("detail")
            )
        if cmd == "mailbox.return":
            return await mailbox_ops.return_mail(
                storage,
                cfg.relay.hostname or cfg.hostname,
                fields["site"],
                fields["queue_id"],
                fields["actor"],
                fields["reason"],
            )
        return await mailbox_ops.record_export(storage, fields["rows"])
    except ControlError as exc:
        raise MailboxCommandError(str(exc)) from None
    finally:
        await storage.close()


def _confirm(question: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise MailboxCommandError("not asking without a terminal: give --yes", EXIT_USAGE)
    answer = input(f"{question} [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise MailboxCommandError("nothing done")


def _delete(cfg: Config, args) -> int:
    from storage import audit

    filters = _filters(args)
    if not args.queue_ids and not filters and not args.all:
        raise MailboxCommandError(
            "name the mails (QUEUE_ID ...), give filters, or --all for the whole mailbox", EXIT_USAGE
        )
    entries = _entries(cfg, args.site, args.queue_ids or None, **filters)
    missing = sorted(set(args.queue_ids) - {e.queue_id for e in entries})
    if missing:
        raise MailboxCommandError(
            f"not in the mailbox of {printable(args.site)}: {', '.join(printable(q) for q in missing)}; nothing deleted"
        )
    if not entries:
        if args.json:
            print(json.dumps({"deleted": 0, "queue_ids": []}))
        else:
            print(f"no mail in the mailbox of {printable(args.site)} matches; nothing deleted")
        return 0
    if not args.yes:
        _print_entries(entries[:SHOW_LIMIT], False)
        if len(entries) > SHOW_LIMIT:
            print(f"... and {len(entries) - SHOW_LIMIT} more")
    total = sum(e.size for e in entries)
    _confirm(f"Delete {len(entries)} mail(s), {human_size(total)}, from the mailbox of {args.site}?", args.yes)
    actor = operator_name()
    removed: list[int] = []
    for start in range(0, len(entries), 2000):
        batch = entries[start : start + 2000]
        answer = _change(
            cfg,
            "mailbox.remove",
            site=args.site,
            uids=[e.uid for e in batch],
            event=audit.DELETED_BY_OPERATOR,
            actor=actor,
            detail="mailhub mailbox delete",
        )
        removed += answer["removed"]
    removed_uids = set(removed)
    gone = {e.queue_id for e in entries if e.uid in removed_uids}
    if args.json:
        print(json.dumps({"deleted": len(removed), "queue_ids": sorted(gone)}))
    else:
        print(f"{len(removed)} mail(s) deleted from the mailbox of {printable(args.site)}")
        if len(removed) < len(entries):
            print(f"({len(entries) - len(removed)} were gone already: fetched and deleted by the site meanwhile)")
    return 0


def _return(cfg: Config, args) -> int:
    entry = _one(cfg, args.site, args.queue_id)
    if not args.yes:
        _print_entries([entry], False)
    _confirm(
        f"Remove mail {entry.queue_id} from the mailbox of {args.site} and return it to"
        f" <{printable(entry.sender or '')}>?",
        args.yes,
    )
    answer = _change(
        cfg,
        "mailbox.return",
        site=args.site,
        queue_id=entry.queue_id,
        actor=operator_name(),
        reason=args.reason[:300] or "not for this site",
    )
    if args.json:
        print(json.dumps(answer))
    else:
        print(
            f"mail {entry.queue_id} removed from the mailbox of {printable(args.site)};"
            f" notice {answer['notice']} to <{printable(answer['sender'])}> via {answer['via']}"
        )
    return 0
