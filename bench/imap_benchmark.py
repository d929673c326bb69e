# IMAP download benchmark (issue 6, "How it is shown"): the hub side by side with Debian's Dovecot
# (dovecot-imapd, throw-away config on loopback, maildir) serving the same mails in one run: MB/s of
# Python's imaplib fetching 50 MB mails, one session, SELECT then `FETCH n (BODY.PEEK[])` for each
# mail in turn (20 mails, --quick 10). Only the FETCH calls are timed; after each one (untimed) the
# literal is checked: header as sent under a leading Received:/Return-Path: block, body SHA-256 as
# sent. The hub's mailbox is filled over SMTP (bench/smtp_blast) through one hub process and served
# by a fresh one (its VmHWM is shown); Dovecot's maildir gets the same bytes written directly and
# one untimed SELECT builds its index first. Each rep starts both servers fresh in empty folders under
# /var/tmp and deletes them afterwards; servers take turns (rotated order); 3 reps (--quick: 1), the
# table shows medians and the ratio. Needs root (Dovecot runs mail processes as user `mail`) and
# bench/install-debian-packages.sh.
#   .venv/bin/python -m bench.imap_benchmark [--quick] [--mails N] [--workdir DIR]
import hashlib
import imaplib
import os
import shutil
import statistics
import sys
import tempfile
import time

from bench.common import argument_parser, command_line
from bench.ingest_benchmark import (
    HUB_DOMAIN,
    PASSWORD,
    SENDER,
    cpu_model,
    fmt_ratio,
    fmt_value,
    hub_server,
    interrupt_once,
    loadavg,
    log,
    make_workdir,
    read_log_problems,
    software,
    table,
    uptime_line,
    versions,
    vm_status,
    warn,
)
from bench.pop3_benchmark import (
    HEADER_RE,
    MAIL_FROM,
    TRACE_RE,
    _dovecot_pid,
    cpu_seconds,
    dovecot_version,
    fill_dovecot,
    fill_hub,
)
from bench.smtp_blast import make_body, make_header
from loadtest.thirdparty import LOOPBACK, dovecot_server

SERVERS = ("hub", "dovecot")
SIZE = 50_000_000
WORKLOAD = ("50MB", "50 MB mails, 1 imaplib session", SIZE, 1, None, "MB/s")  # as bench.pop3_benchmark's
BOX = "bench-r50mb"  # = pop3_benchmark.mailboxes(WORKLOAD)[0]
TARGET = 1.5


def fetch_all(port, expected, body, verify):
    """One imaplib session: SELECT INBOX, FETCH n (BODY.PEEK[]) for n = 1..expected. Returns
    (bytes, timed seconds, [problems])."""
    problems, total, seconds = [], 0, 0.0
    body_sha = hashlib.sha256(body).hexdigest()
    client = imaplib.IMAP4(LOOPBACK, port, timeout=300)
    try:
        client.login(BOX, PASSWORD)
        typ, data = client.select("INBOX", readonly=True)
        if typ != "OK" or int(data[0]) != expected:
            return 0, 0.0, ["SELECT: %s %r, expected %d messages" % (typ, data, expected)]
        seen = set()
        for n in range(1, expected + 1):
            t0 = time.perf_counter()
            typ, data = client.fetch(str(n), "(BODY.PEEK[])")
            seconds += time.perf_counter() - t0
            literal = next((item[1] for item in data if isinstance(item, tuple)), b"") if typ == "OK" else b""
            total += len(literal)
            if not verify:
                continue
            trace = TRACE_RE.match(literal).end()
            split = literal.find(b"\r\n\r\n", trace) + 4
            m = HEADER_RE.match(literal[trace:split])
            if (
                m is None
                or literal[trace:split]
                != make_header(int(m.group(1)), MAIL_FROM, BOX + "@" + HUB_DOMAIN, m.group(2).decode())
                or hashlib.sha256(memoryview(literal)[split:]).hexdigest() != body_sha
            ):
                problems.append(
                    "message %d: header or body SHA-256 differs from what was sent (%r...)" % (n, literal[:100])
                )
            elif int(m.group(1)) in seen:
                problems.append("message %d: mail %s served twice" % (n, m.group(1).decode()))
            else:
                seen.add(int(m.group(1)))
        client.logout()
    except (OSError, imaplib.IMAP4.error) as exc:
        problems.append("IMAP session failed: %s" % exc)
    return total, seconds, problems


def touch(port):
    client = imaplib.IMAP4(LOOPBACK, port, timeout=300)
    client.login(BOX, PASSWORD)
    typ, data = client.select("INBOX", readonly=True)
    client.logout()
    return int(data[0]) if typ == "OK" else -1


def measure(server, rep, mails, body, workdir, logs_dir, verify):
    run_dir = tempfile.mkdtemp(prefix="%s-rep%d-" % (server, rep), dir=workdir)
    problems = []
    try:
        if server == "hub":
            hub_log = os.path.join(logs_dir, "hub-rep%d.log" % rep)
            with hub_server(run_dir, hub_log, sites=(SENDER, BOX)) as filler:
                fails, errors = fill_hub(filler, WORKLOAD, mails, body)
                if fails:
                    problems.append("hub: %d SMTP submissions failed: %s" % (fails, "; ".join(errors[:3])))
            cm = hub_server(run_dir, hub_log, sites=(), imap=True)
        else:
            cm = dovecot_server(run_dir, {BOX: PASSWORD}, protocols=("imap",))
        with cm as handle:
            if server == "dovecot":
                fill_dovecot(run_dir, WORKLOAD, mails, body, "%x.%x" % (int(time.time()), os.getpid()))
            port = handle.imap_port if server == "hub" else handle["imap"]
            pid = handle.proc.pid if server == "hub" else _dovecot_pid(run_dir)
            if touch(port) != mails:
                problems.append("%s: mailbox does not hold %d mails" % (server, mails))
            os.sync()
            load = loadavg()[0]
            cpu0 = cpu_seconds(pid)
            total, seconds, probs = fetch_all(port, mails, body, verify)
            time.sleep(0.3)  # Dovecot's master reaps the imap process (its CPU time goes to it)
            cpu1 = cpu_seconds(pid)
            problems += probs
            mb_s = total / 1e6 / seconds if seconds else 0.0
            result = {
                "server": server,
                "rep": rep,
                "bytes": total,
                "seconds": seconds,
                "mb_per_s": mb_s,
                "server_cpu_s": None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
                "load": load,
                "vmhwm": vm_status(pid, "VmHWM") if server == "hub" else None,
            }
            log(
                "        %-8s %8.1f MB/s (%d bytes in %.2f s, server CPU %s s, load %.2f)%s"
                % (
                    server,
                    mb_s,
                    total,
                    seconds,
                    "%.2f" % result["server_cpu_s"] if result["server_cpu_s"] is not None else "-",
                    load,
                    ", SHA-256 checked" if verify else "",
                )
            )
        if server == "hub":
            lines = read_log_problems(hub_log)
            if lines:
                problems.append("hub logged %d warning/error lines, e.g. %s" % (len(lines), lines[0][:200]))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        os.sync()
    return result, problems


def main():
    ap = argument_parser(
        "bench.imap_benchmark", "IMAP download benchmark: hub vs Dovecot imapd, side by side in one run"
    )
    ap.add_argument("--quick", action="store_true", help="10 mails, one repetition")
    ap.add_argument("--mails", type=int, help="50 MB mails in the mailbox (default 20, --quick 10)")
    ap.add_argument("--repeat", type=int, help="repetitions (default 3, --quick 1)")
    ap.add_argument("--workdir", help="folder for all server data (default: a new folder under /var/tmp)")
    a = ap.parse_args()
    reps = a.repeat or (1 if a.quick else 3)
    mails = a.mails or (10 if a.quick else 20)
    if os.geteuid() != 0:
        sys.exit("imap_benchmark: must run as root (Dovecot runs its mail processes as user mail)")
    if shutil.which("dovecot") is None or not os.path.exists("/usr/lib/dovecot/imap"):
        sys.exit("imap_benchmark: dovecot-imapd missing; run bench/install-debian-packages.sh as root")
    interrupt_once()
    own_workdir, workdir, logs_dir = make_workdir(a.workdir, "mailhub-imap-bench-")
    facts = {**versions(), "dovecot": dovecot_version()}
    log("imap benchmark: %s" % command_line("bench.imap_benchmark"))
    log("machine: nproc %d, CPU %s, %s, dovecot %s" % (os.cpu_count(), cpu_model(), software(facts), facts["dovecot"]))
    log("load before: %s" % uptime_line())
    body = make_body(SIZE - 160)  # as smtp_blast does
    results, problems = [], []
    try:
        for rep in range(1, reps + 1):
            order = SERVERS if rep % 2 else SERVERS[::-1]
            for server in order:
                log("rep %d  %s: fresh server, fill %d x 50 MB, fetch" % (rep, server, mails))
                result, probs = measure(server, rep, mails, body, workdir, logs_dir, verify=rep == 1)
                results.append(result)
                for p in probs:
                    warn(p)
                problems += probs
    except KeyboardInterrupt:
        warn("interrupted; servers stopped, partial results below")
        problems.append("interrupted")
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    med = {
        s: statistics.median([r["mb_per_s"] for r in results if r["server"] == s])
        if any(r["server"] == s for r in results)
        else None
        for s in SERVERS
    }
    log("")
    log(
        "IMAP download on loopback, client Python imaplib (FETCH n (BODY.PEEK[]) of each mail, one session), "
        "data in page cache; median of %d run(s)" % reps
    )
    log("")
    log(
        table(
            [
                ("workload", "hub", "dovecot", "hub/dovecot", "target"),
                (
                    "%d x 50 MB mails, 1 session (MB/s)" % mails,
                    fmt_value(med["hub"], "MB/s"),
                    fmt_value(med["dovecot"], "MB/s"),
                    fmt_ratio(med["hub"], med["dovecot"]),
                    ">= %.1fx" % TARGET,
                ),
            ]
        )
    )
    log("")
    for s in SERVERS:
        runs = [r for r in results if r["server"] == s]
        log(
            "  %-8s runs: %s MB/s; server CPU s per GB sent: %s"
            % (
                s,
                " / ".join("%.1f" % r["mb_per_s"] for r in runs),
                " / ".join(
                    "%.2f" % (r["server_cpu_s"] / (r["bytes"] / 1e9))
                    for r in runs
                    if r["server_cpu_s"] is not None and r["bytes"]
                ),
            )
        )
    hwm = [r["vmhwm"] for r in results if r.get("vmhwm")]
    if hwm:
        log("  hub VmHWM while serving: %.1f MB (max over reps)" % (max(hwm) / 1e6))
    log("load after: %s" % uptime_line())
    if problems:
        log("PROBLEMS (%d): %s" % (len(problems), "; ".join(problems[:5])))
        sys.exit(1)
    log("SHA-256 of every mail fetched in rep 1 checked on both servers: all match")


if __name__ == "__main__":
    main()
