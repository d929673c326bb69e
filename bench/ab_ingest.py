# Side-by-side SMTP ingest of two versions of the hub (this checkout and a base commit, checked out
# into a temporary git worktree), in one run on loopback: each round starts each version fresh in
# an empty folder, in alternating order, and sends one workload for at least --seconds; the table
# shows every round and the median ratios this/base of the throughput and of the hub's CPU time
# per unit (its process and the index writer's: on a shared, loaded machine the CPU time varies far
# less than the wall time). For checking what a change to the receive path costs.
#   .venv/bin/python -m bench.ab_ingest --base 8e0198b [--workload 50MB 10KB] [--rounds 4] [--seconds 10]
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from bench.common import REPO_ROOT, argument_parser, command_line
from bench.ingest_benchmark import HUB_DOMAIN, PASSWORD, RECEIVER, SENDER, WORKLOADS, hub_server
from bench.smtp_blast import blast, make_body
from loadtest.thirdparty import LOOPBACK

# figures of more than the receiver could drain in time: the throttle's admission stays out of it
UNTHROTTLED = {"MAILHUB_THROTTLE_DRAIN_ADMISSION": "false", "MAILHUB_THROTTLE_PACING": "false"}


@contextlib.contextmanager
def worktree(commit: str):
    """A temporary git worktree of `commit` (detached), removed on exit. Yields its path."""
    path = tempfile.mkdtemp(prefix="ab-base-")
    subprocess.run(["git", "worktree", "add", "--detach", path, commit], cwd=REPO_ROOT, check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", path], cwd=REPO_ROOT, capture_output=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children (the index writer), in seconds."""
    total = 0.0
    pids = [pid]
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids += [int(child) for child in f.read().split()]
    for each in pids:
        with contextlib.suppress(OSError):
            with open(f"/proc/{each}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def run(checkout: str, workload, mails: int, body: bytes) -> dict:
    _name, _label, size, sessions, _counts, _unit = workload
    workdir = tempfile.mkdtemp(prefix="ab-ingest-")
    try:
        log_path = os.path.join(workdir, "hub.log")
        with hub_server(workdir, log_path, extra_env=UNTHROTTLED, checkout=checkout) as hub:
            port, pid = hub.port, hub.proc.pid
            cpu_before = cpu_seconds(pid)
            result = asyncio.run(
                blast(
                    LOOPBACK,
                    port,
                    sessions=sessions,
                    mails=mails,
                    size=size,
                    body=body,
                    user=SENDER,
                    password=PASSWORD,
                    mail_from=f"{SENDER}@{HUB_DOMAIN}",
                    rcpt=f"{RECEIVER}@{HUB_DOMAIN}",
                )
            )
            result["cpu"] = cpu_seconds(pid) - cpu_before
            return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        os.sync()


def calibrated_count(checkout: str, workload, body: bytes, seconds: float) -> int:
    """Mails for a figure of at least `seconds`: probes grow until one lasts a second (a probe of a
    few mails mostly measures the sessions' start), then its rate sets the count, with 20 % spare."""
    sessions = workload[3]
    mails = 2 * sessions
    while True:
        probe = run(checkout, workload, mails, body)
        if probe["seconds"] >= min(1.0, seconds / 4):
            return max(mails, int(probe["mails"] / probe["seconds"] * seconds * 1.2))
        mails *= 4


def main() -> int:
    ap = argument_parser(
        "bench.ab_ingest", "SMTP ingest of this checkout against a base commit, side by side in alternating rounds"
    )
    ap.add_argument("--base", required=True, help="commit to compare this checkout with")
    ap.add_argument(
        "--workload",
        nargs="+",
        default=["50MB", "10KB"],
        choices=[w[0] for w in WORKLOADS],
        help="workloads to run (default 50MB 10KB)",
    )
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds (default 4)")
    ap.add_argument("--seconds", type=float, default=10.0, help="at least this long per figure")
    args = ap.parse_args()
    print(command_line("bench.ab_ingest"), flush=True)
    with worktree(args.base) as base:
        sides = {"this": str(REPO_ROOT), "base": base}
        for workload in (w for w in WORKLOADS if w[0] in args.workload):
            name, label, size, sessions, _counts, unit = workload
            body = make_body(max(0, size - 160))
            key = "mb_per_s" if unit == "MB/s" else "mails_per_s"
            mails = calibrated_count(sides["this"], workload, body, args.seconds)
            per_unit = unit.split("/")[0].rstrip("s")  # "MB" or "mail"
            figures: dict[str, list[float]] = {"this": [], "base": []}
            cpu: dict[str, list[float]] = {"this": [], "base": []}  # ms of hub CPU per MB or per mail
            print(f"{label}: {mails} mails per figure, {args.rounds} alternating rounds", flush=True)
            for round_no in range(args.rounds):
                order = ("this", "base") if round_no % 2 == 0 else ("base", "this")
                for side in order:
                    result = run(sides[side], workload, mails, body)
                    assert result["failures"] == 0, result
                    figures[side].append(result[key])
                    per = result["bytes"] / 1e6 if unit == "MB/s" else result["mails"]
                    cpu[side].append(1000 * result["cpu"] / per)
                    print(
                        f"  round {round_no + 1} {side}: {result[key]} {unit}, hub CPU {cpu[side][-1]:.3f} ms"
                        f" per {per_unit} ({result['seconds']:.1f} s, load {os.getloadavg()[0]:.1f})",
                        flush=True,
                    )
            for what, values in (("throughput", figures), (f"CPU per {per_unit}", cpu)):
                ratios = [a / b for a, b in zip(values["this"], values["base"])]
                print(
                    f"{label}, {what}: this {statistics.median(values['this']):.3f} vs base"
                    f" {statistics.median(values['base']):.3f} (medians); this/base per round"
                    f" {', '.join(f'{r:.3f}' for r in ratios)}; median {statistics.median(ratios):.3f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
