# `mailhub site key import|show`, `mailhub site policy` and `mailhub directory
# fingerprint|export|export-key|rotate-key`: the directory commands of the CLI. They work on the
# index and the data folder directly, beside a running hub, which picks key, policy and hub key
# changes up by itself (and announces a hub key rotation). Exit status as in cli.py.
import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import TypedDict

from .config import Config

EXIT_FAILED = 1


class _KeyShown(TypedDict):
    """One key of a site as `mailhub site key show` lists it (also its --json form)."""

    fingerprint: str
    encryption_key_ids: list[str]
    imported_at: str | None
    retired_at: str | None
    state: str
    armored: str


def directory_command(cfg: Config, args) -> int:
    from directory import DirectoryError
    from storage import SiteError

    from .cli import open_index

    conn = open_index(cfg)
    if conn is None:
        return EXIT_FAILED
    try:
        if args.command == "directory":
            return _directory(cfg, conn, args)
        if args.site_command == "policy":
            return _policy(conn, args)
        return _key(cfg, conn, args)
    except (DirectoryError, SiteError) as exc:
        print(f"mailhub: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except sqlite3.Error as exc:
        print(f"mailhub: index error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        conn.close()


def _key(cfg: Config, conn, args) -> int:
    from directory import DirectoryError, import_key, site_keys
    from directory.document import group_fingerprint, timestamp
    from storage.sites import get_site

    if args.key_command == "import":
        try:
            data = Path(args.file).read_bytes()
        except OSError as exc:
            raise DirectoryError(f"cannot read {args.file}: {exc.strerror}") from None
        parsed = import_key(conn, args.name, data)
        print(
            f"key {group_fingerprint(parsed.fingerprint)} is now the current key of site {args.name}"
            f" (encryption key ID(s) {', '.join(parsed.encryption_key_ids)})"
        )
        return 0
    site = get_site(conn, args.name)
    grace = cfg.directory.key_grace_days * 86400
    now = time.time()
    keys: list[_KeyShown] = [
        {
            "fingerprint": k.fingerprint,
            "encryption_key_ids": list(k.encryption_key_ids),
            "imported_at": _timestamp(k.imported_at),
            "retired_at": _timestamp(k.retired_at),
            "state": "current"
            if k.retired_at is None
            else "previous (valid until " + timestamp(k.retired_at + grace) + ")"
            if k.usable(now, grace)
            else "expired",
            "armored": k.armored,
        }
        for k in site_keys(conn, site.id)
    ]
    if args.json:
        print(json.dumps({"name": site.name, "keys": keys}, indent=2))
        return 0
    if not keys:
        print(f"site {site.name} has no key; import one with: mailhub site key import {site.name} FILE")
        return 0
    for k in keys:
        print(f"{k['state']}: {group_fingerprint(k['fingerprint'])}")
        print(f"  encryption key ID(s): {', '.join(k['encryption_key_ids'])}")
        print(f"  imported: {k['imported_at']}" + (f", replaced: {k['retired_at']}" if k["retired_at"] else ""))
    if args.armor and keys[0]["retired_at"] is None:
        print(keys[0]["armored"].rstrip("\n"))
    return 0


def _policy(conn, args) -> int:
    from directory import set_policy

    set_policy(conn, args.name, args.encryption)
    print(f"encryption policy of site {args.name}: {args.encryption}")
    return 0


def _directory(cfg: Config, conn, args) -> int:
    from directory import directory_mail, load_or_create_hub_keys, read_document, to_json, to_text

    if args.directory_command == "rotate-key":
        return _rotate_key(cfg, conn, args)
    keys = load_or_create_hub_keys(cfg.data_dir, _hub_addresses(cfg), _hub_key_grace(cfg))
    if args.directory_command == "fingerprint":
        print(keys.fingerprint)
        return 0
    if args.directory_command == "export-key":
        return _export_key(conn, keys, args)
    document = read_document(conn, keys, cfg.domain, cfg.directory.address)
    if args.format == "json":
        output = to_json(document).encode()
    elif args.format == "text":
        output = to_text(document).encode()
    else:
        output = directory_mail(
            document, keys, _hub_addresses(cfg)[0], "undisclosed-recipients:;", "Participant directory"
        )
    _write(args.output, output)
    return 0


def _export_key(conn, keys, args) -> int:
    """The published public key(s) to stdout (or --output); what they are to stderr."""
    from directory.mailer import announced_key_stamp, key_stamp

    if args.fingerprint_only:
        print(keys.fingerprint)
        return 0
    armored, binary = keys.published()
    _write(args.output, binary if args.binary else armored.encode("ascii"))
    print(f"current hub key: {keys.fingerprint}", file=sys.stderr)
    rotation = keys.rotation()
    if rotation:
        state = (
            f"co-signs until {rotation['previous_signs_until']}"
            if keys.in_grace()
            else f"retired since {rotation['previous_signs_until']}"
        )
        print(
            f"previous hub key: {rotation['previous_fingerprint']} (replaced {rotation['rotated_at']}; {state})",
            file=sys.stderr,
        )
        announced = announced_key_stamp(conn)
        if announced is not None and announced != key_stamp(keys.fingerprint):
            print(
                "the rotation is not announced to the sites yet: a running hub sends the announcement"
                " within seconds, a stopped one when it starts",
                file=sys.stderr,
            )
    return 0


def _rotate_key(cfg: Config, conn, args) -> int:
    from directory import DirectoryError, load_hub_keys, rotate_hub_key
    from directory.hub_key import archive_path
    from directory.mailer import announced_key_stamp, key_stamp, note_hub_key_announced

    grace = _hub_key_grace(cfg)
    keys = load_hub_keys(cfg.data_dir, grace)
    if keys is None:
        raise DirectoryError(
            "there is no hub key to rotate yet (the first start or `mailhub directory fingerprint` makes one)"
        )
    announced = announced_key_stamp(conn)
    if (
        announced is not None
        and announced != key_stamp(keys.fingerprint)
        and keys.previous is not None
        and not args.force
    ):
        raise DirectoryError(
            f"the previous rotation ({keys.previous_fingerprint} -> {keys.fingerprint}) is not"
            " announced to the sites yet; start the hub, which announces it, and rotate"
            " after that (or pass --force: sites that missed it cannot follow)"
        )
    note_hub_key_announced(conn, keys.fingerprint)  # the key the sites know, if nothing was recorded yet
    if keys.in_grace():
        print(f"note: the key before, {keys.previous_fingerprint}, stops co-signing now", file=sys.stderr)
    previous, new = rotate_hub_key(cfg.data_dir, _hub_addresses(cfg))
    days = cfg.directory.hub_key_grace_days
    print(
        f"hub key rotated: {previous.fingerprint} -> {new.fingerprint}\n"
        f"The new key is certified by the previous one, which is kept in"
        f" {archive_path(cfg.data_dir, previous.fingerprint)}\n"
        f"and co-signs directory mails for {days:g} day(s) (directory.hub_key_grace_days).",
        file=sys.stderr,
    )
    print(_announcement(cfg, new.fingerprint), file=sys.stderr)
    print(new.fingerprint)
    return 0


def _announcement(cfg: Config, fingerprint: str) -> str:
    """Ask the running hub to announce the rotation now; what became of it, for the operator."""
    from .control import ControlError, request

    later = (
        "The hub announces the rotation to every site, in a mail signed by both keys, when it starts"
        " (log line 'hub key rotation ... announced')."
    )
    try:
        answer = request(cfg.data_dir, "hub-key-announce", timeout=120)
    except ControlError as exc:
        return f"{exc}\n{later}"
    if answer.get("fingerprint") != fingerprint:
        return f"the running hub still signs with {answer.get('fingerprint')}; see its log.\n{later}"
    if answer.get("kind") == "key_rotation":
        return (
            f"The running hub announced the rotation to {answer['sites']} site(s), in a mail signed by both"
            f" keys (queued as {answer['queue_id']})."
        )
    return "The running hub had announced the rotation already (or there is no site to tell)."


def _hub_addresses(cfg: Config) -> list[str]:
    """The directory address of each local domain, the first one's first."""
    return [f"{cfg.directory.address}@{domain}" for domain in cfg.domain]


def _hub_key_grace(cfg: Config) -> float:
    return cfg.directory.hub_key_grace_days * 86400


def _write(output: str | None, data: bytes) -> None:
    if output:
        Path(output).write_bytes(data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()


def _timestamp(seconds: float | None) -> str | None:
    from directory.document import timestamp

    return None if seconds is None else timestamp(seconds)
