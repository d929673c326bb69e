# A load-test profile against one hub directly and through HAProxy (issue 27): each round starts a
# throw-away hub (loadtest.spawn.LocalHub, the profile's sites) and runs `mailhub-loadtest run` at
# it, once straight to its ports and once through an HAProxy child process (`send-proxy-v2`, the hub
# trusting 127.0.0.1 as its balancer), the order alternating between rounds. Prints each run's
# summary line (accepted, downloaded, lost, duplicated, corrupted; rate; latency); exit 1 if any failed.
# Needs Debian's haproxy (bench/install-debian-packages.sh).
#   .venv/bin/python -m bench.balancer_loadtest [--profile pilot] [--rounds 2] [--speed X]
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import argument_parser, command_line
from loadtest import corpus as corpus_mod
from loadtest.ports import free_port
from loadtest.profile import load_profile
from loadtest.spawn import LocalHub
from loadtest.thirdparty import haproxy_config, wait_banner

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
LOADTEST = Path(sys.executable).parent / "mailhub-loadtest"


def _haproxy(ports: dict[str, int], folder: Path) -> tuple[subprocess.Popen, dict[str, int]]:
    front = {name: free_port() for name in ("smtp", "pop3")}
    config = folder / "haproxy.cfg"
    # one node: no health checks (the hub's own PROXY handling is what is measured)
    config.write_text(haproxy_config(front, {"node1": ports}, check_interval_ms=None))
    proc = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # the hub's greetings through it
        wait_banner(front["smtp"], timeout=10, proc=proc)
        wait_banner(front["pop3"], prefix=b"+OK", timeout=10, proc=proc)
    except (RuntimeError, TimeoutError) as exc:
        proc.kill()
        raise SystemExit(f"haproxy did not pass connections ({HAPROXY} -db -f {config}): {exc}") from None
    return proc, front


def one_run(profile: str, corpus: Path, domain: str, sites: dict, via_haproxy: bool, speed: float, work: Path) -> int:
    """One `mailhub-loadtest run` at a fresh hub, directly or through HAProxy: its exit status."""
    hub = LocalHub(domain, extra_env={"MAILHUB_PROXY_TRUSTED_BALANCERS": "127.0.0.1/32"} if via_haproxy else {})
    balancer = None
    try:
        hub.add_sites(sites)
        ports = hub.start()
        if via_haproxy:
            balancer, ports = _haproxy(ports, work)
        out = work / f"result-{'haproxy' if via_haproxy else 'direct'}.json"
        command: list[str | Path] = [
            LOADTEST,
            "run",
            profile,
            "--corpus",
            str(corpus),
            "--out",
            str(out),
            "--no-progress",
        ]
        command += ["--smtp", f"127.0.0.1:{ports['smtp']}", "--pop3", f"127.0.0.1:{ports['pop3']}"]
        command += ["--label", "through HAProxy" if via_haproxy else "direct"]
        if speed != 1:
            command += ["--speed", str(speed)]
        run = subprocess.run(command, capture_output=True, text=True)
        summary = [line for line in run.stdout.splitlines() if line.startswith(("PASSED", "FAILED"))]
        print(summary[-1] if summary else run.stdout[-2000:] + run.stderr[-2000:], flush=True)
        return run.returncode
    finally:
        if balancer is not None:
            balancer.terminate()
            balancer.wait(10)
        hub.stop()


def main() -> int:
    parser = argument_parser(
        "bench.balancer_loadtest",
        "A load-test profile against one hub directly and through HAProxy with the PROXY protocol v2,\n"
        "alternating rounds; every mail checked (lost, duplicated, corrupted) in both.",
    )
    parser.add_argument("--profile", default="pilot")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--speed", type=float, default=1.0, help="compress the arrival times X-fold")
    parser.add_argument("--corpus", type=Path, help="corpus folder (default: made under /var/tmp once)")
    args = parser.parse_args()
    profile = load_profile(args.profile)
    corpus = args.corpus or Path("/var/tmp") / f"mailhub-balancer-corpus-{profile.name}"
    try:
        manifest = corpus_mod.load(profile, corpus)
    except corpus_mod.CorpusError:
        manifest = corpus_mod.generate(profile, corpus, corpus_mod.print_progress)
    print(command_line("bench.balancer_loadtest"), flush=True)
    failed = 0
    for n in range(args.rounds):
        for via in (False, True) if n % 2 == 0 else (True, False):
            with tempfile.TemporaryDirectory(prefix="mailhub-balancer-") as work:
                print(f"round {n + 1}, {'through HAProxy' if via else 'direct'}: ", end="", flush=True)
                outcome = one_run(
                    args.profile, corpus, profile.domain, dict(manifest["sites"]), via, args.speed, Path(work)
                )
                failed += outcome != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
