# The `mailhub-loadtest` command: generate a corpus, run a profile against a spawned hub or any
# SMTP + POP3/IMAP server, write RESULT.json and the HTML report, compare two results.
# Exit status: 0 passed, 1 the run failed its integrity checks, 2 bad usage, profile or target,
# 141 standard output's reader gone (mailhub/entry.py).
# Must never target a non-loopback host without --allow-remote.
from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import shutil
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from mailhub.entry import quiet_on_closed_pipe, version

EXIT_FAILED, EXIT_USAGE = 1, 2
# The modules of the `loadtest` extra (pyproject.toml): without them, say which install is missing.
EXTRAS = ("pydicom", "pgpy", "numpy", "matplotlib")
INSTALL_EXTRAS = "pip install '.[loadtest]' in the hub's source folder (or pip install 'dicom-mail-hub[loadtest]')"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailhub-loadtest", description="Network load generator with integrity checks for the DICOM Mail Hub"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = sub.add_parser("generate", help="build the corpus (DICOM, PGP/MIME) of a profile")
    gen.add_argument("profile", help="profile name (smoke, pilot, westgerman, mismatch) or TOML path")
    gen.add_argument("--corpus", required=True, type=Path, metavar="DIR")
    run = sub.add_parser("run", help="run a profile and check every mail")
    run.add_argument("profile")
    run.add_argument("--corpus", required=True, type=Path, metavar="DIR")
    run.add_argument("--out", required=True, type=Path, metavar="RESULT.json")
    run.add_argument("--report", type=Path, metavar="REPORT.html", help="default: RESULT.html beside --out")
    where = run.add_mutually_exclusive_group(required=True)
    where.add_argument("--spawn-local", action="store_true", help="start a throw-away local hub")
    where.add_argument("--smtp", metavar="HOST:PORT", help="SMTP submission address of the server under test")
    run.add_argument("--pop3", metavar="HOST:PORT")
    run.add_argument("--imap", metavar="HOST:PORT")
    run.add_argument(
        "--accounts",
        type=Path,
        metavar="FILE",
        help="TOML {site = {login, password}} for a foreign server (default: the corpus passwords)",
    )
    run.add_argument("--label", help="name of the target in reports")
    run.add_argument("--drain-timeout", type=float, metavar="S", help="override the profile's drain_timeout_s")
    run.add_argument(
        "--speed",
        type=float,
        default=1.0,
        metavar="X",
        help="compress the arrival times X-fold (a stress run of the same corpus)",
    )
    run.add_argument("--generate", action="store_true", help="build the corpus first if missing or stale")
    run.add_argument("--no-deep-check", action="store_true", help="skip decrypting (body digests are still checked)")
    run.add_argument("--keep-received", type=Path, metavar="DIR", help="keep downloaded mails here")
    run.add_argument("--keep-hub", action="store_true", help="do not delete the spawned hub's data folder")
    run.add_argument(
        "--hub-env",
        action="append",
        default=[],
        metavar="MAILHUB_NAME=VALUE",
        help="a setting for the spawned hub, e.g. MAILHUB_QUOTAS_MAX_DRAIN_TIME=10 (repeatable)",
    )
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--allow-remote", action="store_true", help="allow non-loopback targets")
    cmp_ = sub.add_parser("compare", help="print the ratios of two results (B / A)")
    cmp_.add_argument("a", type=Path)
    cmp_.add_argument("b", type=Path)
    rep = sub.add_parser("report", help="write the HTML report of a result")
    rep.add_argument("result", type=Path)
    rep.add_argument("--html", type=Path, required=True)
    return parser


def _hub_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.startswith("MAILHUB_"):
            raise SystemExit(f"mailhub-loadtest: --hub-env expects MAILHUB_NAME=VALUE, got {pair!r}")
        env[name] = value
    return env


@quiet_on_closed_pipe
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _command(args)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing not in EXTRAS:
            raise
        print(
            f"mailhub-loadtest: {missing} is missing: install the tool's extras with {INSTALL_EXTRAS}", file=sys.stderr
        )
        return EXIT_USAGE


def _command(args) -> int:
    from .corpus import CorpusError
    from .profile import ProfileError
    from .runner import Unsupported
    from .spawn import SpawnError

    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "run":
            return _run(args)
        if args.command == "compare":
            from .compare import compare_files

            print(compare_files(args.a, args.b))
            return 0
        if args.command == "report":
            from .report import write_report

            write_report(json.loads(args.result.read_text()), args.html)
            print(f"report written to {args.html}")
            return 0
    except BrokenPipeError:  # standard output's reader went away: the entry point ends quietly
        raise
    except (ProfileError, CorpusError, Unsupported, SpawnError, ValueError, OSError) as exc:
        print(f"mailhub-loadtest: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_USAGE


def _generate(args) -> int:
    from .corpus import generate, print_progress
    from .profile import load_profile

    profile = load_profile(args.profile)
    manifest = generate(profile, args.corpus, print_progress)
    print(
        f"corpus of {profile.name}: {len(manifest['studies'])} studies, {manifest['mails']} mails, "
        f"{manifest['bytes'] / 1e6:.1f} MB in {args.corpus}"
    )
    return 0


def _accounts(path: Path | None, profile) -> dict:
    accounts = dict(profile.accounts)
    if path is not None:
        data = tomllib.loads(path.read_text()) if path.suffix != ".json" else json.loads(path.read_text())
        accounts.update(data.get("accounts", data))
    return accounts


def _run(args) -> int:
    from . import checks, results
    from . import corpus as corpus_mod
    from .net import check_loopback, parse_hostport
    from .profile import load_profile
    from .runner import Target, run
    from .spawn import LocalHub

    profile = load_profile(args.profile)
    try:
        manifest = corpus_mod.load(profile, args.corpus)
    except corpus_mod.CorpusError as exc:
        if not args.generate:
            generate = shlex.join(["mailhub-loadtest", "generate", args.profile, "--corpus", str(args.corpus)])
            raise corpus_mod.CorpusError(f"{exc}: run `{generate}` first, or add --generate to this command") from None
        manifest = corpus_mod.generate(profile, args.corpus, corpus_mod.print_progress)
    hub = None
    try:
        if args.spawn_local:
            hub = LocalHub(profile.domain, keep=args.keep_hub, extra_env=_hub_env(args.hub_env))
            if not args.no_progress:
                print(f"spawning a hub in {hub.dir} with {len(manifest['sites'])} site(s)", file=sys.stderr)
            hub.add_sites({n: s for n, s in manifest["sites"].items()})
            ports = hub.start()
            target = Target(
                "mailhub (spawned)",
                ("127.0.0.1", ports["smtp"]),
                ("127.0.0.1", ports["pop3"]) if "pop3" in ports else None,
                ("127.0.0.1", ports["imap"]) if "imap" in ports else None,
                imap_note="the hub has no IMAP listener (imap.listen is empty)",
            )
        else:
            smtp = parse_hostport(args.smtp)
            pop3 = parse_hostport(args.pop3) if args.pop3 else None
            imap = parse_hostport(args.imap) if args.imap else None
            if not args.allow_remote:
                for addr in filter(None, (smtp, pop3, imap)):
                    check_loopback(addr[0])
            target = Target(args.label or f"smtp {args.smtp}", smtp, pop3, imap, _accounts(args.accounts, profile))
        if args.label:
            target.label = args.label
        save_dir = args.keep_received or Path(tempfile.mkdtemp(prefix="loadtest-received-"))
        save_dir.mkdir(parents=True, exist_ok=True)
        started = time.time()
        try:
            rec, timeline, outcome = asyncio.run(
                run(
                    profile,
                    manifest,
                    args.corpus,
                    target,
                    save_dir,
                    args.drain_timeout,
                    not args.no_progress,
                    args.speed,
                )
            )
            if hub is not None:
                hub.stop()
                hub = None
            verdict = checks.check(manifest, args.corpus, rec, deep=not args.no_deep_check)
        finally:
            if args.keep_received is None:
                shutil.rmtree(save_dir, ignore_errors=True)
        addresses = {
            "smtp": "%s:%d" % target.smtp,
            "pop3": "%s:%d" % target.pop3 if target.pop3 else None,
            "imap": "%s:%d" % target.imap if target.imap else None,
        }
        result = results.build(profile, manifest, target.label, addresses, rec, timeline, outcome, verdict, started)
        result["run"]["speed"] = args.speed
    finally:
        if hub is not None:
            hub.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    report_path = args.report or args.out.with_suffix(".html")
    try:
        from .report import write_report

        write_report(result, report_path)
    except ImportError as exc:  # matplotlib missing: the JSON is still complete
        print(f"mailhub-loadtest: no HTML report ({exc}; {INSTALL_EXTRAS})", file=sys.stderr)
    for line in result["problems"][:20]:
        print(f"  {line}", file=sys.stderr)
    if result["problems_total"] > 20:
        print(f"  ... {result['problems_total'] - 20} more in {args.out}", file=sys.stderr)
    print(results.headline(result))
    print(f"result: {args.out}  report: {report_path}")
    return 0 if result["passed"] else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
