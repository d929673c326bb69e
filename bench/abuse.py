# Abuse benchmark (issue 20, "How it is shown"): every attack class of issue 20 runs for a fixed
# time against a hub while a good gateway works (SMTP submit, POP3 and IMAP download of 1 MB mails
# in a loop), and a table shows per attack: the worst event-loop lag seen from outside (reply time
# of a NOOP sent every 50 ms on an idle logged-in IMAP connection) and, when the hub exports it, the
# largest bucket of mailhub_event_loop_lag_seconds hit; the good gateway's p50/p99 per operation
# and its failures; the hub's peak RSS; CPU of the hub and its index writer; log lines and
# tracebacks the attack caused. An attack that stalls the hub past --recover seconds is shown as
# stalled and the hub restarted (when the benchmark started it) so the next attack meets a live one.
# The benchmark starts a hub from --hub-repo (default: this checkout) in a temporary folder, or
# targets a running one given its ports. Only 127.0.0.0/8 takes part. docs/abuse-benchmark.md.
#   .venv/bin/python -m bench.abuse [--duration 10] [--attack NAME ...] [--hub-repo DIR] [--markdown OUT]
# About 3.5 minutes with the defaults (15 windows of 10 s, filling, recoveries).
import imaplib
import json
import math
import os
import re
import resource
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field

from bench.abuse_attacks import ATTACKS
from bench.abuse_gateway import (
    HOST,
    Gateway,
    HubProcesses,
    LagProbe,
    MemorySampler,
    Ports,
    Recorder,
    Sites,
    download_imap,
    download_pop3,
)
from bench.abuse_inputs import BULK_MAILS, bulk_mail, hostile_mime_mails
from bench.common import REPO_ROOT, argument_parser, command_line
from loadtest.ports import free_port

BASELINE = "none (baseline)"
OPS = ("smtp", "pop3", "imap")
LAG_BUCKET_RE = re.compile(r'^mailhub_event_loop_lag_seconds_bucket\{[^}]*le="([^"]+)"[^}]*\} ([0-9.e+]+)', re.M)


# ------------------------------------------------------------------------- the hub


class OwnHub:
    """A `mailhub serve` of the checkout `repo`, run by `python`, on fixed free loopback ports, in a
    data folder under `workdir`; restartable (same ports, same data) after a stall."""

    def __init__(self, repo: str, python: str, workdir: str, domain: str, extra_env: dict):
        self.repo, self.python, self.domain = repo, python, domain
        self.ports = Ports(free_port(), free_port(), free_port(), free_port())
        self.log_path = os.path.join(workdir, "hub.log")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MAILHUB_")}
        self.env.update(
            PYTHONPATH=repo,
            MAILHUB_DATA_DIR=os.path.join(workdir, "hub-data"),
            MAILHUB_DOMAIN=domain,
            MAILHUB_SMTP_LISTEN=f"{HOST}:{self.ports.smtp}",
            MAILHUB_POP3_LISTEN=f"{HOST}:{self.ports.pop3}",
            MAILHUB_IMAP_LISTEN=f"{HOST}:{self.ports.imap}",
            MAILHUB_METRICS_LISTEN=f"{HOST}:{self.ports.metrics}",
            MAILHUB_LOG_LEVEL="info",
            MAILHUB_SHUTDOWN_TIMEOUT="5",
            MAILHUB_DIRECTORY_NOTIFY_ON_CHANGE="false",
            # the IMAP attacks need hostile MIME in a mailbox, which the encryption policy refuses at SMTP
            MAILHUB_ENCRYPTION_REQUIRED="false",
        )
        self.env.update(extra_env)
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str, stdin: str = "") -> None:
        subprocess.run(
            [self.python, "-m", "mailhub.cli", *args],
            input=stdin,
            text=True,
            env=self.env,
            cwd=self.repo,
            check=True,
            capture_output=True,
            timeout=120,
        )

    def add_sites(self, sites: Sites) -> None:
        for name in sites.all():
            self.cli(
                "site",
                "add",
                name,
                "--address",
                f"{name}@{self.domain}",
                "--password-stdin",
                stdin=sites.password + "\n",
            )

    def start(self, wait: float = 60.0) -> None:
        with open(self.log_path, "ab") as log:
            mark = log.tell()
            self.proc = subprocess.Popen(
                [self.python, "-m", "mailhub.cli", "serve"],
                env=self.env,
                cwd=self.repo,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with open(self.log_path, "rb") as log:
                log.seek(mark)
                if b"hub ready" in log.read():
                    return
            if self.proc.poll() is not None:
                raise SystemExit(f"the hub exited with {self.proc.returncode}; see {self.log_path}")
            time.sleep(0.1)
        raise SystemExit(f"the hub did not start within {wait:.0f} s; see {self.log_path}")

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if not kill and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the index writer too
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self.proc = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


def fill_mailboxes(ports: Ports, sites: Sites, domain: str, mime_parts: int, bulk_mails: int) -> None:
    """The attacker's mailboxes: bulk mails of 1 MB with 60 KB headers (for FETCH and SEARCH) and
    one of each hostile MIME mail (for BODYSTRUCTURE); skipped where they are already there."""
    wanted = {
        sites.attacker: [bulk_mail(domain, sites.attacker, sites.attacker, n) for n in range(bulk_mails)]
        if mailbox_count(ports, sites, sites.attacker) < bulk_mails
        else []
    }
    mime = hostile_mime_mails(domain, sites.attacker, sites.attacker_mime, mime_parts)
    if mailbox_count(ports, sites, sites.attacker_mime) < len(mime):
        wanted[sites.attacker_mime] = [mail for _name, mail in mime]
    with smtplib.SMTP(HOST, ports.smtp, timeout=300) as smtp:
        smtp.login(sites.attacker, sites.password)
        for recipient, mails in wanted.items():
            for mail in mails:
                smtp.sendmail(f"{sites.attacker}@{domain}", [f"{recipient}@{domain}"], mail)


def mailbox_count(ports: Ports, sites: Sites, site: str) -> int:
    imap = imaplib.IMAP4(HOST, ports.imap, timeout=60)
    try:
        imap.login(site, sites.password)
        typ, data = imap.select("INBOX", readonly=True)
        if typ != "OK" or data[0] is None:
            raise imaplib.IMAP4.error(f"SELECT: {typ} {data}")
        return int(data[0])
    finally:
        imap.logout()


def lag_buckets(ports: Ports) -> dict[float, float] | None:
    """Cumulative bucket counts of mailhub_event_loop_lag_seconds, or None (no metric, no port)."""
    if ports.metrics is None:
        return None
    try:
        with urllib.request.urlopen(f"http://{HOST}:{ports.metrics}/metrics", timeout=30) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    buckets: dict[float, float] = {}
    for le, count in LAG_BUCKET_RE.findall(text):
        bound = math.inf if le == "+Inf" else float(le)
        buckets[bound] = buckets.get(bound, 0.0) + float(count)
    return buckets or None


def worst_bucket(before: dict | None, after: dict | None) -> str:
    """The smallest bucket bound that holds every lag observed between two scrapes ("<= 0.1"),
    "> X" when some fell in +Inf, "n/a" without the metric."""
    if before is None or after is None:
        return "n/a"
    grown = sorted(le for le in after if after[le] - before.get(le, 0.0) > 0)
    if not grown:
        return "none"
    total = after[math.inf] - before.get(math.inf, 0.0)
    for le in grown:
        if after[le] - before.get(le, 0.0) >= total:
            return f"<= {le:g}" if le != math.inf else "> %g" % max(b for b in after if b != math.inf)
    return "?"


# ------------------------------------------------------------------------- one window


@dataclass
class Row:
    attack: str
    probe_worst: float | None = None
    probe_failures: int = 0
    lag_metric: str = "n/a"
    ops: dict = field(default_factory=dict)  # op -> (p50, p99, count, failures) in seconds
    failures: list = field(default_factory=list)
    rss_peak: int | None = None
    cpu_percent: float | None = None
    log_lines: int | None = None
    tracebacks: int | None = None
    state: str = "ok"
    note: str = "-"


def nearest_rank(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


class Bench:
    def __init__(self, args, ports: Ports, sites: Sites, hub: OwnHub | None, pid: int | None, log_path: str | None):
        self.args, self.ports, self.sites, self.hub, self.log_path = args, ports, sites, hub, log_path
        self.recorder = Recorder()
        self.processes = HubProcesses(pid)
        self.sampler = MemorySampler(self.processes)
        self.gateway = Gateway(ports, sites, args.domain, self.recorder, args.gateway_pause)
        self.probe = LagProbe(ports, sites, self.recorder)

    def __enter__(self):
        for thread in (self.sampler, self.probe, self.gateway):
            thread.start()
        return self

    def __exit__(self, *exc):
        for thread in (self.gateway, self.probe, self.sampler):
            thread.stopping.set()
        for thread in (self.gateway, self.probe, self.sampler):
            thread.join(60)

    def log_size(self) -> int | None:
        try:
            return os.path.getsize(self.log_path) if self.log_path else None
        except OSError:
            return None

    def log_between(self, start: int | None, end: int | None) -> tuple[int | None, int | None]:
        if start is None or end is None or self.log_path is None:  # log_size() gave None
            return None, None
        with open(self.log_path, "rb") as log:
            log.seek(start)
            text = log.read(end - start)
        return text.count(b"\n"), text.count(b"Traceback") + text.count(b"internal error")

    def attack(self, name: str, index: int) -> dict:
        a = self.args
        target = dict(
            host=HOST,
            smtp=self.ports.smtp,
            pop3=self.ports.pop3,
            imap=self.ports.imap,
            metrics=self.ports.metrics,
            domain=a.domain,
            password=self.sites.password,
            sites={
                "sender": self.sites.sender,
                "pop3": self.sites.pop3,
                "imap": self.sites.imap,
                "attacker": self.sites.attacker,
                "attacker-mime": self.sites.attacker_mime,
                "sink": self.sites.sink,
            },
            sources=[f"127.0.{10 + index}.{j}" for j in range(1, 5)],
            duration=a.duration,
            connections=a.connections,
            stalled_sessions=a.stalled_sessions,
            mime_parts=a.mime_parts,
        )
        try:
            done = subprocess.run(
                [sys.executable, "-m", "bench.abuse_attacks", name, json.dumps(target)],
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=a.duration + 30,
            )
        except subprocess.TimeoutExpired:
            return {"note": "attacker overran its time and was killed"}
        if done.returncode != 0 or not done.stdout.strip():
            return {"note": "attacker failed: " + (done.stderr.strip().splitlines() or ["?"])[-1][:200]}
        return json.loads(done.stdout.strip().splitlines()[-1])

    def recovered(self, since: float) -> bool:
        """Wait (up to --recover s) until the probe and each good operation have completed once
        after `since`."""
        deadline = time.monotonic() + self.args.recover
        while time.monotonic() < deadline:
            if all(self.recorder.done_since(since, op) for op in ("probe", *OPS)):
                return True
            time.sleep(0.1)
        return False

    def window(self, name: str, index: int) -> Row:
        row = Row(name)
        lag_before, cpu_before, log_before = lag_buckets(self.ports), self.processes.cpu_seconds(), self.log_size()
        start = time.monotonic()
        if name == BASELINE:
            time.sleep(self.args.duration)
        else:
            row.note = self.attack(name, index).get("note", "-")
        end = time.monotonic()
        cpu_after = self.processes.cpu_seconds()
        stalled = not self.recovered(end)
        if stalled:
            row.state = f"STALLED: no answer {self.args.recover:.0f} s after the attack"
            self.restart(row)
        self.measure(row, start, end)
        # a restarted hub's histogram starts again from zero: the stall itself was never observed
        row.lag_metric = (
            f"> {self.args.recover:.0f} (stalled)" if stalled else worst_bucket(lag_before, lag_buckets(self.ports))
        )
        if cpu_before is not None and cpu_after is not None:
            row.cpu_percent = 100 * (cpu_after - cpu_before) / (end - start)
        row.log_lines, row.tracebacks = self.log_between(log_before, self.log_size())
        return row

    def restart(self, row: Row) -> None:
        if self.hub is None:
            row.state += " (not restarted: not started by the benchmark)"
            return
        self.hub.stop(kill=True)
        self.hub.start()
        self.processes.hub = HubProcesses(self.hub.pid).hub
        row.state += "; hub killed and restarted" if self.recovered(time.monotonic()) else "; restart failed"

    def measure(self, row: Row, start: float, end: float) -> None:
        probes = self.recorder.between(start, end, "probe")
        row.probe_worst = max((s.seconds for s in probes), default=None)
        row.probe_failures = sum(not s.ok for s in probes)
        row.rss_peak = self.sampler.peak(start, end)
        for op in OPS:
            samples = self.recorder.between(start, end, op)
            times = [s.seconds for s in samples]
            row.ops[op] = ((nearest_rank(times, 0.5), nearest_rank(times, 0.99)) if times else (None, None)) + (
                len(samples),
                sum(not s.ok for s in samples),
            )
            row.failures += [f"{op}: {s.error}" for s in samples if not s.ok][:3]


# ------------------------------------------------------------------------- the table


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def _op(cell: tuple) -> str:
    p50, p99, count, failed = cell
    text = f"{_ms(p50)} / {_ms(p99)}"
    return text + (f" ({failed} of {count} failed)" if failed else "") if count else "none done"


def table(rows: list[Row]) -> str:
    head = (
        "attack",
        "worst lag, probe (s)",
        "lag metric (s)",
        "SMTP p50/p99 (ms)",
        "POP3 p50/p99 (ms)",
        "IMAP p50/p99 (ms)",
        "hub RSS peak (MB)",
        "CPU hub+writer (%)",
        "log lines / tracebacks",
        "hub",
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        probe = (
            "-" if r.probe_worst is None else ("≥ " if r.state.startswith("STALLED") else "") + f"{r.probe_worst:.2f}"
        )
        probe += f" ({r.probe_failures} probe failures)" if r.probe_failures else ""
        cells = (
            r.attack,
            probe,
            r.lag_metric,
            *(_op(r.ops[op]) for op in OPS),
            "-" if r.rss_peak is None else f"{r.rss_peak / 1e6:.0f}",
            "-" if r.cpu_percent is None else f"{r.cpu_percent:.0f}",
            "-" if r.log_lines is None else f"{r.log_lines} / {r.tracebacks}",
            r.state,
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(rows: list[Row]) -> str:
    lines = []
    for r in rows:
        lines.append(f"- **{r.attack}**: attacker saw: {r.note}")
        lines += [f"  - good gateway failure: {failure}" for failure in r.failures]
    return "\n".join(lines)


def report(rows: list[Row], args, started: str, seconds: float) -> str:
    command = command_line("bench.abuse")
    return (
        f"Abuse benchmark, {started}, {seconds:.0f} s: `{command}`\n"
        f"hub: {args.hub_description}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}\n\n"
        f"{table(rows)}\n\nWhat each attacker saw (counts over its {args.duration:g} s):\n{notes(rows)}\n"
    )


# ------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argument_parser(
        "bench.abuse",
        "Run every attack class of issue 20 against a hub while a good "
        "gateway works; print a table (docs/abuse-benchmark.md).",
    )
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per attack (default 10)")
    ap.add_argument("--attack", action="append", choices=sorted(ATTACKS), help="run only these (repeatable)")
    ap.add_argument(
        "--recover",
        type=float,
        default=20.0,
        help="seconds the hub gets after an attack to answer again before it counts as stalled",
    )
    ap.add_argument(
        "--connections",
        type=int,
        default=1100,
        help="connections per protocol of the idle/slow pre-login attacks (default 1100)",
    )
    ap.add_argument("--stalled-sessions", type=int, default=300, help="SMTP sessions stalled mid-DATA")
    ap.add_argument("--mime-parts", type=int, default=20000, help="parts of the wide MIME mail")
    ap.add_argument(
        "--bulk-mails",
        type=int,
        default=BULK_MAILS,
        help=f"1 MB mails in the attacker's mailbox (default {BULK_MAILS})",
    )
    ap.add_argument("--gateway-pause", type=float, default=0.1, help="seconds between good gateway rounds")
    ap.add_argument("--hub-repo", default=REPO_ROOT, help="checkout whose hub to start (default: this one)")
    ap.add_argument("--hub-python", help="its Python (default: HUB_REPO/.venv/bin/python, else this one)")
    ap.add_argument(
        "--hub-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the started hub, e.g. MAILHUB_IMAP_MAX_CONNECTIONS=500",
    )
    ap.add_argument(
        "--ports",
        metavar="SMTP,POP3,IMAP[,METRICS]",
        help="target a running hub on 127.0.0.1 instead of starting one; its sites must exist (see --print-setup)",
    )
    ap.add_argument("--hub-pid", type=int, help="pid of the running hub (for RSS and CPU)")
    ap.add_argument("--hub-log", help="log file of the running hub (for log lines and tracebacks)")
    ap.add_argument("--password", default="abuse-bench-pass-1", help="password of every benchmark site")
    ap.add_argument("--domain", default="hub.test", help="the hub's (first) local domain")
    ap.add_argument("--print-setup", action="store_true", help="print the commands that add the sites and exit")
    ap.add_argument("--workdir", help="folder for the started hub's data and log (default: a temporary one)")
    ap.add_argument("--markdown", help="also write the report to this file")
    ap.add_argument("--json", help="also write the rows as JSON to this file")
    return ap.parse_args(argv)


def raise_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def print_setup(sites: Sites, domain: str) -> None:
    for name in sites.all():
        print(f"echo '{sites.password}' | mailhub site add {name} --address {name}@{domain} --password-stdin")


def run(args, ports: Ports, sites: Sites, hub: OwnHub | None, pid: int | None, log_path: str | None) -> list[Row]:
    print("filling the attacker's mailboxes ...", flush=True)
    fill_mailboxes(ports, sites, args.domain, args.mime_parts, args.bulk_mails)
    names = [BASELINE, *(args.attack or ATTACKS)]
    download_pop3(ports, sites, most=1000)  # the good mailboxes start empty
    download_imap(ports, sites, most=1000)
    rows = []
    with Bench(args, ports, sites, hub, pid, log_path) as bench:
        for index, name in enumerate(names):
            print(f"[{index + 1}/{len(names)}] {name} ...", flush=True)
            rows.append(bench.window(name, index))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    sites = Sites(args.password)
    if args.print_setup:
        return print_setup(sites, args.domain)
    raise_file_limit()
    started, t0 = time.strftime("%Y-%m-%d %H:%M %Z"), time.monotonic()
    workdir = args.workdir or tempfile.mkdtemp(prefix="mailhub-abuse-", dir="/var/tmp")
    hub = None
    try:
        if args.ports:
            smtp, pop3, imap, *metrics = [int(p) for p in args.ports.split(",")]
            ports = Ports(smtp, pop3, imap, metrics[0] if metrics else None)
            pid, log_path = args.hub_pid, args.hub_log
            args.hub_description = f"running hub on ports {args.ports}"
        else:
            python = args.hub_python or os.path.join(args.hub_repo, ".venv", "bin", "python")
            hub = OwnHub(
                os.path.abspath(args.hub_repo),
                python if os.path.exists(python) else sys.executable,
                workdir,
                args.domain,
                dict(kv.split("=", 1) for kv in args.hub_env),
            )
            hub.add_sites(sites)
            hub.start()
            ports, pid, log_path = hub.ports, hub.pid, hub.log_path
            args.hub_description = f"started from {hub.repo} ({git_commit(hub.repo)})" + (
                f" with {' '.join(args.hub_env)}" if args.hub_env else ""
            )
        rows = run(args, ports, sites, hub, pid, log_path)
    finally:
        if hub is not None:
            hub.stop()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    text = report(rows, args, started, time.monotonic() - t0)
    print("\n" + text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)


def git_commit(repo: str) -> str:
    try:
        return (
            subprocess.run(
                ["git", "-C", repo, "log", "-1", "--format=%h %cs"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or "not a git checkout"
        )
    except OSError:
        return "commit unknown"


if __name__ == "__main__":
    main()
