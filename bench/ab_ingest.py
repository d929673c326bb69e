# Side-by-side SMTP ingest of two versions of the hub (this checkout and a base commit, checked out
# into a temporary git worktree), in one run on loopback: each round starts each version fresh in
# an empty folder, in alternating order, and sends one workload for at least --seconds; the table
# shows every round and the median ratio this/base. For checking that a change to the receive
# path costs nothing measurable (or what it costs).
#   .venv/bin/python -m bench.ab_ingest --base 8e0198b [--workload 50MB 10KB] [--rounds 4] [--seconds 10]
import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from bench.ingest_benchmark import HUB_DOMAIN, PASSWORD, RECEIVER, SENDER, WORKLOADS, hub_env
from bench.smtp_blast import blast, make_body
from bench.thirdparty import LOOPBACK, REPO_ROOT, free_port, wait_banner


@contextlib.contextmanager
def hub_from(checkout: str, workdir: str):
    """`mailhub serve` run from the source tree `checkout` (its own modules first on the path)."""
    data_dir = os.path.join(workdir, "hub-data")
    port = free_port()
    env = hub_env(data_dir, port, extra_env={"PYTHONPATH": checkout})
    command = [sys.executable, "-m", "mailhub.cli"]
    for site in (SENDER, RECEIVER):
        subprocess.run(command + ["site", "add", site, "--address", f"{site}@{HUB_DOMAIN}", "--password-stdin"],
                       input=PASSWORD + "\n", text=True, env=env, cwd=checkout, check=True,
                       capture_output=True, timeout=120)
    with open(os.path.join(workdir, "hub.log"), "ab") as log:
        proc = subprocess.Popen(command + ["serve"], env=env, cwd=checkout, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_banner(port, proc=proc, timeout=60)
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run(checkout: str, workload, mails: int, body: bytes) -> dict:
    _name, _label, size, sessions, _counts, _unit = workload
    workdir = tempfile.mkdtemp(prefix="ab-ingest-")
    try:
        with hub_from(checkout, workdir) as port:
            return asyncio.run(blast(LOOPBACK, port, sessions=sessions, mails=mails, size=size, body=body,
                                     user=SENDER, password=PASSWORD, mail_from=f"{SENDER}@{HUB_DOMAIN}",
                                     rcpt=f"{RECEIVER}@{HUB_DOMAIN}"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        os.sync()


def main() -> int:
    ap = argparse.ArgumentParser(description="SMTP ingest of this checkout against a base commit")
    ap.add_argument("--base", required=True, help="commit to compare this checkout with")
    ap.add_argument("--workload", nargs="+", default=["50MB", "10KB"], choices=[w[0] for w in WORKLOADS])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10.0, help="at least this long per figure")
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix="ab-base-")
    subprocess.run(["git", "worktree", "add", "--detach", base, args.base], cwd=REPO_ROOT, check=True,
                   capture_output=True)
    sides = {"this": str(REPO_ROOT), "base": base}
    try:
        for workload in (w for w in WORKLOADS if w[0] in args.workload):
            name, label, size, sessions, _counts, unit = workload
            body = make_body(max(0, size - 160))
            key = "mb_per_s" if unit == "MB/s" else "mails_per_s"
            probe = run(sides["this"], workload, 2 * sessions, body)   # calibrate the count for --seconds
            mails = max(2 * sessions, int(probe["mails_per_s"] * args.seconds * 1.2))
            figures = {"this": [], "base": []}
            print(f"{label}: {mails} mails per figure, {args.rounds} alternating rounds", flush=True)
            for round_no in range(args.rounds):
                order = ("this", "base") if round_no % 2 == 0 else ("base", "this")
                for side in order:
                    result = run(sides[side], workload, mails, body)
                    assert result["failures"] == 0, result
                    figures[side].append(result[key])
                    print(f"  round {round_no + 1} {side}: {result[key]} {unit} ({result['seconds']:.1f} s,"
                          f" load {os.getloadavg()[0]:.1f})", flush=True)
            ratios = [a / b for a, b in zip(figures["this"], figures["base"])]
            print(f"{label}: this {statistics.median(figures['this'])} vs base {statistics.median(figures['base'])}"
                  f" {unit} (medians); ratio per round {', '.join(f'{r:.3f}' for r in ratios)};"
                  f" median ratio {statistics.median(ratios):.3f}", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", base], cwd=REPO_ROOT, capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
