# Outbound relay benchmark (issue 8): the hub forwarding mail to another network side by side with
# Debian's Postfix doing the same, in one run on loopback. Both relay to the same final next hop, a
# real Postfix sink (queue file fsynced, then discarded), and are timed from the first mail
# submitted until the sink has logged every mail as delivered:
#   the hub:     an authenticated site sends to x@remote.example; route *=sink
#   Postfix:     a second Postfix accepting from 127.0.0.1, relayhost = the sink
# Needs root (Postfix) and bench/install-debian-packages.sh.
#   .venv/bin/python -m bench.relay_benchmark [--mails 200] [--size 100000] [--sessions 4] [--workdir DIR]
import asyncio
import contextlib
import json
import re
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import argument_parser, command_line
from bench.ingest_benchmark import HUB_DOMAIN, PASSWORD, SENDER, hub_server
from bench.smtp_blast import blast
from loadtest.thirdparty import postfix_instance, postfix_sink

POSTFIX_RELAY_OVERRIDES = """\
# --- relay_benchmark: every non-local recipient to the sink
default_transport = smtp
relay_transport = smtp
relayhost = [127.0.0.1]:{sink}
smtp_tls_security_level = none
"""
POSTFIX_SMTP_MASTER = "smtp      unix  -       -       n       -       -       smtp\n"
_SENT = re.compile(r"status=sent")


@contextlib.contextmanager
def postfix_relay(workdir, sink_port):
    def main_cf(text):
        lines = [ln for ln in text.splitlines() if not ln.startswith(("default_transport", "relay_transport"))]
        return "\n".join(lines) + "\n" + POSTFIX_RELAY_OVERRIDES.format(sink=sink_port)

    with postfix_instance(workdir, main_cf, POSTFIX_SMTP_MASTER) as port:
        yield port


def delivered(sink_log: Path) -> int:
    return len(_SENT.findall(sink_log.read_text())) if sink_log.exists() else 0


def measure(name, port, sink_log, args, user=None) -> dict:
    before = delivered(sink_log)
    started = time.perf_counter()
    sent = asyncio.run(
        blast(
            "127.0.0.1",
            port,
            args.sessions,
            args.mails,
            args.size,
            user=user,
            password=PASSWORD if user else None,
            rcpt="x@remote.example",
            mail_from=f"{SENDER}@{HUB_DOMAIN}",
            bdat=False,
        )
    )
    accepted = time.perf_counter() - started
    deadline = time.monotonic() + 600
    while delivered(sink_log) - before < args.mails - sent["failures"] and time.monotonic() < deadline:
        time.sleep(0.05)
    total = time.perf_counter() - started
    count = delivered(sink_log) - before
    return {
        "server": name,
        "mails": count,
        "failures": sent["failures"],
        "accept_seconds": round(accepted, 2),
        "seconds": round(total, 2),
        "mails_per_s": round(count / total, 1),
        "mb_per_s": round(count * args.size / total / 1e6, 1),
    }


def main():
    ap = argument_parser(
        "bench.relay_benchmark",
        "Outbound relay benchmark: the hub vs Postfix relaying to the same Postfix sink,\nside by side in one run.",
    )
    ap.add_argument("--mails", type=int, default=200, help="mails sent (default 200)")
    ap.add_argument("--size", type=int, default=100_000, help="bytes per mail (default 100000)")
    ap.add_argument("--sessions", type=int, default=4, help="SMTP sessions at once (default 4)")
    ap.add_argument("--workdir", help="keep the servers' folders and logs here (default: a temporary folder)")
    args = ap.parse_args()
    print(command_line("bench.relay_benchmark"), flush=True)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="relay-bench-"))
    results = []
    try:
        with postfix_sink(workdir / "sink") as sink_port:
            sink_log = workdir / "sink" / "postfix" / "postfix.log"
            with hub_server(
                workdir / "hub", workdir / "hub.log", extra_env={"MAILHUB_RELAY_ROUTES": f"*=127.0.0.1:{sink_port}"}
            ) as hub:
                results.append(measure("hub", hub.port, sink_log, args, user=SENDER))
            with postfix_relay(workdir / "relay", sink_port) as relay_port:
                results.append(measure("postfix", relay_port, sink_log, args))
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"{args.mails} mails of {args.size} bytes over {args.sessions} sessions, relayed to a Postfix sink")
    print(f"{'server':<10}{'delivered':>10}{'accepted in s':>15}{'all relayed in s':>18}{'mails/s':>10}{'MB/s':>8}")
    for r in results:
        print(
            f"{r['server']:<10}{r['mails']:>10}{r['accept_seconds']:>15}{r['seconds']:>18}"
            f"{r['mails_per_s']:>10}{r['mb_per_s']:>8}"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
