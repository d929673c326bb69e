# Hub CPU time per 100 MB received (user + system time of the `mailhub serve` process, from
# /proc), for one ingest workload of bench.ingest_benchmark. On a busy machine throughput swings by
# tens of percent between runs while CPU seconds per MB move much less, so this is the figure to
# compare two versions of the hub with: run it from both checkouts in turns, e.g.
#   (cd OLD && PYTHONPATH=$PWD .venv/bin/python -m bench.hub_cpu)  # and the same in NEW
#   .venv/bin/python -m bench.hub_cpu [--size 50000000 --mails 8 --sessions 4]
import os
import shutil
import tempfile

from bench.common import argument_parser, command_line
from bench.ingest_benchmark import hub_server, run_blast
from bench.smtp_blast import make_body


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argument_parser(
        "bench.hub_cpu",
        "Hub CPU seconds per 100 MB received for one ingest workload (compare versions by\n"
        "running it from both checkouts in turns).",
    )
    ap.add_argument("--size", type=int, default=50_000_000, help="bytes per mail (default 50000000)")
    ap.add_argument("--mails", type=int, default=8, help="mails sent (default 8)")
    ap.add_argument("--sessions", type=int, default=4, help="SMTP sessions at once (default 4)")
    args = ap.parse_args()
    print(command_line("bench.hub_cpu"), flush=True)
    body = make_body(args.size - 160)
    workdir = tempfile.mkdtemp(prefix="mailhub-cpu-", dir="/var/tmp")
    try:
        with hub_server(workdir, os.path.join(workdir, "hub.log")) as hub:
            before = cpu_seconds(hub.proc.pid)
            result = run_blast(hub.port, args.sessions, args.mails, args.size, body, auth=True, bdat=False)
            used = cpu_seconds(hub.proc.pid) - before
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    per_100mb = 100 * used / (result["bytes"] / 1e6) if result["bytes"] else float("nan")
    print(
        f"{args.mails} x {args.size} B over {args.sessions} sessions: {result['mb_per_s']:.0f} MB/s,"
        f" hub CPU {per_100mb:.3f} s per 100 MB, failures {result['failures']},"
        f" load {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
