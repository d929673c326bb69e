# A/B of the storage commit path alone (no SMTP) between two git revisions, in one run: each round
# runs revision A then B (order alternating) in a fresh data folder, committing mails through the
# real Storage (spool, index writer process, packs, index) from `--concurrency` tasks at once for
# `--seconds`, and reports mails/s plus the CPU seconds per 1000 mails of the hub process and of the
# index writer process, user and system (CPU time is what a loaded machine disturbs least). Prints
# the median B/A of each figure.
#   .venv/bin/python -m bench.ab_commit --a REV [--b REV|FOLDER] [--size 10000] [--rounds 6]
import json
import os
import statistics
import subprocess
import sys
import tempfile

from bench.common import REPO_ROOT, argument_parser, command_line

_RUN = r"""
import asyncio, json, os, sys, tempfile, time
from pathlib import Path
from storage import Delivery, MessageMeta, Storage, db, sites

size, seconds, concurrency = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
data = Path(tempfile.mkdtemp(dir=sys.argv[4]))
conn = db.connect(data)
site = sites.add_site(conn, "beta", ["beta@hub.test"], "pw-unused-12345", ["hub.test"])
conn.close()
body = (b"Subject: ab\r\n\r\n" + b"x" * 74 + b"\r\n") * (size // 92)

def cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick

async def main():
    storage = Storage(data)
    await storage.open()
    done = 0
    stop = time.monotonic() + seconds
    async def worker():
        nonlocal done
        while time.monotonic() < stop:
            spool = storage.new_spool()
            spool.write(body)
            await storage.commit(spool, MessageMeta("alpha@hub.test", None, False),
                                 [Delivery(site.id, "beta@hub.test", "beta")])
            done += 1
    hub0, writer0, t0 = cpu(os.getpid()), cpu(storage._writer.pid), time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    hub1, writer1, t1 = cpu(os.getpid()), cpu(storage._writer.pid), time.monotonic()
    await storage.close()
    print(json.dumps({"mails": done, "seconds": t1 - t0, "hub_user": hub1[0] - hub0[0], "hub_sys": hub1[1] - hub0[1],
                      "writer_user": writer1[0] - writer0[0], "writer_sys": writer1[1] - writer0[1]}))

asyncio.run(main())
"""


def worktree(rev: str, root: str) -> str:
    """A checkout of `rev` (a folder is taken as it is) in a temporary git worktree under `root`."""
    if os.path.isdir(rev):
        return os.path.abspath(rev)
    path = os.path.join(root, rev.replace("/", "_"))
    subprocess.run(["git", "-C", REPO_ROOT, "worktree", "add", "--detach", path, rev], check=True, capture_output=True)
    return path


def run(tree: str, size: int, seconds: float, concurrency: int, root: str) -> dict:
    env = dict(os.environ, PYTHONPATH=tree)
    out = subprocess.run(
        [sys.executable, "-c", _RUN, str(size), str(seconds), str(concurrency), root],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argument_parser(
        "bench.ab_commit",
        "The storage commit path (no SMTP) of two revisions side by side: mails/s and CPU\n"
        "seconds per 1000 mails of the hub and of the index writer process, alternating rounds.",
    )
    ap.add_argument("--a", required=True, help="revision A (a commit, or a source tree)")
    ap.add_argument("--b", default=REPO_ROOT, help="revision B (default: this checkout)")
    ap.add_argument("--size", type=int, default=10_000, help="bytes per mail (default 10000)")
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds per figure (default 10)")
    ap.add_argument("--concurrency", type=int, default=10, help="mails committed at once (default 10)")
    ap.add_argument("--rounds", type=int, default=6, help="alternating rounds (default 6)")
    args = ap.parse_args()
    print(command_line("bench.ab_commit"), flush=True)
    root = tempfile.mkdtemp(prefix="ab-commit-")
    trees = {"A": worktree(args.a, root), "B": worktree(args.b, root)}
    figures: dict[str, list[list[float]]] = {side: [] for side in trees}
    try:
        for round_no in range(args.rounds):
            for side in ("A", "B") if round_no % 2 == 0 else ("B", "A"):
                res = run(trees[side], args.size, args.seconds, args.concurrency, root)
                rate = res["mails"] / res["seconds"]
                cpu = [1000 * res[k] / res["mails"] for k in ("hub_user", "hub_sys", "writer_user", "writer_sys")]
                figures[side].append([rate] + cpu)
                print(
                    f"round {round_no} {side}: {rate:.0f} mails/s, CPU s per 1000 mails: hub {cpu[0]:.3f} user"
                    f" + {cpu[1]:.3f} sys, writer {cpu[2]:.3f} user + {cpu[3]:.3f} sys",
                    flush=True,
                )
        for i, what in enumerate(("mails/s", "hub user", "hub sys", "writer user", "writer sys")):
            a = [f[i] for f in figures["A"]]
            b = [f[i] for f in figures["B"]]
            ratios = [y / x for x, y in zip(a, b) if x]
            print(
                f"{what}: A median {statistics.median(a):.3f}, B median {statistics.median(b):.3f},"
                f" B/A median {statistics.median(ratios) if ratios else float('nan'):.3f}"
            )
    finally:
        for tree in trees.values():
            if tree.startswith(root):
                subprocess.run(["git", "-C", REPO_ROOT, "worktree", "remove", "--force", tree], capture_output=True)
        subprocess.run(["rm", "-rf", root])


if __name__ == "__main__":
    main()
