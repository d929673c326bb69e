# Side-by-side POP3 and IMAP download of two versions of the hub (this checkout and a base commit,
# checked out into a temporary git worktree), in one run on loopback. Each round gives each version
# a fresh data folder with a backlog waiting for download, filled over SMTP by that version as in
# bench.pop3_benchmark (20 x 50 MB mails in one mailbox, 4 mailboxes of 5 x 50 MB, --mails-1mb x 1 MB
# in one more), served by a fresh process of that version; then, per figure, the two hubs take turns
# (the first alternating from round to round), each turn one download of the figure's mailboxes
# (no DELE), until each has downloaded for at least --seconds; so a busy phase of a shared machine
# hits both alike:
#   POP3 (client bench/pop3_fetch): 50 MB mails, 1 session; 50 MB mails, 4 sessions; 1 MB mails, 1 session
#   IMAP (client imaplib, FETCH n (BODY.PEEK[]), only the FETCH calls timed): 50 MB mails, 1 session
# Prints every figure with the hub's CPU time per MB (per mail for 1 MB mails) and the median ratios
# this/base per round. In round 1 every mail is first downloaded once from both versions, untimed,
# and checked: header as sent under the hub's trace fields, body SHA-256 as sent.
#   .venv/bin/python -m bench.ab_download --base 433ff94 [--rounds 3] [--seconds 10] [--mails-1mb 500]
import contextlib
import hashlib
import os
import shutil
import sys
import tempfile

from bench import imap_benchmark, pop3_benchmark
from bench.ab_ingest import UNTHROTTLED, cpu_seconds, worktree
from bench.common import REPO_ROOT, argument_parser, command_line, print_ab_summary
from bench.ingest_benchmark import PASSWORD, SENDER, hub_server, read_log_problems
from bench.pop3_fetch import fetch_all
from bench.smtp_blast import make_body
from loadtest.thirdparty import LOOPBACK

# the mailboxes of bench.pop3_benchmark: name, label, mail size, mailboxes, (mails per mailbox, _), unit
WORKLOADS = {wl[0]: wl for wl in pop3_benchmark.WORKLOADS}
IMAP_BOX = imap_benchmark.BOX  # the mailbox of the 50 MB mails, one session
# figure name, label, POP3 workload whose mailboxes it downloads (None: IMAP), unit
FIGURES = (
    ("pop3-50MB", "POP3, 50 MB mails, 1 session", "50MB", "MB/s"),
    ("pop3-50MBx4", "POP3, 50 MB mails, 4 sessions", "50MBx4", "MB/s"),
    ("pop3-1MB", "POP3, 1 MB mails, 1 session", "1MB", "mails/s"),
    ("imap-50MB", "IMAP, 50 MB mails, 1 session", None, "MB/s"),
)


def one_pass(port: int, workload: str | None, counts: dict, body: bytes) -> tuple[int, int, float]:
    """Download every mail of the figure's mailboxes once: (mails, bytes, timed seconds)."""
    if workload is None:
        mails = counts["50MB"]
        total, seconds, problems = imap_benchmark.fetch_all(port, mails, body, verify=False)
        assert not problems, problems
        return mails, total, seconds
    accounts = [(box, PASSWORD) for box in pop3_benchmark.mailboxes(WORKLOADS[workload])]
    result = fetch_all(LOOPBACK, port, accounts, sessions=len(accounts))
    assert result["failures"] == 0 and result["messages"] == counts[workload] * len(accounts), result
    return result["messages"], result["bytes"], result["seconds"]


def verify(hub, counts: dict, bodies: dict) -> list[str]:
    """Every mail once more over POP3 and the 50 MB ones over IMAP, checked against what was sent."""
    problems = []
    for name, wl in WORKLOADS.items():
        body = bodies[wl[2]]
        for box in pop3_benchmark.mailboxes(wl):
            sha = hashlib.sha256(body).hexdigest()
            problems += pop3_benchmark.verify_mailbox(hub.pop3_port, box, counts[name], sha, len(body))[1]
    problems += imap_benchmark.fetch_all(hub.imap_port, counts["50MB"], bodies[50_000_000], verify=True)[2]
    return problems


@contextlib.contextmanager
def backlog(checkout: str, counts: dict, bodies: dict):
    """A fresh data folder filled over SMTP by `checkout`'s hub and served by a fresh process of that
    hub (POP3 and IMAP), every mailbox touched once; the folder is deleted on exit. Yields the hub."""
    workdir = tempfile.mkdtemp(prefix="ab-download-", dir="/var/tmp")
    log_path = os.path.join(workdir, "hub.log")
    boxes = [box for wl in WORKLOADS.values() for box in pop3_benchmark.mailboxes(wl)]
    try:
        with hub_server(workdir, log_path, sites=(SENDER, *boxes), extra_env=UNTHROTTLED, checkout=checkout) as filler:
            for name, wl in WORKLOADS.items():
                failures, errors = pop3_benchmark.fill_hub(filler, wl, counts[name], bodies[wl[2]])
                assert failures == 0, errors[:3]
        with hub_server(workdir, log_path, sites=(), pop3=True, imap=True, checkout=checkout) as hub:
            for name, wl in WORKLOADS.items():
                for box in pop3_benchmark.mailboxes(wl):
                    assert pop3_benchmark.touch_mailbox(hub.pop3_port, box) == counts[name], box
            assert imap_benchmark.touch(hub.imap_port) == counts["50MB"]
            yield hub
            assert hub.proc.poll() is None, "the hub died"
        for line in read_log_problems(log_path):  # e.g. a loop stall on a busy machine: shown, not fatal
            print(f"    hub log ({checkout}): {line[:200]}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        os.sync()


def measure_round(checkouts: dict, counts: dict, bodies: dict, seconds: float, check: bool) -> dict:
    """A backlog for every checkout ({side: tree}, in the order to take turns), then per figure one
    download of its mailboxes from each side in turn until each has downloaded for `seconds`.
    Returns {side: {figure: (rate, hub CPU ms per unit, seconds)}}."""
    with contextlib.ExitStack() as stack:
        hubs = {side: stack.enter_context(backlog(checkout, counts, bodies)) for side, checkout in checkouts.items()}
        if check:
            for side, hub in hubs.items():
                problems = verify(hub, counts, bodies)
                assert not problems, (side, problems[:5])
        os.sync()  # the fill's writes reach the disk before anything is timed
        results: dict[str, dict[str, tuple[float, float, float]]] = {side: {} for side in hubs}
        for figure, _label, workload, unit in FIGURES:
            totals = {side: [0, 0, 0.0, 0.0] for side in hubs}  # mails, bytes, seconds, hub CPU seconds
            body = bodies[WORKLOADS[workload or "50MB"][2]]
            while min(total[2] for total in totals.values()) < seconds:
                for side, hub in hubs.items():
                    port = hub.imap_port if workload is None else hub.pop3_port
                    cpu_before = cpu_seconds(hub.proc.pid)
                    one = one_pass(port, workload, counts, body)
                    cpu = cpu_seconds(hub.proc.pid) - cpu_before
                    totals[side] = [a + b for a, b in zip(totals[side], (*one, cpu))]
            for side, (mails, total, timed, cpu) in totals.items():
                per = total / 1e6 if unit == "MB/s" else mails
                results[side][figure] = (per / timed, 1000 * cpu / per, timed)
        return results


def main() -> int:
    ap = argument_parser(
        "bench.ab_download",
        "POP3 and IMAP download of this checkout against a base commit, side by side in alternating rounds",
    )
    ap.add_argument("--base", required=True, help="commit to compare this checkout with")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--seconds", type=float, default=10.0, help="at least this long per figure (default 10)")
    ap.add_argument("--mails-1mb", type=int, default=500, help="1 MB mails in their mailbox (default 500)")
    args = ap.parse_args()
    print(command_line("bench.ab_download"), flush=True)
    counts = {name: wl[4][0] for name, wl in WORKLOADS.items()} | {"1MB": args.mails_1mb}
    bodies = {size: make_body(size - 160) for size in (50_000_000, 1_000_000)}  # as smtp_blast does
    results: dict[str, list[dict]] = {"this": [], "base": []}
    with worktree(args.base) as base:
        for round_no in range(args.rounds):
            sides = {"this": str(REPO_ROOT), "base": base}
            if round_no % 2:
                sides = dict(reversed(sides.items()))
            for side, figures in measure_round(sides, counts, bodies, args.seconds, check=round_no == 0).items():
                results[side].append(figures)
                for figure, label, _workload, unit in FIGURES:
                    rate, cpu, timed = figures[figure]
                    per = "mail" if unit == "mails/s" else "MB"
                    print(
                        f"  round {round_no + 1} {side}: {label}: {rate:.1f} {unit}, hub CPU {cpu:.3f} ms per {per}"
                        f" ({timed:.1f} s, load {os.getloadavg()[0]:.1f})",
                        flush=True,
                    )
    for figure, label, _workload, _unit in FIGURES:
        for what, index in (("throughput", 0), ("hub CPU per unit", 1)):
            this = [r[figure][index] for r in results["this"]]
            base = [r[figure][index] for r in results["base"]]
            print_ab_summary(label, what, this, base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
