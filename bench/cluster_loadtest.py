# A load-test profile against (a) one hub on SQLite, (b) one hub with its index on PostgreSQL and
# (c) two hubs on one PostgreSQL index and one shared blob folder behind HAProxy (issue 27): each
# run starts throw-away hubs (loadtest.spawn.LocalHub) and runs `mailhub-loadtest run` at them with
# its integrity checks (every mail downloaded once and intact: lost, duplicated, corrupted), then
# prints the runs side by side: accepted and downloaded, lost/dup/corrupt, mails/s and MB/s,
# latency, and the CPU seconds of the hub processes. Each PostgreSQL run gets a new database on the
# server of --postgresql (the URL's user must be allowed CREATE DATABASE), dropped afterwards.
# Exit 1 if any run failed its checks. Needs Debian's haproxy for (c).
# With --blast-mails N the setups are instead driven as fast as they take mail: N mails of
# --blast-size bytes over --blast-sessions SMTP sessions (bench.smtp_blast, pipelined) from one
# site of the profile to another, through the same front (drain-time deferral and pacing off:
# nothing drains the receiver); it prints mails/s and the hub CPU per mail (the PostgreSQL server's
# CPU is not counted).
#   .venv/bin/python -m bench.cluster_loadtest --postgresql postgresql://USER@HOST:PORT/postgres \
#       [--profile pilot] [--rounds 1] [--speed X] [--only sqlite,pg,pg2]
#       [--blast-mails 3000 --blast-size 1000000 --blast-sessions 8]
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import argument_parser, command_line
from bench.smtp_blast import blast
from loadtest import corpus as corpus_mod
from loadtest.ports import free_port
from loadtest.profile import load_profile
from loadtest.spawn import LocalHub, SpawnError
from loadtest.thirdparty import haproxy_config, wait_banner

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
LOADTEST = Path(sys.executable).parent / "mailhub-loadtest"
SETUPS = {
    "sqlite": "1 node, SQLite",
    "pg": "1 node, PostgreSQL",
    "pg2": "2 nodes, PostgreSQL + shared blobs, HAProxy",
}


@dataclass
class Outcome:
    setup: str
    status: int = 1
    result: dict = field(default_factory=dict)
    cpu_s: list[float] = field(default_factory=list)
    note: str = ""


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process and of its running children (the index writer)."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            total += _cpu_seconds(int(child))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return total + sum(int(fields[i]) for i in (11, 12, 13, 14)) / os.sysconf("SC_CLK_TCK")  # u/s time, + children's


def _database_url(server_url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(server_url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


class Database:
    """A new database on the server of `server_url` for one run, dropped at the end."""

    def __init__(self, server_url: str, name: str):
        import psycopg

        self.server_url, self.name = server_url, name
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"'.encode())
        self.url = _database_url(server_url, name)

    def drop(self) -> None:
        import psycopg

        with psycopg.connect(self.server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'.encode())


def _haproxy(nodes: list[dict[str, int]], folder: Path) -> tuple[subprocess.Popen, dict[str, int]]:
    """HAProxy in front of the nodes (send-proxy-v2, checks on /healthz), as the role configures it."""
    front = {name: free_port() for name in ("smtp", "pop3")}
    config = folder / "haproxy.cfg"
    config.write_text(haproxy_config(front, {f"node{n + 1}": ports for n, ports in enumerate(nodes)}))
    proc = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_banner(front["smtp"], timeout=10, proc=proc)
        wait_banner(front["pop3"], prefix=b"+OK", timeout=10, proc=proc)
    except (RuntimeError, TimeoutError) as exc:
        proc.kill()
        raise SystemExit(f"haproxy did not pass connections ({HAPROXY} -db -f {config}): {exc}") from None
    return proc, front


def one_run(setup: str, args, corpus: Path, domain: str, sites: dict, work: Path, number: int) -> Outcome:
    """One `mailhub-loadtest run` against a fresh setup; its outcome."""
    outcome = Outcome(setup)
    nodes = 2 if setup == "pg2" else 1
    database = Database(args.postgresql, f"mailhub_bench_{os.getpid()}_{number}") if setup != "sqlite" else None
    shared = work / "shared-blobs"
    hubs: list[LocalHub] = []
    balancer = None
    try:
        for n in range(nodes):
            env = {"MAILHUB_NODE_NAME": f"node{n + 1}", "MAILHUB_METRICS_NODE": f"node{n + 1}"}
            if args.blast_mails:  # nothing drains the receiver: its backlog must not defer the blast
                env |= {"MAILHUB_THROTTLE_DRAIN_ADMISSION": "false", "MAILHUB_THROTTLE_PACING": "false"}
            if database is not None:
                env["MAILHUB_STORAGE_INDEX"] = database.url
            if setup == "pg2":
                shared.mkdir(exist_ok=True)
                env |= {"MAILHUB_STORAGE_BLOBS": str(shared), "MAILHUB_PROXY_TRUSTED_BALANCERS": "127.0.0.1/32"}
            hubs.append(LocalHub(domain, extra_env=env))
        try:
            hubs[0].add_sites(sites)  # on PostgreSQL the one index all nodes share
            ports = [hub.start() for hub in hubs]
        except SpawnError as exc:
            outcome.note = str(exc)
            return outcome
        if setup == "pg2":
            balancer, front = _haproxy(ports, work)
        else:
            front = ports[0]
        if args.blast_mails:
            (sender, site), (_, receiver) = sorted(sites.items())[:2]
            result = asyncio.run(
                blast(
                    "127.0.0.1",
                    front["smtp"],
                    sessions=args.blast_sessions,
                    mails=args.blast_mails,
                    size=args.blast_size,
                    user=sender,
                    password=site["password"],
                    mail_from=site["address"],
                    rcpt=receiver["address"],
                )
            )
            outcome.cpu_s = [_cpu_seconds(hub.proc.pid) for hub in hubs if hub.proc is not None]
            outcome.status = 0 if result["failures"] == 0 else 1
            outcome.result = {"blast": result}
            return outcome
        out = work / f"result-{setup}.json"
        command: list[str | Path] = [LOADTEST, "run", args.profile, "--corpus", str(corpus), "--out", str(out)]
        command += ["--no-progress", "--smtp", f"127.0.0.1:{front['smtp']}", "--pop3", f"127.0.0.1:{front['pop3']}"]
        command += ["--label", SETUPS[setup]]
        if args.speed != 1:
            command += ["--speed", str(args.speed)]
        run = subprocess.run(command, capture_output=True, text=True)
        outcome.cpu_s = [_cpu_seconds(hub.proc.pid) for hub in hubs if hub.proc is not None]
        outcome.status = run.returncode
        if out.exists():
            outcome.result = json.loads(out.read_text())
        else:
            outcome.note = (run.stdout[-1000:] + run.stderr[-1000:]).strip()
        return outcome
    finally:
        if balancer is not None:
            balancer.terminate()
            balancer.wait(10)
        for hub in hubs:
            hub.stop()
        if database is not None:
            database.drop()


def blast_table(outcomes: list[Outcome]) -> str:
    header = (
        f"{'setup':<46} {'mails':>6} {'failed':>6} {'seconds':>8} {'mails/s':>8} {'MB/s':>7} "
        f"{'hub CPU s':>10} {'CPU ms/mail':>11}"
    )
    lines = [header, "-" * len(header)]
    for o in outcomes:
        if not o.result:
            lines.append(f"{SETUPS[o.setup]:<46} failed: {o.note[-200:]}")
            continue
        b = o.result["blast"]
        cpu = sum(o.cpu_s)
        lines.append(
            f"{SETUPS[o.setup]:<46} {b['mails']:>6} {b['failures']:>6} {b['seconds']:>8.1f} {b['mails_per_s']:>8.1f} "
            f"{b['mb_per_s']:>7.1f} {'+'.join(f'{s:.1f}' for s in o.cpu_s):>10} "
            f"{1000 * cpu / max(1, b['mails'] - b['failures']):>11.2f}"
        )
        if b["failures"]:
            lines.append(f"    first refusals: {b.get('errors', [])[:2]}")
    return "\n".join(lines)


def table(outcomes: list[Outcome]) -> str:
    header = (
        f"{'setup':<46} {'accepted':>9} {'downloaded':>10} {'lost':>5} {'dup':>4} {'corrupt':>7} "
        f"{'mails/s':>8} {'MB/s':>7} {'p50 s':>7} {'p95 s':>7} {'hub CPU s':>10}"
    )
    lines = [header, "-" * len(header)]
    for o in outcomes:
        if not o.result:
            lines.append(f"{SETUPS[o.setup]:<46} failed: {o.note[-200:]}")
            continue
        c, th, lat = o.result["counts"], o.result["throughput"], o.result["latency_s"]

        def num(value, fmt: str) -> str:
            return "-" if value is None else format(value, fmt)

        lines.append(
            f"{SETUPS[o.setup]:<46} {c['accepted']:>9} {c['received']:>10} {c['lost']:>5} {c['duplicated']:>4} "
            f"{c['corrupted']:>7} {num(th['accepted_mails_per_s'], '8.2f')} {num(th['accepted_mb_per_s'], '7.2f')} "
            f"{num(lat['p50'], '7.3f')} {num(lat['p95'], '7.3f')} {'+'.join(f'{s:.1f}' for s in o.cpu_s):>10}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argument_parser(
        "bench.cluster_loadtest",
        "A load-test profile against one hub on SQLite, one on PostgreSQL, and two on PostgreSQL with\n"
        "shared blobs behind HAProxy; every mail checked (lost, duplicated, corrupted) in each.",
    )
    parser.add_argument("--postgresql", help="URL of a PostgreSQL server whose user may CREATE DATABASE")
    parser.add_argument("--profile", default="pilot")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--speed", type=float, default=1.0, help="compress the arrival times X-fold")
    parser.add_argument("--only", default="sqlite,pg,pg2", help="comma-separated setups: sqlite, pg, pg2")
    parser.add_argument("--corpus", type=Path, help="corpus folder (default: made under /var/tmp once)")
    parser.add_argument(
        "--blast-mails", type=int, default=0, help="instead of the profile: this many mails at full speed"
    )
    parser.add_argument("--blast-size", type=int, default=1_000_000, help="bytes per mail of --blast-mails")
    parser.add_argument("--blast-sessions", type=int, default=8, help="SMTP sessions of --blast-mails")
    args = parser.parse_args()
    setups = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in setups if s not in SETUPS]
    if unknown:
        parser.error(f"--only: unknown setup(s) {', '.join(unknown)} (known: {', '.join(SETUPS)})")
    if any(s != "sqlite" for s in setups) and not args.postgresql:
        parser.error("--postgresql URL is needed for the setups pg and pg2")
    profile = load_profile(args.profile)
    corpus = args.corpus or Path("/var/tmp") / f"mailhub-cluster-corpus-{profile.name}"
    try:
        manifest = corpus_mod.load(profile, corpus)
    except corpus_mod.CorpusError:
        manifest = corpus_mod.generate(profile, corpus, corpus_mod.print_progress)
    print(command_line("bench.cluster_loadtest"), flush=True)
    outcomes: list[Outcome] = []
    number = 0
    for round_number in range(args.rounds):
        order = setups if round_number % 2 == 0 else setups[::-1]
        for setup in order:
            number += 1
            with tempfile.TemporaryDirectory(prefix="mailhub-cluster-") as work:
                print(f"round {round_number + 1}: {SETUPS[setup]} ...", flush=True)
                outcome = one_run(setup, args, corpus, profile.domain, dict(manifest["sites"]), Path(work), number)
                outcomes.append(outcome)
    print(blast_table(outcomes) if args.blast_mails else table(outcomes))
    return 0 if all(o.status == 0 for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
