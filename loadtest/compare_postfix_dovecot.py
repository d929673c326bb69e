# Runs one profile against the hub and against Postfix + Dovecot, and writes both results, both
# HTML reports and the comparison:
#
#   sudo .venv/bin/python -m loadtest.compare_postfix_dovecot smoke --out-dir loadtest-results/
#   (then loadtest-results/{hub,postfix-dovecot}.json/.html and comparison.txt)
#
# Postfix (throw-away config on 127.0.0.1, queue fsynced as always) authenticates the gateways
# through Dovecot's SASL socket and delivers every mail over LMTP into Dovecot's maildirs; the
# receivers poll Dovecot's POP3 (or IMAP for imap-idle sites). Needs root and the Debian packages
# postfix, dovecot-pop3d, dovecot-imapd, dovecot-lmtpd (bench/install-debian-packages.sh), and a
# checkout of this repository (it uses loadtest/thirdparty.py). Must never touch the system's own
# Postfix or Dovecot configuration or listen on anything but loopback.
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _loadtest(*args) -> int:
    cmd = [sys.executable, "-m", "loadtest.cli", *map(str, args)]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=REPO)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the same profile against the hub and Postfix + Dovecot")
    parser.add_argument("profile", nargs="?", default="smoke")
    parser.add_argument("--out-dir", type=Path, default=Path("loadtest-results"))
    parser.add_argument("--corpus", type=Path, help="default: OUT_DIR/corpus-PROFILE")
    parser.add_argument("--skip-hub", action="store_true", help="reuse OUT_DIR/hub.json")
    parser.add_argument("--speed", type=float, default=1.0, help="passed to `run --speed` (stress runs)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("compare_postfix_dovecot: needs root (Postfix and Dovecot drop privileges)", file=sys.stderr)
        return 2
    from .corpus import CorpusError, generate, load, print_progress
    from .profile import load_profile
    from .thirdparty import dovecot_server, postfix_to_lmtp

    out = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    corpus = (args.corpus or out / f"corpus-{args.profile}").resolve()
    profile = load_profile(args.profile)
    try:
        manifest = load(profile, corpus)
    except CorpusError:
        manifest = generate(profile, corpus, print_progress)
    hub_json, pd_json = out / "hub.json", out / "postfix-dovecot.json"
    codes = {}
    if not args.skip_hub:
        codes["hub"] = _loadtest(
            "run",
            args.profile,
            "--spawn-local",
            "--corpus",
            corpus,
            "--out",
            hub_json,
            "--label",
            "mailhub",
            "--speed",
            args.speed,
        )
    users = {name: site["password"] for name, site in manifest["sites"].items()}
    with tempfile.TemporaryDirectory(prefix="loadtest-postfix-dovecot-") as work:
        with dovecot_server(work, users, protocols=("pop3", "imap"), lmtp=True, auth_socket=True) as dovecot:
            with postfix_to_lmtp(work, dovecot["lmtp"], [profile.domain], sasl_path=dovecot["auth_socket"]) as smtp:
                codes["postfix-dovecot"] = _loadtest(
                    "run",
                    args.profile,
                    "--smtp",
                    f"127.0.0.1:{smtp}",
                    "--pop3",
                    f"127.0.0.1:{dovecot['pop3']}",
                    "--imap",
                    f"127.0.0.1:{dovecot['imap']}",
                    "--corpus",
                    corpus,
                    "--out",
                    pd_json,
                    "--label",
                    "postfix+dovecot",
                    "--speed",
                    args.speed,
                )
    if hub_json.exists() and pd_json.exists():
        from .compare import compare_files

        text = compare_files(pd_json, hub_json)
        (out / "comparison.txt").write_text(text + "\n")
        print(text)
        print(f"written: {hub_json}, {pd_json}, their .html reports and {out / 'comparison.txt'}")
    return 0 if all(code == 0 for code in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
