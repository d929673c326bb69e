# Side-by-side SMTP ingest of two versions of the hub (this checkout and a base commit, checked out
# into a temporary git worktree), in one run on loopback: each round starts both versions fresh in
# empty folders and sends one workload to them in turns, slices of about --slice seconds each (the
# first side alternating from round to round), until each had at least --seconds; so a busy phase of
# a shared machine hits both alike. The table shows every round and the median ratios this/base of
# the throughput and of the hub's CPU time per unit (its process and the index writer's: on a shared,
# loaded machine the CPU time varies far less than the wall time), and of its event loop's thread
# alone. For checking what a change to the receive path costs.
#   .venv/bin/python -m bench.ab_ingest --base 8e0198b [--workload 50MB 10KB] [--rounds 4] [--seconds 10]
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile

from bench.common import REPO_ROOT, argument_parser, command_line, descendants, print_ab_summary
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


def _stat_seconds(path: str) -> float:
    """User + system CPU time in a /proc stat file, in seconds (0 if it is gone)."""
    with contextlib.suppress(OSError):
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its descendants (the index writer's launcher and
    the writer), in seconds."""
    return sum(_stat_seconds(f"/proc/{each}/stat") for each in (pid, *descendants(pid)))


def loop_seconds(pid: int) -> float:
    """User + system CPU time of a process's main thread (the hub's event loop), in seconds."""
    return _stat_seconds(f"/proc/{pid}/task/{pid}/stat")


def send(port: int, workload, mails: int, body: bytes) -> dict:
    """One slice: `mails` mails of the workload over its sessions; smtp_blast's result."""
    _name, _label, size, sessions, _counts, _unit = workload
    sender, receiver = f"{SENDER}@{HUB_DOMAIN}", f"{RECEIVER}@{HUB_DOMAIN}"
    logins = {"user": SENDER, "password": PASSWORD, "mail_from": sender, "rcpt": receiver}
    return asyncio.run(blast(LOOPBACK, port, sessions, mails, size, body=body, **logins))


def measure_round(checkouts: dict, workload, mails: int, body: bytes, seconds: float) -> dict:
    """Fresh hubs of every checkout ({side: tree}, in the order to take turns), each sent slices of
    `mails` mails in turns until each has received for `seconds`. Returns {side: totals}."""
    totals = {side: {"mails": 0, "bytes": 0, "seconds": 0.0, "cpu": 0.0, "loop": 0.0} for side in checkouts}
    with contextlib.ExitStack() as stack:
        hubs = {}
        for side, checkout in checkouts.items():
            workdir = tempfile.mkdtemp(prefix="ab-ingest-")
            stack.callback(os.sync)
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
            log_path = os.path.join(workdir, "hub.log")
            hubs[side] = stack.enter_context(hub_server(workdir, log_path, extra_env=UNTHROTTLED, checkout=checkout))
        while True:
            for side, hub in hubs.items():
                cpu_before, loop_before = cpu_seconds(hub.proc.pid), loop_seconds(hub.proc.pid)
                result = send(hub.port, workload, mails, body)
                assert result["failures"] == 0, result
                totals[side]["cpu"] += cpu_seconds(hub.proc.pid) - cpu_before
                totals[side]["loop"] += loop_seconds(hub.proc.pid) - loop_before
                for key in ("mails", "bytes", "seconds"):
                    totals[side][key] += result[key]
            if min(t["seconds"] for t in totals.values()) >= seconds:
                return totals


def slice_count(checkout: str, workload, body: bytes, seconds: float) -> int:
    """Mails for a slice of about `seconds`: probes grow until one lasts a second (a probe of a few
    mails mostly measures the sessions' start), then its rate sets the count."""
    mails = 2 * workload[3]
    while True:
        probe = measure_round({"this": checkout}, workload, mails, body, 0)["this"]
        if probe["seconds"] >= min(1.0, seconds / 2):
            return max(mails, int(probe["mails"] / probe["seconds"] * seconds))
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
    ap.add_argument("--rounds", type=int, default=4, help="rounds (default 4)")
    ap.add_argument("--seconds", type=float, default=10.0, help="at least this long per figure (default 10)")
    ap.add_argument("--slice", type=float, default=2.0, help="seconds of one turn of one side (default 2)")
    args = ap.parse_args()
    print(command_line("bench.ab_ingest"), flush=True)
    with worktree(args.base) as base:
        for workload in (w for w in WORKLOADS if w[0] in args.workload):
            _name, label, size, _sessions, _counts, unit = workload
            body = make_body(max(0, size - 160))
            mails = slice_count(str(REPO_ROOT), workload, body, args.slice)
            per_unit = unit.split("/")[0].rstrip("s")  # "MB" or "mail"
            figures: dict[str, list[float]] = {"this": [], "base": []}
            cpu: dict[str, list[float]] = {"this": [], "base": []}  # ms of hub CPU per MB or per mail
            loop: dict[str, list[float]] = {"this": [], "base": []}  # of it, the event loop's thread
            print(f"{label}: slices of {mails} mails, {args.rounds} rounds", flush=True)
            for round_no in range(args.rounds):
                sides = {"this": str(REPO_ROOT), "base": base}
                if round_no % 2:
                    sides = dict(reversed(sides.items()))
                for side, total in measure_round(sides, workload, mails, body, args.seconds).items():
                    per = total["bytes"] / 1e6 if unit == "MB/s" else total["mails"]
                    figures[side].append(per / total["seconds"])
                    cpu[side].append(1000 * total["cpu"] / per)
                    loop[side].append(1000 * total["loop"] / per)
                    print(
                        f"  round {round_no + 1} {side}: {figures[side][-1]:.1f} {unit}, hub CPU"
                        f" {cpu[side][-1]:.3f} ms per {per_unit} (event loop {loop[side][-1]:.3f})"
                        f" ({total['seconds']:.1f} s, load {os.getloadavg()[0]:.1f})",
                        flush=True,
                    )
            for what, values in (
                ("throughput", figures),
                (f"CPU per {per_unit}", cpu),
                (f"event loop CPU per {per_unit}", loop),
            ):
                print_ab_summary(label, what, values["this"], values["base"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
