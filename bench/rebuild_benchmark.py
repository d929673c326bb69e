# `mailhub storage rebuild-index` on a store of many mails: fills a fresh data folder through the
# real Storage (spool, index writer process, packs, envelope records, ledger) with --mails mails of
# --size bytes to one site (every --large-every-th one over 2 MB, a file of its own; 0: none), then
# loses the index (index.sqlite3, -wal, -shm removed) and rebuilds it in a child process of the
# given source tree, --rounds times; prints the rebuild's wall time, mails/s and the child's peak RSS.
# Compare two revisions by running it with --tree pointing at a checkout of each.
#   .venv/bin/python -m bench.rebuild_benchmark [--mails 20000] [--size 10000] [--rounds 3] [--tree DIR]
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO_ROOT, argument_parser, command_line

_REBUILD = r"""
import json, resource, sys, time
from pathlib import Path
from storage.rebuild import rebuild_index
t0 = time.monotonic()
report = rebuild_index(Path(sys.argv[1]))
print(json.dumps({"seconds": time.monotonic() - t0, "restored": report.restored,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


async def fill(data: Path, mails: int, size: int, large_every: int) -> None:
    from storage import Delivery, MessageMeta, Storage, db, sites

    data.mkdir()
    conn = db.connect(data)
    site = sites.add_site(conn, "beta", ["beta@hub.test"], "pw-unused-12345", ["hub.test"])
    conn.close()
    small = (b"Subject: rebuild\r\n\r\n" + b"x" * 74 + b"\r\n") * (size // 76)
    large = small * (2_200_000 // len(small) + 1)
    storage = Storage(data)
    await storage.open()
    queue = iter(range(mails))

    async def worker():
        for n in queue:
            spool = storage.new_spool()
            spool.write(large if large_every and n % large_every == large_every - 1 else small)
            await storage.commit(
                spool, MessageMeta("alpha@hub.test", None, False), [Delivery(site.id, "beta@hub.test", "beta")]
            )

    await asyncio.gather(*(worker() for _ in range(16)))
    await storage.close()


def main() -> None:
    ap = argument_parser(
        "bench.rebuild_benchmark",
        "`mailhub storage rebuild-index` of a store filled through the real Storage, its\n"
        "index lost: seconds and peak memory per round.",
    )
    ap.add_argument("--mails", type=int, default=20_000, help="mails in the store (default 20000)")
    ap.add_argument("--size", type=int, default=10_000, help="bytes per mail (default 10000)")
    ap.add_argument(
        "--large-every", type=int, default=0, help="every Nth mail is over 2 MB, a file of its own (default 0: none)"
    )
    ap.add_argument("--rounds", type=int, default=3, help="rebuilds of the same store (default 3)")
    ap.add_argument("--tree", default=REPO_ROOT, help="source tree whose rebuild-index runs")
    args = ap.parse_args()
    print(command_line("bench.rebuild_benchmark"), flush=True)
    root = Path(tempfile.mkdtemp(prefix="rebuild-bench-"))
    try:
        data = root / "data"
        t0 = time.monotonic()
        asyncio.run(fill(data, args.mails, args.size, args.large_every))
        print(f"filled {args.mails} mails of {args.size} bytes in {time.monotonic() - t0:.1f} s", flush=True)
        pristine = root / "pristine"
        shutil.copytree(data, pristine, symlinks=True)
        for round_no in range(args.rounds):
            shutil.rmtree(data)
            shutil.copytree(pristine, data, symlinks=True)
            for suffix in ("", "-wal", "-shm"):
                (data / f"index.sqlite3{suffix}").unlink(missing_ok=True)
            out = subprocess.run(
                [sys.executable, "-c", _REBUILD, str(data)],
                cwd=args.tree,
                capture_output=True,
                text=True,
                env=dict(os.environ, PYTHONPATH=args.tree),
            )
            if out.returncode:
                raise SystemExit(out.stderr)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            assert res["restored"] == args.mails, res
            print(
                f"round {round_no}: rebuilt {res['restored']} mails in {res['seconds']:.1f} s"
                f" ({res['restored'] / res['seconds']:.0f} mails/s), peak RSS {res['peak_rss_mb']:.0f} MB",
                flush=True,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
