# Sustained SMTP ingest, hub against Postfix (`python -m bench.ingest_benchmark --sustained`, issue
# 24): each server is started once per workload and kept running; rounds alternate between them
# (the first side alternating from round to round), each side sending for at least --seconds per
# round; the hub's receiving mailbox is never emptied, so every round lands on a bigger backlog
# (--prefill puts mails there before the first round). Postfix queues with fsync and discards, as
# in the fresh benchmark; --postfix picks its configuration: "private" (the throw-away instance of
# loadtest/thirdparty.py, logging through postlogd into a file), "stock" (the same with Debian's
# stock logging: to syslog, which here has no daemon listening, so nothing is written), or "both".
# Per round and side: mails/s (MB/s for 50 MB mails), CPU seconds per mail of the server's
# processes (the hub's event-loop process and its index writer apart; Postfix: master and all its
# children, exited ones included, up to the end of its deliveries: after each Postfix slice the
# next one waits until its queue is empty), the backlog the round started on; per workload the median of
# the per-round ratios against each Postfix and the hub's peak RSS (VmHWM of the hub plus the
# proportional memory of its index writer and its launcher). Prints one table per workload, ready
# for docs/benchmarks.md.
# Imports nothing of the hub's internals (it runs `mailhub serve` and speaks SMTP).
import asyncio
import contextlib
import functools
import os
import shutil
import statistics
import tempfile
import time

from bench.ab_ingest import UNTHROTTLED
from bench.common import children
from bench.ingest_benchmark import (
    HUB_DOMAIN,
    PASSWORD,
    RECEIVER,
    SENDER,
    TARGETS,
    WORKLOADS,
    hub_peak_rss,
    hub_server,
    loadavg,
    log,
    table,
    warn,
)
from bench.smtp_blast import blast, make_body
from loadtest.thirdparty import LOOPBACK, postfix_instance

CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid, tid=None):
    """(utime + stime, cutime + cstime) of a process (or of its thread `tid`) in seconds, or (0, 0)
    if it is gone."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        with open("/proc/%d/stat" % pid if tid is None else "/proc/%d/task/%d/stat" % (pid, tid)) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICK, (int(fields[13]) + int(fields[14])) / CLOCK_TICK
    return 0.0, 0.0


def hub_cpu(pid):
    """CPU s of the hub: {"loop": its main thread (the event loop), "threads": its other threads
    (disk writes, hashing, aiosqlite), "writer": its descendants (the index writer process and
    its launcher)}."""
    own, _ = _stat(pid)
    loop, _ = _stat(pid, pid)
    return {"loop": loop, "threads": own - loop, "writer": sum(tree_cpu(child) for child in children(pid))}


def tree_cpu(pid):
    """CPU s of a process, its live descendants and the children it has reaped (Postfix's master
    reaps smtpd and cleanup processes that end after max_use)."""
    own, reaped = _stat(pid)
    total = own + reaped
    for child in children(pid):
        total += tree_cpu(child)
    return total


def master_pid(queue_dir):
    with contextlib.suppress(OSError, ValueError):
        with open(os.path.join(queue_dir, "pid", "master.pid")) as f:
            return int(f.read().strip())
    return None


@contextlib.contextmanager
def postfix_server(workdir, kind):
    """A Postfix sink (queue with fsync, discard) of configuration `kind`; yields (port, master pid)."""

    def stock(main_cf):  # Debian's stock instance logs to syslog, not through postlogd to a file
        return "\n".join(line for line in main_cf.splitlines() if not line.startswith("maillog_file")) + "\n"

    edit = stock if kind == "stock" else (lambda main_cf: main_cf)
    with postfix_instance(workdir, edit, "") as port:
        yield port, master_pid(os.path.join(os.path.abspath(workdir), "postfix", "queue"))


def send(port, workload, mails, body, auth):
    _name, _label, size, sessions, _counts, _unit = workload
    kw = {}
    if auth:
        kw = {
            "user": SENDER,
            "password": PASSWORD,
            "mail_from": "%s@%s" % (SENDER, HUB_DOMAIN),
            "rcpt": "%s@%s" % (RECEIVER, HUB_DOMAIN),
        }
    return asyncio.run(blast(LOOPBACK, port, sessions, mails, size, body=body, **kw))


def machine_cpu():
    """(busy, all) jiffies of the whole machine since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def queue_drained(queue_dir, deadline=120.0):
    """Wait until Postfix has delivered (discarded) every mail it queued; the seconds it took. Its
    deliveries are its work for the slice: counted in its CPU, and not left to run in the next
    side's slice (where they took up to a core from the server measured then)."""
    start = time.monotonic()
    while time.monotonic() - start < deadline:
        queued = any(
            files for sub in ("maildrop", "incoming", "active") for _, _, files in os.walk(os.path.join(queue_dir, sub))
        )
        if not queued:
            return time.monotonic() - start
        time.sleep(0.05)
    warn("Postfix's queue %s still held mail after %.0f s" % (queue_dir, deadline))
    return time.monotonic() - start


class Side:
    """One server under test: sends slices and keeps the per-round figures. `settle()`, if any,
    waits after a slice until the server has done the work the slice left it (Postfix: delivering)."""

    def __init__(self, name, port, cpu, auth, settle=None):
        self.name, self.port, self.cpu, self.auth, self.settle = name, port, cpu, auth, settle
        self.rate = None  # mails/s of the last slice (sizes the next one)
        self.rounds = []

    def run_slice(self, workload, body, seconds):
        """Send for at least `seconds`; the round's figures."""
        sessions = workload[3]
        totals = {"mails": 0, "bytes": 0, "seconds": 0.0, "failures": 0}
        cpu_before, machine_before = self.cpu(), machine_cpu()
        while totals["seconds"] < seconds:
            left = seconds - totals["seconds"]
            mails = max(2 * sessions, int((self.rate or 0) * left * 1.05) or 4 * sessions)
            result = send(self.port, workload, mails, body, self.auth)
            for key in totals:
                totals[key] += result[key] if key != "failures" else result.get("failures", 0)
            if result["seconds"] > 0 and result["mails"]:
                self.rate = result["mails"] / result["seconds"]
            if result.get("failures"):
                warn("%s: %d mails failed: %s" % (self.name, result["failures"], result.get("errors", [])[:3]))
                break
        settled = self.settle() if self.settle is not None else 0.0
        cpu_after, machine_after = self.cpu(), machine_cpu()
        figures = dict(totals)
        busy, every = (after - before for after, before in zip(machine_after, machine_before, strict=True))
        figures["machine_busy"] = (os.cpu_count() or 1) * busy / every if every else 0.0  # cores busy
        figures["settle_s"] = settled
        figures["mails_per_s"] = totals["mails"] / totals["seconds"] if totals["seconds"] else 0.0
        figures["mb_per_s"] = totals["bytes"] / 1e6 / totals["seconds"] if totals["seconds"] else 0.0
        figures["cpu"] = {k: cpu_after[k] - cpu_before[k] for k in cpu_after}
        figures["load"] = loadavg()[0]
        self.rounds.append(figures)
        return figures


def cpu_ms_per_mail(figures, key=None):
    if not figures["mails"]:
        return None
    cpu = figures["cpu"]
    seconds = sum(cpu.values()) if key is None else cpu[key]
    return 1000 * seconds / figures["mails"]


def run_workload(workload, workdir, logs_dir, args):
    """Rounds of one workload; returns its report (dict)."""
    name, label, size, sessions, _counts, unit = workload
    body = make_body(max(0, size - 160))
    kinds = ["private", "stock"] if args.postfix == "both" else [args.postfix]
    report = {"workload": name, "label": label, "rounds": [], "postfix": kinds}
    with contextlib.ExitStack() as stack:
        hub_dir = tempfile.mkdtemp(prefix="sustained-hub-%s-" % name, dir=workdir)
        stack.callback(shutil.rmtree, hub_dir, ignore_errors=True)
        hub = stack.enter_context(
            hub_server(hub_dir, os.path.join(logs_dir, "hub-sustained-%s.log" % name), extra_env=UNTHROTTLED)
        )
        sides = [Side("hub", hub.port, lambda: hub_cpu(hub.proc.pid), auth=True)]
        for kind in kinds:
            pf_dir = tempfile.mkdtemp(prefix="sustained-postfix-%s-" % kind, dir=workdir)
            stack.callback(shutil.rmtree, pf_dir, ignore_errors=True)
            port, master = stack.enter_context(postfix_server(pf_dir, kind))
            queue = os.path.join(os.path.abspath(pf_dir), "postfix", "queue")
            sides.append(
                Side(
                    "postfix-" + kind,
                    port,
                    lambda m=master: {"postfix": tree_cpu(m)},
                    auth=False,
                    settle=functools.partial(queue_drained, queue),
                )
            )
        backlog = 0
        if args.prefill:
            log("  prefill: %d mails into the hub's mailbox ..." % args.prefill)
            result = send(hub.port, workload, args.prefill, body, auth=True)
            backlog += result["mails"]
            log("  prefill done: %d mails in %.1f s" % (result["mails"], result["seconds"]))
        for round_no in range(args.rounds):
            order = sides if round_no % 2 == 0 else [sides[0]] if len(sides) == 1 else sides[1:] + sides[:1]
            row = {"round": round_no + 1, "backlog_mails": backlog, "backlog_gb": backlog * size / 1e9}
            for side in order:
                figures = side.run_slice(workload, body, args.seconds)
                row[side.name] = figures
                if side.name == "hub":
                    backlog += figures["mails"]
                log(
                    "  round %d %-15s %8.1f mails/s %7.1f MB/s  CPU %.2f ms/mail  (%d mails, %.1f s,"
                    " load %.1f, cores busy %.2f%s)"
                    % (
                        round_no + 1,
                        side.name,
                        figures["mails_per_s"],
                        figures["mb_per_s"],
                        cpu_ms_per_mail(figures) or 0.0,
                        figures["mails"],
                        figures["seconds"],
                        figures["load"],
                        figures["machine_busy"],
                        ", its queue drained %.1f s later" % figures["settle_s"] if side.settle else "",
                    )
                )
            row["hub_peak_rss"] = hub_peak_rss(hub.proc.pid)
            report["rounds"].append(row)
        report["hub_alive"] = hub.proc.poll() is None
    return report


def capacity(figures):
    """Mails/s the server could take on this machine with nothing else running, from its CPU per
    mail: all cores busy, and for the hub no more than its event loop's one core allows."""
    mails, cpu, cores = figures["mails"], figures["cpu"], os.cpu_count() or 1
    total = sum(cpu.values())
    if not mails or not total:
        return None
    limit = cores * mails / total
    if cpu.get("loop"):
        limit = min(limit, mails / cpu["loop"])
    return limit


def ratios(report, kind):
    out = []
    for row in report["rounds"]:
        hub, pf = row["hub"], row["postfix-" + kind]
        if pf["mails_per_s"]:
            out.append(hub["mails_per_s"] / pf["mails_per_s"])
    return out


def print_report(report, unit):
    kinds = report["postfix"]
    head = ["round", "backlog (mails, GB)", "hub " + unit]
    for kind in kinds:
        head += ["Postfix %s %s" % (kind, unit), "ratio"]
    head += ["hub CPU ms/mail (loop + threads + writer)"] + ["Postfix %s CPU ms/mail" % kind for kind in kinds]
    head += ["CPU-bound ratio (%s)" % kind for kind in kinds] + ["load"]
    rows = [head]
    value = "mb_per_s" if unit == "MB/s" else "mails_per_s"
    for row in report["rounds"]:
        hub = row["hub"]
        line = [str(row["round"]), "%d, %.1f" % (row["backlog_mails"], row["backlog_gb"]), "%.1f" % hub[value]]
        for kind in kinds:
            pf = row["postfix-" + kind]
            line += ["%.1f" % pf[value], "%.2fx" % (hub[value] / pf[value]) if pf[value] else "-"]
        line.append(
            "%.2f (%.2f + %.2f + %.2f)"
            % (
                cpu_ms_per_mail(hub) or 0,
                cpu_ms_per_mail(hub, "loop") or 0,
                cpu_ms_per_mail(hub, "threads") or 0,
                cpu_ms_per_mail(hub, "writer") or 0,
            )
        )
        line += ["%.2f" % (cpu_ms_per_mail(row["postfix-" + kind]) or 0) for kind in kinds]
        for kind in kinds:
            ours, theirs = capacity(hub), capacity(row["postfix-" + kind])
            line.append("%.2fx" % (ours / theirs) if ours and theirs else "-")
        line.append("%.1f" % hub["load"])
        rows.append(line)
    log(table(rows))
    target = TARGETS.get(report["workload"])
    for kind in kinds:
        r = ratios(report, kind)
        if r:
            log(
                "%s: hub/Postfix (%s) median of %d rounds %.2fx (range %.2f-%.2f)%s"
                % (
                    report["label"],
                    kind,
                    len(r),
                    statistics.median(r),
                    min(r),
                    max(r),
                    "; goal %.1fx: %s" % (target, "met" if statistics.median(r) >= target else "NOT met")
                    if target
                    else "",
                )
            )
    for kind in kinds:
        cpu_bound = [
            capacity(row["hub"]) / capacity(row["postfix-" + kind])
            for row in report["rounds"]
            if capacity(row["hub"]) and capacity(row["postfix-" + kind])
        ]
        if cpu_bound:
            log(
                "%s: CPU-bound ratio against Postfix (%s), median %.2fx: mails/s each could take on this machine"
                " alone, from its CPU per mail (hub: at most one core for its event loop)"
                % (report["label"], kind, statistics.median(cpu_bound))
            )
    hub_rates = [row["hub"]["mails_per_s"] for row in report["rounds"]]
    peak = max((row["hub_peak_rss"] or 0) for row in report["rounds"]) if report["rounds"] else 0
    log(
        "%s: hub median %.1f mails/s (%.1f MB/s); peak RSS of the hub processes %.1f MB (goal < 150 MB: %s)"
        % (
            report["label"],
            statistics.median(hub_rates) if hub_rates else 0.0,
            statistics.median([row["hub"]["mb_per_s"] for row in report["rounds"]]) if hub_rates else 0.0,
            peak / 1e6,
            "met" if peak < 150e6 else "NOT met",
        )
    )


def run_backlog_ab(workload, workdir, logs_dir, args):
    """--backlog-ab N: the hub with N mails of the workload in its mailbox (growing, never emptied)
    against a hub started empty in a new folder every round, in alternating slices: what the
    backlog costs per mail, the machine's load alike for both."""
    name, label, size, _sessions, _counts, unit = workload
    body = make_body(max(0, size - 160))
    rows = []
    with contextlib.ExitStack() as stack:
        full_dir = tempfile.mkdtemp(prefix="backlog-hub-%s-" % name, dir=workdir)
        stack.callback(shutil.rmtree, full_dir, ignore_errors=True)
        full = stack.enter_context(
            hub_server(full_dir, os.path.join(logs_dir, "hub-backlog-%s.log" % name), extra_env=UNTHROTTLED)
        )
        log("  prefill: %d mails into the hub's mailbox ..." % args.backlog_ab)
        result = send(full.port, workload, args.backlog_ab, body, auth=True)
        backlog = result["mails"]
        log("  prefill done: %d mails in %.1f s" % (result["mails"], result["seconds"]))
        backlog_side = Side("hub-backlog", full.port, lambda: hub_cpu(full.proc.pid), auth=True)
        for round_no in range(args.rounds):
            fresh_dir = tempfile.mkdtemp(prefix="backlog-fresh-%s-" % name, dir=workdir)
            try:
                with hub_server(
                    fresh_dir, os.path.join(logs_dir, "hub-fresh-%s.log" % name), extra_env=UNTHROTTLED
                ) as fresh:
                    fresh_side = Side("hub-empty", fresh.port, lambda: hub_cpu(fresh.proc.pid), auth=True)
                    fresh_side.rate = backlog_side.rate
                    order = [backlog_side, fresh_side] if round_no % 2 == 0 else [fresh_side, backlog_side]
                    row = {"round": round_no + 1, "backlog_mails": backlog, "backlog_gb": backlog * size / 1e9}
                    for side in order:
                        row[side.name] = side.run_slice(workload, body, args.seconds)
                        log(
                            "  round %d %-12s %8.1f mails/s  CPU %.2f ms/mail (%d mails, %.1f s, load %.1f)"
                            % (
                                round_no + 1,
                                side.name,
                                row[side.name]["mails_per_s"],
                                cpu_ms_per_mail(row[side.name]) or 0.0,
                                row[side.name]["mails"],
                                row[side.name]["seconds"],
                                row[side.name]["load"],
                            )
                        )
                    backlog += row["hub-backlog"]["mails"]
            finally:
                shutil.rmtree(fresh_dir, ignore_errors=True)
            rows.append(row)
    head = ["round", "backlog (mails, GB)", "empty " + unit, "backlog " + unit, "ratio"]
    head += ["CPU ms/mail empty (loop + threads + writer)", "CPU ms/mail backlog", "CPU ratio", "load"]
    lines = [head]
    value = "mb_per_s" if unit == "MB/s" else "mails_per_s"

    def split(figures):
        return "%.2f (%.2f + %.2f + %.2f)" % (
            cpu_ms_per_mail(figures) or 0,
            cpu_ms_per_mail(figures, "loop") or 0,
            cpu_ms_per_mail(figures, "threads") or 0,
            cpu_ms_per_mail(figures, "writer") or 0,
        )

    for row in rows:
        empty, full_ = row["hub-empty"], row["hub-backlog"]
        lines.append(
            [
                str(row["round"]),
                "%d, %.1f" % (row["backlog_mails"], row["backlog_gb"]),
                "%.1f" % empty[value],
                "%.1f" % full_[value],
                "%.2fx" % (full_[value] / empty[value]) if empty[value] else "-",
                split(empty),
                split(full_),
                "%.2fx" % ((cpu_ms_per_mail(full_) or 0) / (cpu_ms_per_mail(empty) or 1)),
                "%.1f" % full_["load"],
            ]
        )
    log(table(lines))
    rate = [row["hub-backlog"][value] / row["hub-empty"][value] for row in rows if row["hub-empty"][value]]
    cpu = [(cpu_ms_per_mail(row["hub-backlog"]) or 0) / (cpu_ms_per_mail(row["hub-empty"]) or 1) for row in rows]
    log(
        "%s: backlog/empty median of %d rounds: throughput %.2fx, CPU per mail %.2fx"
        % (label, len(rows), statistics.median(rate), statistics.median(cpu))
    )
    return {"workload": name, "label": label, "backlog_rounds": rows, "hub_alive": full.proc.poll() is None}


def with_sessions(workload, sessions):
    """The workload with another number of client sessions (--sessions), its label saying so."""
    name, label, size, _sessions, counts, unit = workload
    return name, "%s, %d sessions" % (label.rsplit(", ", 1)[0], sessions), size, sessions, counts, unit


def main_sustained(args, workdir, logs_dir):
    """The --sustained run (called by bench.ingest_benchmark.main); returns the reports."""
    reports = []
    for workload in (w for w in WORKLOADS if w[0] in args.workload):
        if args.sessions:
            workload = with_sessions(workload, args.sessions)
        if args.backlog_ab:
            log("%s: a hub with a backlog against an empty one, %d rounds" % (workload[1], args.rounds))
            reports.append(run_backlog_ab(workload, workdir, logs_dir, args))
            continue
        log("%s: sustained, %d rounds of >= %.0f s per side" % (workload[1], args.rounds, args.seconds))
        started = time.monotonic()
        report = run_workload(workload, workdir, logs_dir, args)
        report["seconds"] = time.monotonic() - started
        print_report(report, workload[5])
        if not report["hub_alive"]:
            warn("the hub died during the %s rounds" % workload[0])
        reports.append(report)
        os.sync()
    return reports
