# SMTP ingest benchmark (issue 2, "How it is shown"): the hub side by side with Debian's Postfix
# (queue file written and fsynced, then a `discard` transport) and a bare aiosmtpd server with a
# file-writing, fsyncing handler, in one run on loopback, all data on the same disk:
#   (a) MB/s of 50 MB mails over 4 parallel sessions   (20 mails, --quick: 8)
#   (b) mails/s of 1 MB mails over 8 sessions          (500 mails, --quick: 200)
#   (c) mails/s of 10 KB mails over 10 sessions        (3000 mails, --quick: 1000)
#   and the hub's peak RSS while receiving one 1 GB mail (skipped with --quick): VmHWM of the hub
#   plus the proportional memory (Pss) of its index writer process and the writer's launcher.
# Each measurement starts its server fresh in an empty folder and deletes the folder afterwards;
# servers take turns (rotated order) and every measurement is repeated 3 times (--quick: once),
# the table shows the medians. The hub is measured as it is used: an authenticated site sending to
# another site. Needs root (Postfix) and bench/install-debian-packages.sh.
#   .venv/bin/python -m bench.ingest_benchmark [--quick] [--workdir DIR] [--json OUT]
# With --sustained (bench/sustained.py) the servers instead run on for all rounds of a workload,
# the hub's mailbox is never emptied, and rounds of >= 10 s per side alternate (issue 24):
#   .venv/bin/python -m bench.ingest_benchmark --sustained [--workload 1MB] [--rounds 5] [--postfix both]
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

from bench.bare_aiosmtpd import bare_aiosmtpd
from bench.common import REPO_ROOT, argument_parser, command_line, descendants
from bench.smtp_blast import blast, make_body
from loadtest.ports import free_port
from loadtest.thirdparty import LOOPBACK, postfix_sink, wait_banner

SERVERS = ("hub", "postfix", "aiosmtpd")
HUB_DOMAIN = "hub.test"
SENDER, RECEIVER, PASSWORD = "bench-sender", "bench-receiver", "bench-pass-1"
GB = 1_000_000_000

# name, label, size, sessions, (mails, quick mails), unit shown
WORKLOADS = (
    ("50MB", "50 MB mails, 4 sessions", 50_000_000, 4, (20, 8), "MB/s"),
    ("1MB", "1 MB mails, 8 sessions", 1_000_000, 8, (500, 200), "mails/s"),
    ("10KB", "10 KB mails, 10 sessions", 10_000, 10, (3000, 1000), "mails/s"),
)
# The bare aiosmtpd reads DATA line by line and keeps the whole message in memory; on a loaded
# 2-core machine it took ~14 MB/s for 50 MB mails, so 20 mails (~70 s) is still reasonable.
# Lower this to cap its 50 MB run (the table then says so).
AIOSMTPD_50MB_MAX_MAILS = 20
# Targets from issue 2: hub/postfix ratios.
TARGETS = {"50MB": 2.0, "1MB": 1.5, "10KB": 1.5}


def log(msg=""):
    print(msg, flush=True)


def warn(msg):
    bar = "!" * 78
    print("\n%s\n!!! WARNING: %s\n%s\n" % (bar, msg, bar), flush=True)


# ------------------------------------------------------------------------- machine facts


def loadavg():
    with open("/proc/loadavg") as f:
        return tuple(float(x) for x in f.read().split()[:3])


def uptime_line():
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: %.2f, %.2f, %.2f" % loadavg()


def cpu_model():
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def mem_total_mb():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 0


def filesystem_of(path):
    """(mount point, fs type, device) of the mount holding path, from /proc/self/mountinfo."""
    path = os.path.realpath(path)
    best = ("/", "unknown", "unknown")
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            mnt = left.split()[4].replace("\\040", " ")
            fstype, dev = right.split()[:2]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, fstype, dev)
    return best


def versions():
    out = {"python": platform.python_version(), "kernel": platform.release()}
    with contextlib.suppress(Exception):
        import aiosmtpd

        out["aiosmtpd"] = aiosmtpd.__version__
    with contextlib.suppress(Exception):
        out["postfix"] = subprocess.run(
            ["postconf", "-dh", "mail_version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    with contextlib.suppress(Exception):
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        out["hub commit"] = rev + (" (+ uncommitted changes)" if dirty else "")
    out["hub code"] = hub_code_fingerprint()
    return out


HUB_PACKAGES = ("mailhub", "relay", "storage", "quotas")


def hub_code_fingerprint():
    """SHA-256 (short) over the hub's source files as they are on disk: other people may commit or
    edit in the same tree while the benchmark runs; this tells whether the hub itself changed."""
    h = hashlib.sha256()
    for pkg in HUB_PACKAGES:
        for root, dirs, files in os.walk(os.path.join(REPO_ROOT, pkg)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                if name.endswith((".py", ".sql", ".toml")):
                    path = os.path.join(root, name)
                    h.update(os.path.relpath(path, REPO_ROOT).encode() + b"\0")
                    with contextlib.suppress(OSError):
                        with open(path, "rb") as f:
                            h.update(f.read())
    return h.hexdigest()[:12]


def software(facts):
    keys = ("python", "kernel", "aiosmtpd", "postfix", "hub commit", "hub code")
    return ", ".join("%s %s" % (k, facts[k]) for k in keys if k in facts)


def vm_status(pid, key):
    """A 'kB' field of /proc/PID/status (VmHWM, VmRSS) in bytes, or None."""
    with contextlib.suppress(OSError):
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    return None


def proportional_memory(pid):
    """A process's proportional set size (Pss: each page it shares counted in part, a share among
    those that map it), in bytes, or 0."""
    with contextlib.suppress(OSError, KeyError):
        with open("/proc/%d/smaps_rollup" % pid) as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["Pss"].split()[0]) * 1024
    return 0


def hub_peak_rss(pid):
    """The hub's VmHWM plus the proportional memory of its descendants (the index writer and its
    launcher, which share the pages of the writer's code: Pss counts them once between them), in
    bytes, or None."""
    total = vm_status(pid, "VmHWM")
    return None if total is None else total + sum(proportional_memory(each) for each in descendants(pid))


def count_messages(data_dir):
    """Messages in a (stopped) hub's index: small ones share pack files, so files do not count them."""
    conn = sqlite3.connect(os.path.join(data_dir, "index.sqlite3"))
    try:
        return conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    finally:
        conn.close()


def count_files(path):
    n = size = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            n += 1
            with contextlib.suppress(OSError):
                size += os.path.getsize(os.path.join(root, name))
    return n, size


# ------------------------------------------------------------------------- the hub server


def _mailhub_cmd():
    exe = os.path.join(os.path.dirname(sys.executable), "mailhub")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "mailhub.cli"]


def hub_env(data_dir, smtp_port, pop3_port=None, imap_port=None, extra_env=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILHUB_")}
    env.update(
        MAILHUB_DATA_DIR=data_dir,
        MAILHUB_SMTP_LISTEN="%s:%d" % (LOOPBACK, smtp_port),
        MAILHUB_POP3_LISTEN="%s:%d" % (LOOPBACK, pop3_port or 0),
        MAILHUB_IMAP_LISTEN="%s:%d" % (LOOPBACK, imap_port or 0),
        MAILHUB_METRICS_LISTEN=LOOPBACK + ":0",
        MAILHUB_LOG_LEVEL="warning",
        MAILHUB_DOMAIN=HUB_DOMAIN,
        MAILHUB_SHUTDOWN_TIMEOUT="10",
    )
    env.update(extra_env or {})
    return env


class HubProcess:
    def __init__(self, proc, smtp_port, pop3_port, log_path, imap_port=None):
        self.proc, self.smtp_port, self.pop3_port, self.log_path = proc, smtp_port, pop3_port, log_path
        self.imap_port = imap_port

    @property
    def port(self):
        return self.smtp_port


@contextlib.contextmanager
def hub_server(workdir, log_path, sites=(SENDER, RECEIVER), pop3=False, imap=False, extra_env=None, checkout=None):
    """`mailhub serve` on 127.0.0.1 with the data folder workdir/hub-data and the given sites added
    (none: reuse the folder as it is); SMTP (and with pop3=True POP3, imap=True IMAP) on free ports. Yields a
    HubProcess; stops the process (SIGTERM, then SIGKILL of its process group) on exit.
    The hub logs at warning level, so it does not print its ports: we choose free ones.
    checkout: run the hub of that source tree (its modules first on the path) instead of this one."""
    data_dir = os.path.join(os.path.abspath(workdir), "hub-data")
    smtp_port = free_port()
    pop3_port = free_port() if pop3 else None
    imap_port = free_port() if imap else None
    if checkout:
        extra_env = {**(extra_env or {}), "PYTHONPATH": checkout}
    env = hub_env(data_dir, smtp_port, pop3_port, imap_port, extra_env)
    command = [sys.executable, "-m", "mailhub.cli"] if checkout else _mailhub_cmd()
    cwd = checkout or REPO_ROOT
    for site in sites:
        subprocess.run(
            command + ["site", "add", site, "--address", "%s@%s" % (site, HUB_DOMAIN), "--password-stdin"],
            input=PASSWORD + "\n",
            text=True,
            env=env,
            cwd=cwd,
            check=True,
            capture_output=True,
            timeout=120,
        )
    logf = open(log_path, "ab")
    proc = subprocess.Popen(
        command + ["serve"],
        env=env,
        cwd=cwd,
        stdout=logf,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_banner(smtp_port, proc=proc, timeout=60)
        if pop3:
            wait_banner(pop3_port, b"+OK", proc=proc, timeout=60)
        if imap:
            wait_banner(imap_port, b"* OK", proc=proc, timeout=60, quit=b"a LOGOUT\r\n")
        yield HubProcess(proc, smtp_port, pop3_port, log_path, imap_port)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                warn("hub pid %d did not stop within 30 s of SIGTERM; killing it" % proc.pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: no stragglers either
        proc.wait()
        logf.close()


# ------------------------------------------------------------------------- one measurement


def run_blast(port, sessions, mails, size, body, auth, bdat):
    """smtp_blast in this process, with a generous timeout (a hung server counts as failures)."""
    kw = dict(sessions=sessions, mails=mails, size=size, bdat=bdat, body=body)
    if auth:
        kw.update(
            user=SENDER,
            password=PASSWORD,
            mail_from="%s@%s" % (SENDER, HUB_DOMAIN),
            rcpt="%s@%s" % (RECEIVER, HUB_DOMAIN),
        )
    timeout = 300 + mails * size / 2e6  # 2 MB/s would be hopeless anyway

    async def go():
        return await asyncio.wait_for(blast(LOOPBACK, port, **kw), timeout)

    t0 = time.perf_counter()
    try:
        return asyncio.run(go())
    except TimeoutError:
        dt = time.perf_counter() - t0
        return {
            "mails": 0,
            "bytes": 0,
            "seconds": round(dt, 1),
            "mails_per_s": 0.0,
            "mb_per_s": 0.0,
            "failures": mails,
            "errors": ["timed out after %.0f s" % dt],
        }


def measure(server, wl, mails, workdir, body, bdat, logs_dir, tag):
    """Start `server` fresh in an empty folder, send the workload, stop it, delete the folder."""
    name, _label, size, sessions, _counts, _unit = wl
    run_dir = tempfile.mkdtemp(prefix="%s-%s-" % (server, name), dir=workdir)
    load_before = loadavg()
    extra = {}
    try:
        if server == "hub":
            hub_log = os.path.join(logs_dir, "hub-%s.log" % tag)
            with hub_server(run_dir, hub_log) as hub:
                res = run_blast(hub.port, sessions, mails, size, body, auth=True, bdat=bdat)
                extra["hub_vmhwm"] = hub_peak_rss(hub.proc.pid)
                extra["hub_alive"] = hub.proc.poll() is None
            extra["stored"] = count_messages(os.path.join(run_dir, "hub-data"))
            extra["log_lines"] = read_log_problems(hub_log)
        elif server == "postfix":
            with postfix_sink(run_dir) as port:
                res = run_blast(port, sessions, mails, size, body, auth=False, bdat=bdat)
        else:
            with bare_aiosmtpd(run_dir) as port:
                res = run_blast(port, sessions, mails, size, body, auth=False, bdat=bdat)
            extra["stored"] = count_files(os.path.join(run_dir, "aiosmtpd"))[0]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        os.sync()  # let the deletions reach the disk before the next measurement starts
        time.sleep(1.0)
    res.update(extra, server=server, workload=name, mails_sent=mails, load_before=load_before)
    return res


def read_log_problems(path):
    """Hub log lines at warning level or above (the hub runs at warning; ideally there are none)."""
    lines = []
    with contextlib.suppress(OSError):
        with open(path, errors="replace") as f:
            for line in f:
                if line.strip():
                    lines.append(line.rstrip())
    return lines


# ------------------------------------------------------------------------- the run


def fmt_value(v, unit):
    if v is None:
        return "-"
    return ("%.1f" % v) if v < 1000 else ("%.0f" % v)


def fmt_ratio(a, b):
    if a is None or not b:
        return "-"
    return "%.2fx" % (a / b)


def table(rows):
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, r in enumerate(rows):
        out.append(
            " | ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        )
        if n == 0:
            out.append("-+-".join("-" * w for w in widths))
    return "\n".join(out)


def interrupt_once():
    """First Ctrl-C (or SIGTERM) unwinds through the cleanup code; further ones are ignored so
    that the cleanup itself is not interrupted."""

    def interrupted(signum, _frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt("signal %d" % signum)

    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)


def make_workdir(given, prefix):
    """(own, workdir, logs_dir): a fresh folder under /var/tmp (own=True) or the given one."""
    if given is None:
        workdir = tempfile.mkdtemp(prefix=prefix, dir="/var/tmp")
    else:
        workdir = os.path.abspath(given)
        os.makedirs(workdir, exist_ok=True)
    logs_dir = os.path.join(workdir, "logs")
    os.makedirs(logs_dir, exist_ok=True)
    return given is None, workdir, logs_dir


def main():
    ap = argument_parser(
        "bench.ingest_benchmark", "SMTP ingest benchmark: hub vs Postfix vs stock aiosmtpd, side by side in one run"
    )
    ap.add_argument("--quick", action="store_true", help="fewer mails, one repetition, no 1 GB mail")
    ap.add_argument(
        "--workdir",
        help="folder for all server data (default: a new folder under /var/tmp); must be on a real disk, not tmpfs",
    )
    ap.add_argument("--json", metavar="OUT", help="also write all figures as JSON to OUT")
    ap.add_argument(
        "--bdat", action="store_true", help="send with BDAT where CHUNKING is offered (hub, Postfix) instead of DATA"
    )
    ap.add_argument("--repeat", type=int, help="repetitions per measurement (default 3, --quick 1)")
    sustained = ap.add_argument_group("--sustained: servers kept running, alternating rounds, growing mailbox")
    sustained.add_argument(
        "--sustained", action="store_true", help="the sustained mode (bench/sustained.py) instead of fresh runs"
    )
    sustained.add_argument("--rounds", type=int, default=5, help="rounds per workload (default 5)")
    sustained.add_argument("--seconds", type=float, default=10.0, help="at least this long per side and round (10)")
    sustained.add_argument(
        "--workload",
        nargs="+",
        default=[w[0] for w in WORKLOADS],
        choices=[w[0] for w in WORKLOADS],
        help="workloads (default all)",
    )
    sustained.add_argument(
        "--postfix",
        choices=("private", "stock", "both"),
        default="both",
        help="Postfix logging to a file through postlogd (private), to syslog as Debian's stock instance, or both",
    )
    sustained.add_argument("--prefill", type=int, default=0, help="mails put into the hub's mailbox first (0)")
    sustained.add_argument(
        "--sessions",
        type=int,
        default=0,
        metavar="N",
        help="client sessions per side instead of the workload's own (50 MB 4, 1 MB 8, 10 KB 10)",
    )
    sustained.add_argument(
        "--backlog-ab",
        type=int,
        default=0,
        metavar="N",
        help="instead of Postfix: the hub with N mails in its mailbox against a hub started empty each round",
    )
    a = ap.parse_args()
    reps = a.repeat or (1 if a.quick else 3)
    command = command_line("bench.ingest_benchmark")
    if os.geteuid() != 0:
        sys.exit("ingest_benchmark: must run as root (it starts a private Postfix)")
    if shutil.which("postfix") is None:
        sys.exit("ingest_benchmark: Postfix missing; run bench/install-debian-packages.sh as root")

    interrupt_once()
    own_workdir, workdir, logs_dir = make_workdir(a.workdir, "mailhub-ingest-bench-")
    mnt, fstype, dev = filesystem_of(workdir)
    free = shutil.disk_usage(workdir).free

    started = time.time()
    uptime_before = uptime_line()
    facts = {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "mem_mb": mem_total_mb(),
        **versions(),
        "workdir": workdir,
        "filesystem": "%s on %s (%s)" % (mnt, dev, fstype),
    }
    log("ingest benchmark: %s" % command)
    log("machine: nproc %d, CPU %s, %d MB RAM, %s" % (facts["nproc"], facts["cpu"], facts["mem_mb"], software(facts)))
    log("data: %s, filesystem %s, %.1f GB free" % (workdir, facts["filesystem"], free / 1e9))
    log("load before: %s" % uptime_before)
    problems = []
    if fstype in ("tmpfs", "ramfs"):
        warn("workdir %s is on %s, not a disk: fsync costs nothing there, figures are meaningless" % (workdir, fstype))
        problems.append("workdir on %s" % fstype)
    need = 3 * GB if not a.quick else 1.5 * GB
    if free < need:
        sys.exit("ingest_benchmark: %.1f GB free under %s, need %.1f GB" % (free / 1e9, workdir, need / 1e9))
    if loadavg()[0] > 0.5 * (os.cpu_count() or 1):
        log(
            "note: the machine is already busy (1-minute load %.2f on %d CPUs); "
            "figures will be lower and noisier than on an idle machine" % (loadavg()[0], os.cpu_count())
        )

    if a.sustained:
        return run_sustained(a, command, facts, uptime_before, own_workdir, workdir, logs_dir)

    results = []
    rss = None
    bodies = {}
    try:
        plan = []
        for rep in range(reps):
            for wi, wl in enumerate(WORKLOADS):
                k = (rep + wi) % len(SERVERS)
                for server in SERVERS[k:] + SERVERS[:k]:  # rotated, so no server always goes first
                    plan.append((rep, wl, server))
        for n, (rep, wl, server) in enumerate(plan, 1):
            name, label, size, sessions, counts, unit = wl
            mails = counts[1] if a.quick else counts[0]
            if server == "aiosmtpd" and name == "50MB":
                mails = min(mails, AIOSMTPD_50MB_MAX_MAILS)
            if size not in bodies:
                bodies[size] = make_body(max(0, size - 160))  # as smtp_blast does; made once
            log("[%2d/%d] rep %d  %-24s %-8s %4d mails ... " % (n, len(plan), rep + 1, label, server, mails))
            r = measure(server, wl, mails, workdir, bodies[size], a.bdat, logs_dir, "%s-rep%d" % (name, rep + 1))
            r["rep"] = rep + 1
            results.append(r)
            value = r["mb_per_s"] if unit == "MB/s" else r["mails_per_s"]
            log(
                "        %s %s  (%.1f s, %.1f MB/s, %.1f mails/s, failures %d, load %.2f)"
                % (
                    fmt_value(value, unit),
                    unit,
                    r["seconds"],
                    r["mb_per_s"],
                    r["mails_per_s"],
                    r["failures"],
                    r["load_before"][0],
                )
            )
            if r["failures"]:
                msg = "%s %s rep %d: %d of %d mails FAILED: %s" % (
                    server,
                    name,
                    rep + 1,
                    r["failures"],
                    mails,
                    "; ".join(r.get("errors", [])[:5]),
                )
                warn(msg)
                problems.append(msg)
            if "stored" in r and r["stored"] != r["mails"]:
                msg = "%s %s rep %d: %d mails acknowledged but %d stored" % (
                    server,
                    name,
                    rep + 1,
                    r["mails"],
                    r["stored"],
                )
                warn(msg)
                problems.append(msg)
            if server == "hub" and not r.get("hub_alive", True):
                msg = "hub %s rep %d: the hub process died during the run" % (name, rep + 1)
                warn(msg)
                problems.append(msg)
            if r.get("log_lines"):
                msg = "hub %s rep %d logged %d warning/error lines, e.g. %s" % (
                    name,
                    rep + 1,
                    len(r["log_lines"]),
                    r["log_lines"][0][:200],
                )
                log("        " + msg)
                problems.append(msg)
        bodies.clear()

        if not a.quick:
            log("[1 GB] hub peak RSS while receiving one 1 GB mail ... ")
            run_dir = tempfile.mkdtemp(prefix="hub-1GB-", dir=workdir)
            try:
                body = make_body(GB - 160)
                hub_log = os.path.join(logs_dir, "hub-1GB.log")
                with hub_server(run_dir, hub_log) as hub:
                    idle = hub_peak_rss(hub.proc.pid)
                    load_before = loadavg()
                    r = run_blast(hub.port, 1, 1, GB, body, auth=True, bdat=a.bdat)
                    del body
                    r["hub_vmhwm"] = hub_peak_rss(hub.proc.pid)
                    r["hub_vmhwm_idle"] = idle
                    r["hub_alive"] = hub.proc.poll() is None
                r["stored"], r["stored_bytes"] = count_files(os.path.join(run_dir, "hub-data", "blobs"))
                r["log_lines"] = read_log_problems(hub_log)
                r["load_before"] = load_before
            finally:
                shutil.rmtree(run_dir, ignore_errors=True)
                os.sync()
            rss = r
            log(
                "        peak RSS %.1f MB (%.1f MB right after start), %.1f MB/s, failures %d"
                % ((r["hub_vmhwm"] or 0) / 1e6, (idle or 0) / 1e6, r["mb_per_s"], r["failures"])
            )
            if r["failures"] or r["stored"] != 1:
                msg = "hub 1 GB mail: failures %d, stored %d: %s" % (
                    r["failures"],
                    r["stored"],
                    "; ".join(r.get("errors", [])),
                )
                warn(msg)
                problems.append(msg)
            if r.get("log_lines"):
                problems.append("hub 1 GB logged: %s" % r["log_lines"][0][:200])
    except KeyboardInterrupt:
        warn("interrupted; servers stopped, partial results below")
        problems.append("interrupted")
    finally:
        kept_logs = None
        if any(os.path.getsize(os.path.join(logs_dir, f)) for f in os.listdir(logs_dir)):
            kept_logs = logs_dir  # the hub said something at warning level or above: keep its logs
        if own_workdir:
            for entry in os.listdir(workdir):
                if os.path.join(workdir, entry) != kept_logs:
                    shutil.rmtree(os.path.join(workdir, entry), ignore_errors=True)
            if kept_logs is None:
                shutil.rmtree(workdir, ignore_errors=True)
        elif kept_logs is None:
            shutil.rmtree(logs_dir, ignore_errors=True)

    # ------------------------------------------------------------------ report
    elapsed = time.time() - started
    uptime_after = uptime_line()
    after = versions()
    if after["hub code"] != facts["hub code"]:  # someone edited relay/, storage/, ... during the run
        msg = (
            "the hub's source changed during the run (fingerprint %s -> %s, commit %s -> %s): "
            "later runs measured different code"
            % (facts["hub code"], after["hub code"], facts.get("hub commit"), after.get("hub commit"))
        )
        warn(msg)
        problems.append(msg)
    elif after.get("hub commit") != facts.get("hub commit"):
        log(
            "note: new commits during the run (%s -> %s), but the hub's source files did not change"
            % (facts.get("hub commit"), after.get("hub commit"))
        )
    medians = {}
    rows = [("workload", "hub", "postfix", "aiosmtpd", "hub/postfix", "hub/aiosmtpd")]
    notes = []
    for name, label, _size, _sessions, counts, unit in WORKLOADS:
        key = "mb_per_s" if unit == "MB/s" else "mails_per_s"
        med = {}
        for s in SERVERS:
            vals = [r[key] for r in results if r["server"] == s and r["workload"] == name]
            med[s] = statistics.median(vals) if vals else None
        medians[name] = med
        cells = [fmt_value(med[s], unit) for s in SERVERS]
        capped = [
            r
            for r in results
            if r["server"] == "aiosmtpd"
            and r["workload"] == name
            and r["mails_sent"] < (counts[1] if a.quick else counts[0])
        ]
        if capped:
            cells[2] += " (capped: %d mails)" % capped[0]["mails_sent"]
            notes.append(
                "aiosmtpd %s: capped at %d mails per run (too slow for the full count)"
                % (name, capped[0]["mails_sent"])
            )
        rows.append(
            (
                "%s (%s)" % (label, unit),
                *cells,
                fmt_ratio(med["hub"], med["postfix"]),
                fmt_ratio(med["hub"], med["aiosmtpd"]),
            )
        )
    log("")
    log("=" * 100)
    log(
        "SMTP ingest on loopback, fsync on, %s; median of %d run(s) per cell"
        % ("DATA" if not a.bdat else "BDAT where offered (hub, Postfix), DATA for aiosmtpd", reps)
    )
    log(
        "hub: authenticated site -> another site; Postfix: queue file fsynced, then discard; "
        "aiosmtpd: stock SMTP class, handler writes + fsyncs the file"
    )
    log("")
    log(table(rows))
    log("")
    if rss is not None:
        log(
            "hub peak RSS (VmHWM + index writer and launcher Pss) receiving one 1 GB mail: %.1f MB (target < 100 MB;"
            " %.1f MB right after start; the mail took %.1f s, %.1f MB/s)"
            % ((rss["hub_vmhwm"] or 0) / 1e6, (rss["hub_vmhwm_idle"] or 0) / 1e6, rss["seconds"], rss["mb_per_s"])
        )
    else:
        log("hub peak RSS for a 1 GB mail: not measured (--quick)")
    hwm = [r["hub_vmhwm"] for r in results if r.get("hub_vmhwm")]
    if hwm:
        log(
            "hub peak RSS (VmHWM + index writer and launcher Pss) during the workloads above: up to %.1f MB"
            % (max(hwm) / 1e6)
        )
    log("targets (issue 2): hub/postfix >= %s" % ", ".join("%.1fx for %s" % (v, k) for k, v in TARGETS.items()))
    log("")
    log("all runs (%s):" % ", ".join(SERVERS))
    for name, label, _size, _sessions, _counts, unit in WORKLOADS:
        key = "mb_per_s" if unit == "MB/s" else "mails_per_s"
        parts = []
        for s in SERVERS:
            vals = [fmt_value(r[key], unit) for r in results if r["server"] == s and r["workload"] == name]
            parts.append("%s %s" % (s, "/".join(vals) or "-"))
        log("  %-26s %s  [%s]" % (label, "; ".join(parts), unit))
    for note in notes:
        log("note: " + note)
    log("")
    log("machine: nproc %d, CPU %s, %d MB RAM, %s" % (facts["nproc"], facts["cpu"], facts["mem_mb"], software(facts)))
    log("data:    %s (filesystem %s), deleted after each run" % (workdir, facts["filesystem"]))
    log("load:    before: %s" % uptime_before)
    log("         after:  %s" % uptime_after)
    loads = [r["load_before"][0] for r in results]
    if loads:
        log("         1-minute load at the start of each run: %.2f .. %.2f" % (min(loads), max(loads)))
        if max(loads) > 0.5 * (facts["nproc"] or 1):
            log("         the machine was busy with other work: treat the figures as lower bounds")
    log("command: %s   (in %s)" % (command, os.getcwd()))
    log("time:    %.0f s (%.1f min)" % (elapsed, elapsed / 60))
    if kept_logs:
        log("hub logs (non-empty) kept in %s" % kept_logs)
    if problems:
        warn("%d problem(s) during the run:\n!!!   %s" % (len(problems), "\n!!!   ".join(problems)))
    else:
        log("all runs: failures == 0")

    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {
                    "command": command,
                    "machine": facts,
                    "reps": reps,
                    "quick": a.quick,
                    "bdat": a.bdat,
                    "uptime_before": uptime_before,
                    "uptime_after": uptime_after,
                    "seconds": elapsed,
                    "medians": medians,
                    "runs": results,
                    "rss_1gb": rss,
                    "problems": problems,
                },
                f,
                indent=1,
            )
        log("json:    %s" % a.json)
    return 1 if problems else 0


def run_sustained(a, command, facts, uptime_before, own_workdir, workdir, logs_dir):
    from bench.sustained import main_sustained  # it imports this module

    started = time.time()
    reports = []
    try:
        reports = main_sustained(a, workdir, logs_dir)
    except KeyboardInterrupt:
        warn("interrupted; servers stopped")
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    log("")
    log("machine: nproc %d, CPU %s, %d MB RAM, %s" % (facts["nproc"], facts["cpu"], facts["mem_mb"], software(facts)))
    log("load:    before: %s" % uptime_before)
    log("         after:  %s" % uptime_line())
    log("command: %s   (in %s)" % (command, os.getcwd()))
    log("time:    %.0f s" % (time.time() - started))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"command": command, "machine": facts, "reports": reports}, f, indent=1)
        log("json:    %s" % a.json)
    return 0 if reports and all(r["hub_alive"] for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
