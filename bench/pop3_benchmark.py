# POP3 download benchmark (issue 3, "How it is shown"): the hub side by side with Debian's Dovecot
# (dovecot-pop3d, throw-away config on loopback, maildir) serving the same mails in one run:
#   (a) MB/s of 50 MB mails: 20 mails in one mailbox, one session, RETR all, no DELE;
#       and 4 sessions in parallel over 4 mailboxes of 5 mails each
#   (b) mails/s of 1 MB mails: 500 mails (--quick: 200) in one mailbox, one session
#   (c) the hub's peak RSS (VmHWM) while serving them (the hub is filled through one process and
#       serves from a fresh one, so the SMTP ingest does not count); beside it the largest VmHWM seen
#       in any Dovecot `pop3` process (sampled every 50 ms while they live)
# Each timed run also shows the server's CPU seconds (hub process; Dovecot master + reaped children).
# The client is bench/pop3_fetch (raw sockets, 4 MB recv_into buffer; poplib would be the bottleneck).
# The hub's mailboxes are filled over SMTP (bench/smtp_blast, an authenticated site sending to the
# receiving sites), Dovecot's maildirs get the same bytes written directly (deliver_to_maildir); the
# hub's copies carry its ~200-byte Received: header on top. Before the timed runs every mailbox gets
# one untimed USER/PASS/STAT/QUIT session on both servers (Dovecot builds its index, as it would at
# LMTP delivery). Each rep starts both servers fresh in empty folders under /var/tmp, filled anew,
# and deletes the folders afterwards; servers take turns (rotated order); 3 reps (--quick: 1), the
# table shows medians. In rep 1 every message of every mailbox is downloaded once more, untimed,
# with its SHA-256 checked: body hash and header identical to what was sent, only a leading
# Received:/Return-Path: trace block allowed on top. All data is in the page cache (written just
# before), for both servers alike. Needs root (Dovecot runs mail processes as user `mail`) and
# bench/install-debian-packages.sh.
#   .venv/bin/python -m bench.pop3_benchmark [--quick] [--workdir DIR] [--json OUT]
import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from bench.common import argument_parser, command_line
from bench.ingest_benchmark import (
    HUB_DOMAIN,
    PASSWORD,
    SENDER,
    cpu_model,
    filesystem_of,
    fmt_ratio,
    fmt_value,
    hub_server,
    interrupt_once,
    loadavg,
    log,
    make_workdir,
    mem_total_mb,
    read_log_problems,
    software,
    table,
    uptime_line,
    versions,
    vm_status,
    warn,
)
from bench.pop3_fetch import Conn, _cmd, fetch_all
from bench.smtp_blast import blast, make_body, make_header
from loadtest.thirdparty import LOOPBACK, deliver_to_maildir, dovecot_server

SERVERS = ("hub", "dovecot")
MAIL_FROM = "%s@%s" % (SENDER, HUB_DOMAIN)
GB = 1_000_000_000

# name, label, mail size, mailboxes, (mails per mailbox, --quick), unit shown
WORKLOADS = (
    ("50MB", "50 MB mails, 1 session", 50_000_000, 1, (20, 20), "MB/s"),
    ("50MBx4", "50 MB mails, 4 sessions (4 x 5)", 50_000_000, 4, (5, 5), "MB/s"),
    ("1MB", "1 MB mails, 1 session", 1_000_000, 1, (500, 200), "mails/s"),
)
# Targets from issue 3: hub/dovecot ratios.
TARGETS = {"50MB": 2.0, "50MBx4": 2.0, "1MB": 1.0}
FILL_SESSIONS = {50_000_000: 4, 1_000_000: 8}


def mailboxes(wl):
    name, _label, _size, nbox, _counts, _unit = wl
    if nbox == 1:
        return ["bench-r%s" % name.lower()]
    return ["bench-r%s-%d" % (name.lower(), k + 1) for k in range(nbox)]


def dovecot_version():
    with contextlib.suppress(Exception):
        return subprocess.run(["dovecot", "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    return "unknown"


def cpu_seconds(pid):
    """utime + stime of pid (all its threads) + reaped children's, in seconds; None if unreadable."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return None


# ------------------------------------------------------------------------- filling the mailboxes


def fill_hub(hub, wl, mails, body):
    """Submit `mails` mails per mailbox of wl over SMTP. Returns (failures, error texts)."""
    size = wl[2]
    fails, errors = 0, []
    for box in mailboxes(wl):

        async def go():
            return await asyncio.wait_for(
                blast(
                    LOOPBACK,
                    hub.smtp_port,
                    sessions=min(FILL_SESSIONS[size], mails),
                    mails=mails,
                    size=size,
                    user=SENDER,
                    password=PASSWORD,
                    mail_from=MAIL_FROM,
                    rcpt="%s@%s" % (box, HUB_DOMAIN),
                    body=body,
                ),
                300 + mails * size / 2e6,
            )

        try:
            r = asyncio.run(go())
        except TimeoutError:
            r = {"failures": mails, "errors": ["SMTP fill timed out"]}
        fails += r["failures"]
        errors += r.get("errors", [])
    return fails, errors


def fill_dovecot(run_dir, wl, mails, body, tag):
    """The same messages (make_header(i, ...) + body) straight into each maildir's new/."""
    for box in mailboxes(wl):
        rcpt = "%s@%s" % (box, HUB_DOMAIN)
        for i in range(mails):
            deliver_to_maildir(run_dir, box, make_header(i, MAIL_FROM, rcpt, tag) + body)


def touch_mailbox(port, user):
    """Untimed USER/PASS/STAT/QUIT. Returns the message count."""
    with socket.create_connection((LOOPBACK, port), timeout=300) as sock:
        conn = Conn(sock, 1 << 16)
        if not conn.readline().startswith(b"+OK"):
            raise RuntimeError("no POP3 greeting")
        _cmd(sock, conn, "USER " + user)
        _cmd(sock, conn, "PASS " + PASSWORD)
        n = int(_cmd(sock, conn, "STAT").split()[1])
        _cmd(sock, conn, "QUIT")
        return n


# ------------------------------------------------------------------------- verification (untimed)

HEADER_RE = re.compile(
    rb"^From: <[^>]*>\r\nTo: <[^>]*>\r\nSubject: smtp_blast (\d+)\r\n"
    rb"Message-ID: <([^>]*)\.(\d+)@smtp-blast\.invalid>\r\n\r\n$"
)
TRACE_RE = re.compile(rb"^(?:(?:Received|Return-Path):[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*)*")


class Splitter:
    """Sink for Conn.read_dot_terminated: keeps the header block (up to CRLF CRLF), hashes the rest."""

    def __init__(self):
        self.head = bytearray()
        self.body = None
        self.body_len = 0

    def feed(self, mv):
        if self.body is not None:
            self.body.update(mv)
            self.body_len += len(mv)
            return
        start = max(0, len(self.head) - 3)
        self.head += mv
        i = self.head.find(b"\r\n\r\n", start)
        if i >= 0:
            rest = bytes(self.head[i + 4 :])
            del self.head[i + 4 :]
            self.body = hashlib.sha256(rest)
            self.body_len = len(rest)
        elif len(self.head) > 1 << 20:
            raise ValueError("no end of header within 1 MB")


def verify_mailbox(port, user, mails, body_sha, body_len):
    """Download every message once more and check it. Returns (checked, [problems], trace bytes)."""
    problems, seen, trace_bytes = [], set(), []
    rcpt = "%s@%s" % (user, HUB_DOMAIN)
    with socket.create_connection((LOOPBACK, port), timeout=300) as sock:
        conn = Conn(sock)
        if not conn.readline().startswith(b"+OK"):
            raise RuntimeError("no POP3 greeting")
        _cmd(sock, conn, "USER " + user)
        _cmd(sock, conn, "PASS " + PASSWORD)
        count = int(_cmd(sock, conn, "STAT").split()[1])
        if count != mails:
            problems.append("%s: %d messages, expected %d" % (user, count, mails))
        for n in range(1, count + 1):
            _cmd(sock, conn, "RETR %d" % n)
            s = Splitter()
            conn.read_dot_terminated(s.feed)
            head = bytes(s.head)
            trace = TRACE_RE.match(head).end()
            trace_bytes.append(trace)
            m = HEADER_RE.match(head[trace:])
            ok = (
                m is not None
                and s.body is not None
                and head[trace:] == make_header(int(m.group(1)), MAIL_FROM, rcpt, m.group(2).decode())
                and s.body_len == body_len
                and s.body.hexdigest() == body_sha
            )
            if not ok:
                problems.append(
                    "%s message %d: header or body SHA-256 differs from what was sent "
                    "(header %r..., body %d bytes)" % (user, n, head[:120], s.body_len)
                )
            elif int(m.group(1)) in seen:
                problems.append("%s message %d: mail %s served twice" % (user, n, m.group(1).decode()))
            else:
                seen.add(int(m.group(1)))
        _cmd(sock, conn, "QUIT")
    if len(seen) != mails and not problems:
        problems.append("%s: %d distinct mails verified, expected %d" % (user, len(seen), mails))
    return count, problems, trace_bytes


# ------------------------------------------------------------------------- RSS sampling for Dovecot


class PeakSampler:
    """Every 50 ms: largest VmHWM among the direct children of `parent` named `comm` (Dovecot's
    per-session pop3 processes). Reads /proc/PID/task/PID/children, so it costs next to nothing."""

    def __init__(self, parent, comm="pop3"):
        self.parent, self.comm, self.peak = parent, comm, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        path = "/proc/%d/task/%d/children" % (self.parent, self.parent)
        while not self._stop.is_set():
            with contextlib.suppress(OSError, ValueError):
                with open(path) as f:
                    kids = [int(x) for x in f.read().split()]
                for k in kids:
                    with contextlib.suppress(OSError):
                        with open("/proc/%d/comm" % k) as f:
                            if f.read().strip() != self.comm:
                                continue
                        hwm = vm_status(k, "VmHWM")
                        if hwm and hwm > self.peak:
                            self.peak = hwm
            self._stop.wait(0.05)

    def __enter__(self):
        if self.parent > 0:
            self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._t.is_alive():
            self._t.join()


# ------------------------------------------------------------------------- one measurement


def timed_fetch(port, accounts, timeout):
    """fetch_all in a thread; on timeout the caller's server shutdown ends the thread."""
    box = {}
    t = threading.Thread(
        target=lambda: box.update(r=fetch_all(LOOPBACK, port, accounts, sessions=len(accounts))), daemon=True
    )
    t.start()
    t.join(timeout)
    if t.is_alive():
        return {
            "messages": 0,
            "bytes": 0,
            "seconds": timeout,
            "mb_per_s": 0.0,
            "messages_per_s": 0.0,
            "failures": len(accounts),
            "errors": ["timed out after %.0f s" % timeout],
        }
    return box["r"]


def serve_and_measure(server, rep, order, counts, bodies, body_sha, workdir, logs_dir, verify):
    """Start `server` fresh, fill every mailbox, touch them, time each workload once (in `order`),
    optionally verify everything, stop, delete the folder. Returns (results, verification, problems)."""
    run_dir = tempfile.mkdtemp(prefix="%s-rep%d-" % (server, rep), dir=workdir)
    problems, results, verification = [], [], None
    all_boxes = [b for wl in WORKLOADS for b in mailboxes(wl)]
    try:
        t0 = time.perf_counter()
        if server == "hub":
            hub_log = os.path.join(logs_dir, "hub-rep%d.log" % rep)
            # fill through one hub process, then serve from a fresh one on the same data folder, so that
            # its VmHWM covers serving only (not the SMTP ingest)
            with hub_server(run_dir, hub_log, sites=(SENDER, *all_boxes), pop3=True) as filler:
                for wl in WORKLOADS:
                    fails, errors = fill_hub(filler, wl, counts[wl[0]], bodies[wl[2]])
                    if fails:
                        problems.append(
                            "hub rep %d: %d SMTP submissions failed filling %s: %s"
                            % (rep, fails, wl[0], "; ".join(errors[:3]))
                        )
            cm = hub_server(run_dir, hub_log, sites=(), pop3=True)
        else:
            cm = dovecot_server(run_dir, {b: PASSWORD for b in all_boxes}, protocols=("pop3",))
        with cm as handle:
            if server == "dovecot":
                tag = "%x.%x" % (int(time.time()), os.getpid())
                for wl in WORKLOADS:
                    fill_dovecot(run_dir, wl, counts[wl[0]], bodies[wl[2]], tag)
            pid = handle.proc.pid if server == "hub" else _dovecot_pid(run_dir)
            port = handle.pop3_port if server == "hub" else handle["pop3"]
            hwm_start = vm_status(pid, "VmHWM") if server == "hub" else None
            for wl in WORKLOADS:
                for b in mailboxes(wl):
                    n = touch_mailbox(port, b)
                    if n != counts[wl[0]]:
                        problems.append(
                            "%s rep %d: mailbox %s holds %d mails, expected %d" % (server, rep, b, n, counts[wl[0]])
                        )
            os.sync()  # fill writes reach the disk before anything is timed
            log(
                "        %s filled and indexed in %.1f s%s"
                % (
                    server,
                    time.perf_counter() - t0,
                    ", serving hub started afresh (VmHWM %.1f MB after start)" % ((hwm_start or 0) / 1e6)
                    if server == "hub"
                    else "",
                )
            )
            for wl in order:
                name, label, size, _nbox, _c, unit = wl
                accounts = [(b, PASSWORD) for b in mailboxes(wl)]
                mails = counts[name] * len(accounts)
                load_before = loadavg()
                timeout = 120 + mails * size / 5e6
                cpu0 = cpu_seconds(pid)
                with PeakSampler(pid if server == "dovecot" else -1) as sampler:
                    r = timed_fetch(port, accounts, timeout)
                time.sleep(0.3)  # Dovecot's master reaps the pop3 processes (their CPU time goes to it)
                cpu1 = cpu_seconds(pid)
                r = {k: v for k, v in r.items() if k != "sha256"}
                r.update(
                    server=server,
                    workload=name,
                    rep=rep,
                    mails_expected=mails,
                    load_before=load_before,
                    server_cpu_s=round(cpu1 - cpu0, 2) if cpu0 is not None and cpu1 is not None else None,
                )
                if server == "hub":
                    r["hub_vmhwm"] = vm_status(pid, "VmHWM")
                    r["hub_alive"] = handle.proc.poll() is None
                else:
                    r["dovecot_pop3_vmhwm"] = sampler.peak or None
                value = r["mb_per_s"] if unit == "MB/s" else r["messages_per_s"]
                log(
                    "        %-8s %-34s %8s %-7s (%.2f s, %.1f MB/s, %.1f mails/s, %d mails, server CPU %s s, "
                    "load %.2f)"
                    % (
                        server,
                        label,
                        fmt_value(value, unit),
                        unit,
                        r["seconds"],
                        r["mb_per_s"],
                        r["messages_per_s"],
                        r["messages"],
                        r["server_cpu_s"],
                        load_before[0],
                    )
                )
                if r["failures"] or r["messages"] != mails:
                    problems.append(
                        "%s %s rep %d: %d of %d mails downloaded, %d failed sessions: %s"
                        % (server, name, rep, r["messages"], mails, r["failures"], "; ".join(r.get("errors", [])[:3]))
                    )
                if server == "hub" and not r["hub_alive"]:
                    problems.append("hub %s rep %d: the hub process died" % (name, rep))
                results.append(r)
            if server == "hub":
                log(
                    "        hub VmHWM after the downloads %.1f MB (VmRSS now %.1f MB)"
                    % ((vm_status(pid, "VmHWM") or 0) / 1e6, (vm_status(pid, "VmRSS") or 0) / 1e6)
                )
            if verify:
                t1 = time.perf_counter()
                checked, vprobs, traces = 0, [], []
                for wl in WORKLOADS:
                    for b in mailboxes(wl):
                        c, p, tr = verify_mailbox(port, b, counts[wl[0]], body_sha[wl[2]], len(bodies[wl[2]]))
                        checked, vprobs, traces = checked + c, vprobs + p, traces + tr
                verification = {
                    "server": server,
                    "checked": checked,
                    "problems": vprobs,
                    "trace_bytes": (min(traces), max(traces)) if traces else None,
                    "seconds": round(time.perf_counter() - t1, 1),
                }
                log(
                    "        %s SHA-256 check (untimed): %d messages, %d mismatches, trace header on top "
                    "%s bytes, %.1f s"
                    % (
                        server,
                        checked,
                        len(vprobs),
                        "%d..%d" % verification["trace_bytes"] if traces else "-",
                        verification["seconds"],
                    )
                )
                problems += vprobs[:10]
        if server == "hub":
            lines = read_log_problems(hub_log)
            if lines:
                problems.append("hub rep %d logged %d warning/error lines, e.g. %s" % (rep, len(lines), lines[0][:200]))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        os.sync()
        time.sleep(1.0)
    return results, verification, problems


def _dovecot_pid(run_dir):
    """Pid of the Dovecot master that dovecot_server started for run_dir (found by its config path)."""
    conf = os.path.join(run_dir, "dovecot", "dovecot.conf")
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError):
                with open("/proc/%s/cmdline" % d, "rb") as f:
                    args = f.read().split(b"\0")
                if args[:1] and args[0].endswith(b"dovecot") and conf.encode() in args:
                    return int(d)
    return -1


# ------------------------------------------------------------------------- the run


def main():
    ap = argument_parser("bench.pop3_benchmark", "POP3 download benchmark: hub vs Dovecot, side by side in one run")
    ap.add_argument("--quick", action="store_true", help="200 instead of 500 1 MB mails, one repetition")
    ap.add_argument("--workdir", help="folder for all server data (default: a new folder under /var/tmp)")
    ap.add_argument("--json", metavar="OUT", help="also write all figures as JSON to OUT")
    ap.add_argument("--repeat", type=int, help="repetitions (default 3, --quick 1)")
    a = ap.parse_args()
    reps = a.repeat or (1 if a.quick else 3)
    command = command_line("bench.pop3_benchmark")
    if os.geteuid() != 0:
        sys.exit("pop3_benchmark: must run as root (Dovecot runs its mail processes as user mail)")
    if shutil.which("dovecot") is None or not os.path.exists("/usr/lib/dovecot/pop3"):
        sys.exit("pop3_benchmark: dovecot-pop3d missing; run bench/install-debian-packages.sh as root")

    interrupt_once()
    own_workdir, workdir, logs_dir = make_workdir(a.workdir, "mailhub-pop3-bench-")
    mnt, fstype, dev = filesystem_of(workdir)
    free = shutil.disk_usage(workdir).free

    started = time.time()
    uptime_before = uptime_line()
    facts = {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "mem_mb": mem_total_mb(),
        **versions(),
        "dovecot": dovecot_version(),
        "workdir": workdir,
        "filesystem": "%s on %s (%s)" % (mnt, dev, fstype),
    }
    facts.pop("postfix", None)
    facts.pop("aiosmtpd", None)
    counts = {wl[0]: (wl[4][1] if a.quick else wl[4][0]) for wl in WORKLOADS}
    log("pop3 benchmark: %s" % command)
    log(
        "machine: nproc %d, CPU %s, %d MB RAM, %s, dovecot %s"
        % (facts["nproc"], facts["cpu"], facts["mem_mb"], software(facts), facts["dovecot"])
    )
    log("data: %s, filesystem %s, %.1f GB free" % (workdir, facts["filesystem"], free / 1e9))
    log("load before: %s" % uptime_before)
    need = sum(wl[2] * wl[3] * counts[wl[0]] for wl in WORKLOADS) * 1.2 + GB
    if free < need:
        sys.exit("pop3_benchmark: %.1f GB free under %s, need %.1f GB" % (free / 1e9, workdir, need / 1e9))
    if loadavg()[0] > 0.5 * (os.cpu_count() or 1):
        log(
            "note: the machine is already busy (1-minute load %.2f on %d CPUs); "
            "figures will be lower and noisier than on an idle machine" % (loadavg()[0], os.cpu_count())
        )

    results, verifications, problems = [], [], []
    try:
        bodies = {}
        for wl in WORKLOADS:
            if wl[2] not in bodies:
                bodies[wl[2]] = make_body(max(0, wl[2] - 160))  # as smtp_blast does
        body_sha = {size: hashlib.sha256(b).hexdigest() for size, b in bodies.items()}
        plan = []
        for rep in range(reps):
            k = rep % len(SERVERS)
            order = WORKLOADS[rep % len(WORKLOADS) :] + WORKLOADS[: rep % len(WORKLOADS)]
            for server in SERVERS[k:] + SERVERS[:k]:  # rotated, so no server always goes first
                plan.append((rep + 1, server, order))
        for n, (rep, server, order) in enumerate(plan, 1):
            log(
                "[%d/%d] rep %d  %s: fresh server, fill, %s"
                % (n, len(plan), rep, server, ", ".join(w[0] for w in order))
            )
            res, ver, probs = serve_and_measure(
                server, rep, order, counts, bodies, body_sha, workdir, logs_dir, verify=(rep == 1)
            )
            results += res
            if ver:
                verifications.append(ver)
            for p in probs:
                warn(p)
            problems += probs
    except KeyboardInterrupt:
        warn("interrupted; servers stopped, partial results below")
        problems.append("interrupted")
    finally:
        kept_logs = None
        if any(os.path.getsize(os.path.join(logs_dir, f)) for f in os.listdir(logs_dir)):
            kept_logs = logs_dir
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
    if after["hub code"] != facts["hub code"]:
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
    rows = [("workload", "hub", "dovecot", "hub/dovecot", "target")]
    for name, label, _size, nbox, _c, unit in WORKLOADS:
        key = "mb_per_s" if unit == "MB/s" else "messages_per_s"
        med = {}
        for s in SERVERS:
            vals = [r[key] for r in results if r["server"] == s and r["workload"] == name]
            med[s] = statistics.median(vals) if vals else None
        medians[name] = med
        mails = counts[name] * nbox
        rows.append(
            (
                "%s, %d mails (%s)" % (label, mails, unit),
                fmt_value(med["hub"], unit),
                fmt_value(med["dovecot"], unit),
                fmt_ratio(med["hub"], med["dovecot"]),
                ">= %.1fx" % TARGETS[name],
            )
        )
        if unit != "MB/s":
            mb = {
                s: statistics.median([r["mb_per_s"] for r in results if r["server"] == s and r["workload"] == name])
                if any(r["server"] == s and r["workload"] == name for r in results)
                else None
                for s in SERVERS
            }
            rows.append(
                (
                    "  same, in MB/s",
                    fmt_value(mb["hub"], "MB/s"),
                    fmt_value(mb["dovecot"], "MB/s"),
                    fmt_ratio(mb["hub"], mb["dovecot"]),
                    "",
                )
            )
    hub_hwm = [r["hub_vmhwm"] for r in results if r.get("hub_vmhwm")]
    dc_hwm = [r["dovecot_pop3_vmhwm"] for r in results if r.get("dovecot_pop3_vmhwm")]
    rows.append(
        (
            "peak RSS while serving (MB) *",
            fmt_value(max(hub_hwm) / 1e6 if hub_hwm else None, ""),
            fmt_value(max(dc_hwm) / 1e6 if dc_hwm else None, ""),
            "",
            "",
        )
    )
    log("")
    log("=" * 100)
    log(
        "POP3 download on loopback, client bench/pop3_fetch (RETR all, no DELE), data in page cache; "
        "median of %d run(s) per cell" % reps
    )
    log("")
    log(table(rows))
    log("")
    log(
        "* hub: VmHWM of the hub process serving (started afresh on the filled data folder, so not the SMTP "
        "fill), read after the timed downloads, max over reps; dovecot: largest VmHWM of one `pop3` process "
        "(one per session), sampled every 50 ms"
    )
    log("targets (issue 3): 2x Dovecot for 50 MB mails, Dovecot parity at least for 1 MB mails")
    for v in verifications:
        log(
            "SHA-256 (untimed extra download, rep 1): %s %d messages, %s; trace header on top: %s bytes"
            % (
                v["server"],
                v["checked"],
                "all match" if not v["problems"] else "%d MISMATCHES" % len(v["problems"]),
                "%d..%d" % tuple(v["trace_bytes"]) if v["trace_bytes"] else "-",
            )
        )
    if not verifications:
        log("SHA-256: not checked (interrupted before)")
    log("")
    log("all runs (%s):" % ", ".join(SERVERS))
    for name, label, _size, _nbox, _c, unit in WORKLOADS:
        key = "mb_per_s" if unit == "MB/s" else "messages_per_s"
        parts = []
        for s in SERVERS:
            vals = [fmt_value(r[key], unit) for r in results if r["server"] == s and r["workload"] == name]
            parts.append("%s %s" % (s, "/".join(vals) or "-"))
        log("  %-34s %s  [%s]" % (label, "; ".join(parts), unit))
        cpu = []
        for s in SERVERS:
            vals = [
                "%.1f" % (r["server_cpu_s"] / (r["bytes"] / GB))
                for r in results
                if r["server"] == s and r["workload"] == name and r.get("server_cpu_s") is not None and r["bytes"]
            ]
            cpu.append("%s %s" % (s, "/".join(vals) or "-"))
        log("  %-34s %s  [server CPU s per GB sent]" % ("", "; ".join(cpu)))
    log("")
    log(
        "machine: nproc %d, CPU %s, %d MB RAM, %s, dovecot %s"
        % (facts["nproc"], facts["cpu"], facts["mem_mb"], software(facts), facts["dovecot"])
    )
    log("data:    %s (filesystem %s), deleted after each rep" % (workdir, facts["filesystem"]))
    log("load:    before: %s" % uptime_before)
    log("         after:  %s" % uptime_after)
    loads = [r["load_before"][0] for r in results]
    if loads:
        log("         1-minute load at the start of each timed download: %.2f .. %.2f" % (min(loads), max(loads)))
        if max(loads) > 0.5 * (facts["nproc"] or 1):
            log("         the machine was busy with other work: treat the figures as lower bounds")
    log("command: %s   (in %s)" % (command, os.getcwd()))
    log("time:    %.0f s (%.1f min)" % (elapsed, elapsed / 60))
    if kept_logs:
        log("hub logs (non-empty) kept in %s" % kept_logs)
    if problems:
        warn("%d problem(s) during the run:\n!!!   %s" % (len(problems), "\n!!!   ".join(problems)))
    else:
        log("all runs: failures == 0, every message verified")

    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {
                    "command": command,
                    "machine": facts,
                    "reps": reps,
                    "quick": a.quick,
                    "uptime_before": uptime_before,
                    "uptime_after": uptime_after,
                    "seconds": elapsed,
                    "medians": medians,
                    "runs": results,
                    "verification": verifications,
                    "problems": problems,
                },
                f,
                indent=1,
            )
        log("json:    %s" % a.json)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
