# The `mailhub` command: serve, check the config, manage sites and the outbound queue, trace mails,
# report volumes, prune the tracking events. These work on the index directly (SQLite WAL), so they
# run beside a live server, which picks site and queue changes up by itself; trace and stats only read.
# Exit status: 0 done, 1 the operation failed, 2 bad usage or configuration, 3 (reload) a restart is
# needed, 141 output's reader gone.
import argparse
import functools
import getpass
import json
import math
import os
import secrets
import signal
import sqlite3
import string
import sys
import time
from typing import Any

from . import config
from .audit_cli import audit_command, audit_parser, operator_name
from .entry import quiet_on_closed_pipe, version
from .expiry_cli import expire_command, expiry_parsers, retention_summary, retention_text, set_retention
from .liveness import render as render_liveness
from .mailbox_cli import mailbox_command, mailbox_parsers
from .report_format import human_size, iso_time, printable
from .stats import render_activity, site_activity, site_liveness
from .storage_cli import storage_command, storage_parsers
from .trace import KINDS as TRACE_KINDS

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_RESTART_NEEDED = 3  # `mailhub reload`: reloaded, but some changed settings wait for a restart
# Bits no file or folder the hub creates grants: its data (mail, index, ledger, keys) is its user's alone
# (files 0600, folders 0700), whatever the umask it was started with (docs/operator-guide.md#storage-and-durability).
PRIVATE_UMASK = 0o077


@functools.cache  # built once per process: main() runs many times in one (the tests, loadtest's site adder)
def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", metavar="FILE", help="TOML config file (default: built-in)")
    parser = argparse.ArgumentParser(prog="mailhub", description="DICOM Mail Hub")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("serve", parents=[common], help="run the hub")
    commands.add_parser(
        "check",
        parents=[common],
        help="validate the configuration and exit",
        description="Also checks the TLS certificate (expired, expiring within 30 days, key not its key), "
        "MAILHUB_* variables that are no setting, and the data folder (writable, free space). Exit status 2 "
        "on an error; warnings are printed and the check passes.",
    )
    commands.add_parser(
        "restart",
        parents=[common],
        help="graceful restart of the running hub (as SIGUSR2), for settings a reload cannot change",
        description="The new configuration is checked first (refused: the hub keeps running). The hub stops as "
        "for SIGTERM (transactions in flight get shutdown_timeout) but keeps its listening sockets open, so no "
        "connection is refused; a new hub in the same process takes them over. Waits until it answers.",
    )
    config_command = commands.add_parser("config", help="the effective configuration")
    config_commands = config_command.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    show_config = config_commands.add_parser(
        "show",
        parents=[common],
        help="print every setting with its value and where it came from (default, file, environment)",
    )
    show_config.add_argument("--json", action="store_true")
    commands.add_parser(
        "reload",
        parents=[common],
        help="make the running hub read its configuration and certificate again (as SIGHUP does)",
        description="Open sessions go on. Exit status 0: reloaded; 3: reloaded, but some changed settings "
        "need a restart (listed); 1: refused (the hub keeps its configuration) or the hub is not running.",
    )

    site = commands.add_parser("site", help="manage sites (participants)")
    site_commands = site.add_subparsers(dest="site_command", required=True, metavar="SUBCOMMAND")
    add = site_commands.add_parser("add", parents=[common], help="add a site")
    add.add_argument("name")
    add.add_argument("--address", action="append", required=True, help="e-mail address (repeatable)")
    add.add_argument(
        "--contact", metavar="ADDRESS", help="where the site's liveness notices go (liveness.notify_sites)"
    )
    _password_options(add)
    modify = site_commands.add_parser("modify", parents=[common], help="change a site's attributes")
    modify.add_argument("name")
    modify.add_argument(
        "--contact", metavar="ADDRESS", required=True, help="contact address for notices ('' removes it)"
    )
    show = site_commands.add_parser("show", parents=[common], help="show one site")
    show.add_argument("name")
    show.add_argument("--json", action="store_true")
    listing = site_commands.add_parser("list", parents=[common], help="list sites")
    listing.add_argument("--json", action="store_true")
    passwd = site_commands.add_parser("passwd", parents=[common], help="set a site's password")
    passwd.add_argument("name")
    _password_options(passwd)
    verify = site_commands.add_parser(
        "verify", parents=[common], help="check a password against a site's (exit 0 matches, 1 differs)"
    )
    verify.add_argument("name")
    verify.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    remove = site_commands.add_parser("remove", parents=[common], help="remove a site and its mailbox")
    remove.add_argument("name")
    limits = site_commands.add_parser(
        "set",
        parents=[common],
        help="set a site's quotas and drain-time limit",
        description="Each VALUE is a number (sizes may take K, M, G, T), 'unlimited', or 'default' "
        "(back to the config's [quotas] value).",
    )
    limits.add_argument("name")
    for name in _LIMIT_OPTIONS:
        limits.add_argument("--" + name.replace("_", "-"), dest=name, metavar="VALUE")
    limits.add_argument(
        "--retention-days",
        metavar="DAYS",
        help="days mail may wait unfetched (0: keep; 'default': lifecycle.retention_days)",
    )
    _directory_parsers(commands, site_commands, common)
    storage_parsers(commands, common)
    mailbox_commands = mailbox_parsers(commands, common)
    expiry_parsers(mailbox_commands, common)

    trace = commands.add_parser("trace", parents=[common], help="where is a mail or a study?")
    trace.add_argument("query", help="queue ID, Message-ID, sender or recipient address, or X-TELEMEDICINE-SETID")
    how = trace.add_mutually_exclusive_group()
    for kind, meaning in TRACE_KINDS.items():
        how.add_argument(
            f"--{kind}",
            dest="kind",
            action="store_const",
            const=kind,
            help=f"QUERY is {meaning} (default: guessed from its form)",
        )
    how.add_argument("--study", dest="kind", action="store_const", const="set", help="the same as --set")
    trace.add_argument(
        "--limit",
        type=_positive,
        default=100,
        metavar="N",
        help="for an address: the N most recent mails and refusals (default 100)",
    )
    trace.add_argument("--json", action="store_true")
    stats = commands.add_parser("stats", parents=[common], help="volumes, refusals and backlogs of a period")
    stats.add_argument("--since", default="24h", help="24h, 7d, 2026-11-01, 2026-11-01T12:00 (UTC; default 24h)")
    stats.add_argument("--until", default="now", help="same forms as --since (default now)")
    stats.add_argument("--top", type=_positive, default=10, metavar="N", help="largest backlogs shown (default 10)")
    stats.add_argument("--json", action="store_true")
    events = commands.add_parser("events", help="the tracking record behind trace and stats")
    events_commands = events.add_subparsers(dest="events_command", required=True, metavar="SUBCOMMAND")
    prune = events_commands.add_parser("prune", parents=[common], help="delete events past their retention")
    prune.add_argument("--older-than", type=float, metavar="DAYS", help="default: events.retention_days")
    sessions = commands.add_parser("sessions", parents=[common], help="who is connected to the running hub")
    sessions.add_argument("--kick", metavar="SITE", help="end this site's sessions (each protocol's goodbye)")
    sessions.add_argument("--json", action="store_true")
    sessions.add_argument(
        "--all", action="store_true", help="every node's sessions (several nodes on PostgreSQL: asked through it)"
    )
    auth = commands.add_parser("auth", help="password-guessing penalties and blocks of the running hub")
    auth_commands = auth.add_subparsers(dest="auth_command", required=True, metavar="SUBCOMMAND")
    blocks = auth_commands.add_parser(
        "blocks", parents=[common], help="list penalised client addresses and blocked (site, address) pairs"
    )
    blocks.add_argument("--json", action="store_true")
    unblock = auth_commands.add_parser(
        "unblock",
        parents=[common],
        help="lift the blocks and the penalty of a client address",
        description="Without --site: every block of ADDRESS and its penalty delay; with --site: only the "
        "block of that site from ADDRESS.",
    )
    unblock.add_argument("address", help="client address (an IPv6 address stands for its /64)")
    unblock.add_argument("--site", help="only the block of this site (as it was given at login)")
    queue = commands.add_parser("queue", help="inspect and manage the outbound relay queue")
    queue_commands = queue.add_subparsers(dest="queue_command", required=True, metavar="SUBCOMMAND")
    qlist = queue_commands.add_parser("list", parents=[common], help="list queued mail")
    qlist.add_argument("--json", action="store_true")
    retry = queue_commands.add_parser("retry", parents=[common], help="retry queued mail now")
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("queue_id", nargs="?", help="one message")
    which.add_argument("--all", action="store_true", help="every queued message")
    qdelete = queue_commands.add_parser("delete", parents=[common], help="drop queued mail without delivery")
    qdelete.add_argument("queue_id")
    qdelete.add_argument("--rcpt", help="only this recipient")
    audit_parser(commands, common)
    return parser


# `site set` options: limit name -> (unit shown, whether 'unlimited' is allowed)
_LIMIT_OPTIONS = {
    "mailbox_bytes": ("size", True),
    "mailbox_messages": ("count", True),
    "max_message_size": ("size", True),
    "submitted_per_day": ("size", True),
    "submitted_per_month": ("size", True),
    "received_per_day": ("size", True),
    "received_per_month": ("size", True),
    "max_drain_time": ("seconds", False),
    "downlink": ("size/s", False),
}


def _password_options(command: argparse.ArgumentParser) -> None:
    """How `site add` and `site passwd` get the new password (interactively by default)."""
    how = command.add_mutually_exclusive_group()
    how.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    how.add_argument(
        "--generate-password",
        action="store_true",
        help="make a random password (32 characters), set it and print it once",
    )


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _directory_parsers(commands, site_commands, common) -> None:
    key = site_commands.add_parser("key", help="a site's OpenPGP public key")
    key_commands = key.add_subparsers(dest="key_command", required=True, metavar="SUBCOMMAND")
    key_import = key_commands.add_parser(
        "import", parents=[common], help="make FILE (armored or binary public key) the site's current key"
    )
    key_import.add_argument("name")
    key_import.add_argument("file")
    key_show = key_commands.add_parser("show", parents=[common], help="show the site's current and previous keys")
    key_show.add_argument("name")
    key_show.add_argument("--armor", action="store_true", help="also print the current key, armored")
    key_show.add_argument("--json", action="store_true")
    policy = site_commands.add_parser("policy", parents=[common], help="override the encryption policy for a site")
    policy.add_argument("name")
    policy.add_argument("--encryption", required=True, choices=["on", "off", "default"])

    directory = commands.add_parser("directory", help="the participant directory and the hub's signing key")
    directory_commands = directory.add_subparsers(dest="directory_command", required=True, metavar="SUBCOMMAND")
    directory_commands.add_parser(
        "fingerprint", parents=[common], help="the hub signing key's fingerprint (creates the key if missing)"
    )
    export = directory_commands.add_parser("export", parents=[common], help="write the participant directory")
    export.add_argument("--output", metavar="FILE", help="file to write (default: standard output)")
    export.add_argument(
        "--format",
        choices=["json", "text", "signed"],
        default="json",
        help="json (default), text, or signed: the PGP/MIME multipart/signed entity",
    )
    export_key = directory_commands.add_parser(
        "export-key",
        parents=[common],
        help="write the hub's public signing key(s), armored (creates the key if missing)",
        description="The current key, and during a rotation's grace period the previous one too, to standard"
        " output; their fingerprints and state to standard error.",
    )
    export_key.add_argument("--output", metavar="FILE", help="file to write (default: standard output)")
    export_key.add_argument("--binary", action="store_true", help="binary OpenPGP keys instead of armored text")
    export_key.add_argument(
        "--fingerprint-only",
        action="store_true",
        help="print only the current key's fingerprint (as `directory fingerprint`)",
    )
    rotate = directory_commands.add_parser(
        "rotate-key",
        parents=[common],
        help="replace the hub's signing key by a new one certified by it",
        description="Makes a new hub key, certifies it with the current one, keeps the current one in"
        " DATA_DIR/hub-keys/ and makes the new one current. The hub announces the rotation to every"
        " site in a mail signed by both keys; the previous key co-signs directory mails for"
        " directory.hub_key_grace_days. Prints the new fingerprint.",
    )
    rotate.add_argument(
        "--force",
        action="store_true",
        help="rotate even though the previous rotation was not announced to the sites yet",
    )


@quiet_on_closed_pipe
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    umask = os.umask(PRIVATE_UMASK)
    os.umask(umask | PRIVATE_UMASK)
    try:
        return _command(args)
    finally:
        os.umask(umask)  # as it was for the rest of a program that calls main() (the tests, loadtest's site adder)


def _command(args) -> int:
    try:
        cfg = config.load(args.config)
    except config.ConfigError as exc:
        print(f"mailhub: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "check":
        return _check(cfg, args)
    if args.command == "config":
        from .config_show import render, rows

        print(json.dumps(rows(cfg), indent=2) if args.json else render(cfg))
        return 0
    if args.command == "serve":
        return _serve(cfg)
    if args.command == "reload":
        return _reload(cfg)
    if args.command == "restart":
        return _restart(cfg)
    if args.command == "queue":
        return _queue_command(cfg, args)
    if args.command == "auth":
        return _auth_command(cfg, args)
    if args.command == "sessions":
        from .sessions_control import sessions_command

        return sessions_command(cfg, args)
    if args.command in ("trace", "stats"):
        return _report_command(cfg, args)
    if args.command == "events":
        return _prune_events(cfg, args.older_than if args.older_than is not None else cfg.events.retention_days)
    if args.command == "storage":
        return storage_command(cfg, args)
    if args.command == "audit":
        return audit_command(cfg, args)
    if args.command == "mailbox" and args.mailbox_command == "expire":
        return expire_command(cfg, args)
    if args.command == "mailbox":
        return mailbox_command(cfg, args)
    if args.command == "directory" or args.site_command in ("key", "policy"):
        from .directory_cli import directory_command

        return directory_command(cfg, args)
    return _site_command(cfg, args)


def _check(cfg: config.Config, args) -> int:
    from .check import ERROR, findings

    problem = _tls_problem(cfg)
    if problem:
        print(f"mailhub: config error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    found = findings(cfg, os.environ)
    for finding in found:
        print(f"mailhub: {'config error' if finding.level == ERROR else 'warning'}: {finding.text}", file=sys.stderr)
    if any(finding.level == ERROR for finding in found):
        return EXIT_USAGE
    print(f"config ok ({args.config or 'built-in defaults'})")
    return 0


def _tls_problem(cfg: config.Config) -> str | None:
    """Why the certificate and key cannot serve TLS (e.g. a key of another certificate), or None."""
    import ssl

    from .hub import tls_context

    try:
        tls_context(cfg)
    except (ssl.SSLError, OSError) as exc:
        return f"tls.cert_file: cannot load {cfg.tls.cert_file} with {cfg.tls.key_file}: {exc}"
    return None


def _serve(cfg: config.Config) -> int:
    import uvloop

    from directory import DirectoryError
    from storage import StorageError
    from storage.db import IndexDamaged
    from storage.recovery import IndexBehind
    from storage.writer_launcher import LAUNCHER

    from .logsetup import setup_logging
    from .server import serve

    setup_logging(cfg.log.level, cfg.log.format)
    from .handover import exec_serving, inherited_sockets

    # SIGHUP reloads and SIGUSR2 restarts once the hub runs (mailhub/hub.py); until then neither
    # may end the process.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        try:
            kept = uvloop.run(serve(cfg, inherited_sockets()))
        finally:  # its writers ended with storage; an exec's new program would inherit it as a zombie
            LAUNCHER.stop()
        if kept:  # a graceful restart: the new hub in this process's place, with the listening sockets
            exec_serving(kept)
    except (IndexDamaged, IndexBehind) as exc:  # the operator's turn: the message says what to run
        print(f"mailhub: cannot start: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, DirectoryError, StorageError, sqlite3.Error) as exc:
        print(f"mailhub: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _reload(cfg: config.Config) -> int:
    answer = ask_hub(cfg, "reload")
    if answer is None:
        return EXIT_FAILED
    changed = answer["changed"]
    print(f"reloaded: {'changed ' + ', '.join(changed) if changed else 'no live setting changed'}")
    if answer.get("certificate"):
        print(f"serving certificate {answer['certificate']}")
    if answer["restart_needed"]:
        print(
            f"not changed, needs a restart (systemctl restart mailhub): {', '.join(answer['restart_needed'])}",
            file=sys.stderr,
        )
        return EXIT_RESTART_NEEDED
    return 0


def _restart(cfg: config.Config) -> int:
    from .control import ControlError, request

    answer = ask_hub(cfg, "restart")
    if answer is None:
        return EXIT_FAILED
    print(f"restarting (transactions in flight get up to {answer['shutdown_timeout']:.0f} s) ...", flush=True)
    deadline = time.monotonic() + answer["shutdown_timeout"] + 120
    stopped = False
    while time.monotonic() < deadline:
        try:
            request(cfg.data_dir, "help", timeout=5)
        except ControlError:
            stopped = True  # the old hub closed its control socket; the new one opens it when ready
        else:
            if stopped:
                print(f"restarted: process {answer['pid']} serves again; no listening socket was closed")
                return 0
        time.sleep(0.1)
    print(
        f"mailhub: the hub did not answer again within {answer['shutdown_timeout'] + 120:.0f} s; "
        "see its log (journalctl -u mailhub)",
        file=sys.stderr,
    )
    return EXIT_FAILED


def _auth_command(cfg: config.Config, args) -> int:
    if args.auth_command == "unblock":
        fields = {"address": args.address} | ({"site": args.site} if args.site is not None else {})
        answer = ask_hub(cfg, "auth.unblock", **fields)
        if answer is None:
            return EXIT_FAILED
        what = f"site {printable(args.site)!r} from {answer['address']}" if args.site else answer["address"]
        if not answer["removed"]:
            print(f"nothing to lift for {what}")
            return EXIT_FAILED
        print(f"lifted: {what}")
        return 0
    answer = ask_hub(cfg, "auth.blocks")
    if answer is None:
        return EXIT_FAILED
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    rows = answer["addresses"]
    if not rows:
        print("no penalised addresses, no blocks")
    else:
        print(f"{'ADDRESS':<28} {'DELAY':>7} {'FAILURES':>8}  BLOCKED SITES")
        for row in rows:
            blocked = (
                ", ".join(
                    f"{printable(b['account'])} ({math.ceil(b['seconds_left'] / 60)} min left,"
                    f" {b['failures']} failures)"
                    for b in row["blocks"]
                )
                or "-"
            )
            print(f"{row['address']:<28} {row['delay']:>6.1f}s {row['failures']:>8}  {blocked}")
    if answer.get("checks_waiting"):
        print(f"{answer['checks_waiting']} password check(s) waiting")
    return 0


def ask_hub(cfg: config.Config, cmd: str, **fields) -> dict | None:
    """The running hub's answer to a control-socket request (mailhub/control.py), or None after
    printing one line saying why there is none (the caller then exits with EXIT_FAILED)."""
    from .control import ControlError, request

    try:
        return request(cfg.data_dir, cmd, **fields)
    except ControlError as exc:
        print(f"mailhub: {exc}", file=sys.stderr)
        return None


def open_index(cfg: config.Config, readonly: bool = False) -> Any:
    """A connection to the index (storage.index: SQLite in data_dir, or PostgreSQL; a
    storage.sql.Connection), or None after saying why there is none (one line, no password)."""
    from storage import StorageError

    index = cfg.index_location
    try:
        return index.connect_readonly() if readonly else index.connect()
    except StorageError as exc:  # PostgreSQL unreachable (the message names it, without a password)
        print(f"mailhub: {exc}", file=sys.stderr)
        return None
    except (OSError, sqlite3.Error) as exc:
        print(f"mailhub: cannot open the index at {index.where()}: {exc}", file=sys.stderr)
        return None


def _site_command(cfg: config.Config, args) -> int:
    from storage import SiteError, liveness, sites, usage
    from storage.passwords import verify_password

    conn = open_index(cfg)
    if conn is None:
        return EXIT_FAILED
    try:
        action = args.site_command
        if action == "add":
            reserved = [a for a in args.address if a.rpartition("@")[0].lower() == cfg.directory.address]
            if reserved:
                raise SiteError(f"address {reserved[0]!r} is the participant directory's (directory.address)")
            contact = liveness.validate_contact(args.contact) if args.contact else None
            password = _new_password(args)
            site = sites.add_site(conn, args.name, args.address, password, cfg.domain)
            if contact:
                liveness.set_contact(conn, site.id, contact)
            print(f"site {site.name} added with address(es) {', '.join(site.addresses)}")
            _show_generated(args, password)
        elif action == "modify":
            site = sites.get_site(conn, args.name)
            liveness.set_contact(conn, site.id, args.contact)
            print(f"contact of site {site.name}: {args.contact or 'none'}")
        elif action == "passwd":
            password = _new_password(args)
            sites.set_password(conn, args.name, password)
            print(f"password of site {args.name} changed")
            _show_generated(args, password)
        elif action == "verify":
            if not verify_password(_read_password(args), sites.get_site(conn, args.name).password_hash):
                print(f"password of site {args.name} differs")
                return EXIT_FAILED
            print(f"password of site {args.name} matches")
        elif action == "remove":
            dropped = sites.remove_site(conn, args.name, operator_name())
            print(f"site {args.name} removed ({dropped} mail(s) in its mailbox dropped)")
        elif action == "set":
            values = _limit_values(args)
            if not values and args.retention_days is None:
                raise SiteError("nothing to set: give at least one limit option (see mailhub site set --help)")
            if values:
                usage.set_limits(conn, args.name, values)
                print(
                    f"limits of site {args.name} set: "
                    + ", ".join(
                        f"{k}={'default' if v is None else 'unlimited' if v == usage.UNLIMITED else v}"
                        for k, v in values.items()
                    )
                )
            if args.retention_days is not None:
                print(set_retention(conn, args.name, args.retention_days))
        elif action == "show":
            site = sites.get_site(conn, args.name)
            summary = _site_summary(conn, site, cfg)
            summary["activity"] = site_activity(conn, site.id, site.name, time.time())
            summary["liveness"] = site_liveness(conn, site.id, cfg.liveness.stale_after, time.time())
            _print_site(summary, args.json)
        elif action == "list":
            summaries = [_site_summary(conn, s, cfg) for s in sites.list_sites(conn)]
            if args.json:
                print(json.dumps(summaries, indent=2))
            elif not summaries:
                print("no sites")
            for s in [] if args.json else summaries:
                print(
                    f"{s['name']:<24} {s['mailbox_messages']:>7} mails {human_size(s['mailbox_bytes']):>10}  "
                    f"{', '.join(s['addresses'])}"
                )
        return 0
    except SiteError as exc:
        print(f"mailhub: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except sqlite3.Error as exc:
        print(f"mailhub: index error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        conn.close()


def _queue_command(cfg: config.Config, args) -> int:
    from storage import StorageError, outbound

    conn = open_index(cfg)
    if conn is None:
        return EXIT_FAILED
    try:
        action = args.queue_command
        if action == "list":
            _print_queue(outbound.all_rows(conn, cfg.data_dir / "blobs"), args.json)
            return 0
        if action == "retry":
            count = outbound.retry_queued(conn, time.time(), None if args.all else args.queue_id)
            verb = "to be retried now"
        else:
            count = outbound.drop_queued(conn, args.queue_id, args.rcpt)
            verb = "deleted"
        if count == 0 and not getattr(args, "all", False):
            print(f"mailhub: no queued recipient matches {args.queue_id}", file=sys.stderr)
            return EXIT_FAILED
        print(f"{count} queued recipient(s) {verb}")
        return 0
    except (sqlite3.Error, StorageError) as exc:
        print(f"mailhub: index error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        conn.close()


def _print_queue(rows, as_json: bool) -> None:
    entries = [
        {
            "queue_id": r.queue_id,
            "rcpt": r.rcpt,
            "sender": r.mail_from,
            "size": r.size,
            "queued_at": iso_time(r.queued_at, millis=False),
            "attempts": r.attempts,
            "next_attempt_at": iso_time(r.next_attempt_at, millis=False),
            "last_error": r.last_error,
        }
        for r in rows
    ]
    if as_json:
        print(json.dumps(entries, indent=2))
        return
    if not entries:
        print("queue empty")
    for e in entries:
        print(
            f"{e['queue_id']}  {human_size(e['size']):>10}  {e['queued_at']}  <{printable(e['sender'])}> -> "
            f"<{printable(e['rcpt'])}>  attempts={e['attempts']} next={e['next_attempt_at']}"
        )
        if e["last_error"]:
            print(f"    {printable(e['last_error'])}")


def _new_password(args) -> str:
    """The password `site add` or `site passwd` sets: generated (32 letters and digits, 190 bits,
    nothing a gateway's configuration file or a shell would need quoted) or read as `site verify` reads one."""
    if args.generate_password:
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(32))
    return _read_password(args)


def _show_generated(args, password: str) -> None:
    if args.generate_password:
        print(f"generated password (shown only now): {password}")


def _read_password(args) -> str:
    from storage import SiteError

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Repeat password: ") != password:
            raise SiteError("passwords differ")
    else:
        raise SiteError("no password: use --password-stdin or run interactively")
    return password


def _limit_values(args) -> dict[str, float | None]:
    from storage import SiteError, usage

    values: dict[str, float | None] = {}
    for name, (unit, unlimited_ok) in _LIMIT_OPTIONS.items():
        text = getattr(args, name)
        if text is None:
            continue
        if text == "default":
            values[name] = None
        elif text == "unlimited" and unlimited_ok:
            values[name] = usage.UNLIMITED
        else:
            try:
                value = float(text) if unit == "seconds" else config.parse_size(text)
            except ValueError:
                value = None
            if value is None or not math.isfinite(value) or value <= 0 and not unlimited_ok:
                allowed = "a number" + (", 'unlimited'" if unlimited_ok else "") + " or 'default'"
                raise SiteError(f"--{name.replace('_', '-')}: expected {allowed}, got {text!r}")
            values[name] = value
    return values


def _site_summary(conn: sqlite3.Connection, site, cfg: config.Config) -> dict:
    from storage import reports, usage

    count, size = reports.mailbox_totals(conn, site.id)
    sessions, messages, octets, seconds, first, last = usage.download_totals(conn, site.id)
    return {
        "name": site.name,
        "addresses": site.addresses,
        **_quota_summary(conn, site, cfg),
        "retention": retention_summary(conn, site.id, cfg),
        "created_at": iso_time(site.created_at, millis=False),
        "mailbox_messages": count,
        "mailbox_bytes": size,
        "downloads": {
            "sessions": sessions,
            "messages": messages,
            "bytes": octets,
            "send_seconds": round(seconds, 6),
            "first_poll_at": iso_time(first, millis=False),
            "last_poll_at": iso_time(last, millis=False),
        },
    }


def _quota_summary(conn: sqlite3.Connection, site, cfg: config.Config) -> dict:
    """Effective limits (and where each comes from), usage against them, and the server's live
    throttle state as it last wrote it."""
    from quotas import merge_limits
    from storage import usage

    from .throttling import settings_from_config

    overrides = usage.read_limits(conn).get(site.id, {})
    effective = merge_limits(settings_from_config(cfg).defaults, overrides)
    used = usage.site_usage(conn, site.id, time.time())
    limits = {}
    for name in usage.LIMIT_NAMES:
        value = getattr(effective, "downlink_prior" if name == "downlink" else name)
        limits[name] = {"limit": value, "source": "site" if name in overrides else "config", "used": used.get(name)}
    state = usage.read_throttle_state(conn, site.id)
    throttle = None
    if state is not None:
        updated_at, figures = state
        throttle = {"updated_at": iso_time(updated_at, millis=False), **figures}
    return {
        "limits": limits,
        "waiting_bytes": used["waiting_bytes"],
        "waiting_messages": used["waiting_messages"],
        "throttle": throttle,
    }


def _print_site(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    print(f"site:      {summary['name']}")
    print(f"addresses: {', '.join(summary['addresses'])}")
    print(f"created:   {summary['created_at']}")
    print(
        f"mailbox:   {summary['mailbox_messages']} mail(s), {human_size(summary['mailbox_bytes'])}"
        f" ({summary['waiting_messages']} mail(s), {human_size(summary['waiting_bytes'])} not downloaded yet)"
    )
    print("limits:")
    for name, item in summary["limits"].items():
        print(
            f"  {name:<20} {_limit_text(name, item['used'], item['limit'])}"
            f"{'' if item['source'] == 'config' else '  (site)'}"
        )
    print(f"retention: {retention_text(summary['retention'])}")
    _print_throttle(summary["throttle"])
    d = summary["downloads"]
    if d["last_poll_at"] is None:
        print("downloads: never polled")
    else:
        rate = f", {human_size(d['bytes'] / d['send_seconds'])}/s while sending" if d["send_seconds"] > 0 else ""
        print(f"downloads: {d['messages']} mail(s), {human_size(d['bytes'])} in {d['sessions']} session(s){rate}")
        print(f"last poll: {d['last_poll_at']}")
    for line in render_activity(summary["activity"]):
        print(f"activity:  {line}")
    print(f"liveness:  {render_liveness(summary['liveness'])}")
    print(f"contact:   {summary['liveness']['contact'] or 'none'}")


def _limit_text(name: str, used, limit) -> str:
    if name == "max_drain_time":
        return f"{limit:.0f} s"
    if name == "downlink":
        return f"{human_size(limit)}/s assumed until measured"
    fmt = str if name == "mailbox_messages" else human_size
    shown = "unlimited" if limit is None else fmt(limit)
    if used is None:
        return shown
    ratio = f" ({100.0 * used / limit:.1f}%)" if limit else ""
    return f"{fmt(used)} of {shown}{ratio}"


def _print_throttle(state: dict | None) -> None:
    if state is None:
        print("throttle:  no live state yet (the server writes it every few seconds while it runs)")
        return
    rate = state["drain_rate"]
    drain = "unbounded (not downloading)" if state["drain_time"] == float("inf") else f"{state['drain_time']:.0f} s"
    print(
        f"throttle:  as of {state['updated_at']}: drain rate {human_size(rate)}/s"
        f"{' (offline)' if state['offline'] else ''}"
        f"{' (prior, not measured yet)' if not state['drain_samples'] else ''},"
        f" drain time {drain} of {state['max_drain_time']:.0f} s"
        f"{', SATURATED: new mail is deferred' if state['saturated'] else ''}"
    )
    if state["paced_rate"]:
        print(f"           senders paced to {human_size(state['paced_rate'])}/s")
    if state["deferrals"]:
        print(
            f"           {state['deferrals']} deferral(s) since the server started,"
            f" last {state['last_deferral_reason']}"
            f" at {iso_time(state['last_deferral_at'], millis=False)}"
        )


def _report_command(cfg: config.Config, args) -> int:
    from . import stats, trace

    if args.command == "stats":
        now = time.time()
        try:
            since, until = stats.parse_when(args.since, now), stats.parse_when(args.until, now)
        except ValueError as exc:
            print(f"mailhub: {exc}", file=sys.stderr)
            return EXIT_USAGE
    conn = open_index(cfg, readonly=True)
    if conn is None:
        return EXIT_FAILED
    try:
        if args.command == "stats":
            result = stats.report(conn, since, until, args.top, cfg.liveness.stale_after, now)
            print(json.dumps(result, indent=2) if args.json else stats.render(result))
            return 0
        result = trace.trace(conn, args.query, args.kind, args.limit)
        found = result["mails"] or result["refusals"]
        if args.json:
            print(json.dumps(result, indent=2))
        elif found:
            print(trace.render(result))
        if not found:
            print(
                f"mailhub: nothing known about {args.query!r} (looked up as a {result['looked_up_as']})",
                file=sys.stderr,
            )
        return 0 if found else EXIT_FAILED
    except sqlite3.Error as exc:
        print(f"mailhub: index error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        conn.close()


def _prune_events(cfg: config.Config, days: float) -> int:
    from storage import events

    conn = open_index(cfg)
    if conn is None:
        return EXIT_FAILED
    try:
        pruned = events.prune(conn, time.time() - days * 86400)
    except sqlite3.Error as exc:
        print(f"mailhub: index error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        conn.close()
    print(f"pruned {pruned} event(s) older than {days:g} day(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
