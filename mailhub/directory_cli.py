# `mailhub site key import|show`, `mailhub site policy` and `mailhub directory fingerprint|export`:
# the directory commands of the CLI. They work on the index and the data folder directly, beside a
# running hub, which picks key and policy changes up by itself. Exit status as in cli.py.
import json
import sqlite3
import sys
import time
from pathlib import Path

EXIT_FAILED = 1


def directory_command(cfg, args) -> int:
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


def _key(cfg, conn, args) -> int:
    from directory import DirectoryError, import_key, site_keys
    from directory.document import group_fingerprint
    from storage.sites import get_site

    if args.key_command == "import":
        try:
            data = Path(args.file).read_bytes()
        except OSError as exc:
            raise DirectoryError(f"cannot read {args.file}: {exc.strerror}") from None
        parsed = import_key(conn, args.name, data)
        print(f"key {group_fingerprint(parsed.fingerprint)} is now the current key of site {args.name}"
              f" (encryption key ID(s) {', '.join(parsed.encryption_key_ids)})")
        return 0
    site = get_site(conn, args.name)
    grace = cfg.directory.key_grace_days * 86400
    now = time.time()
    keys = [{"fingerprint": k.fingerprint, "encryption_key_ids": list(k.encryption_key_ids),
             "imported_at": _timestamp(k.imported_at), "retired_at": _timestamp(k.retired_at),
             "state": "current" if k.retired_at is None else
                      "previous (valid until " + _timestamp(k.retired_at + grace) + ")" if k.usable(now, grace)
                      else "expired",
             "armored": k.armored} for k in site_keys(conn, site.id)]
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


def _directory(cfg, conn, args) -> int:
    from directory import directory_mail, load_or_create_hub_key, read_document, to_json, to_text

    hub_key = load_or_create_hub_key(cfg.data_dir, f"{cfg.directory.address}@{cfg.domain[0]}")
    if args.directory_command == "fingerprint":
        print(hub_key.fingerprint)
        return 0
    document = read_document(conn, hub_key.fingerprint, cfg.domain, cfg.directory.address)
    if args.format == "json":
        output = to_json(document).encode()
    elif args.format == "text":
        output = to_text(document).encode()
    else:
        sender = f"{cfg.directory.address}@{cfg.domain[0]}"
        output = directory_mail(document, hub_key, sender, "undisclosed-recipients:;", "Participant directory")
    if args.output:
        Path(args.output).write_bytes(output)
    else:
        sys.stdout.buffer.write(output)
    return 0


def _timestamp(seconds: float | None) -> str | None:
    from directory.document import timestamp

    return None if seconds is None else timestamp(seconds)
