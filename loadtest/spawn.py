# Start a throw-away local hub for a run: `mailhub serve` with MAILHUB_* settings, a temporary data
# folder, every listener on 127.0.0.1 port 0 (ports read from its "X listening on H:P" log lines),
# and the profile's sites created with `mailhub site add`. Must never touch an existing hub's data
# folder and must always stop the process it started.
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# `mailhub site add NAME --address ADDR --password-stdin` for each [name, address] in argv[1],
# passwords one per line on stdin, in one interpreter.
_ADD_SITES = """
import json, sys
from mailhub.cli import main
failed = 0
for name, address in json.loads(sys.argv[1]):
    if main(["site", "add", name, "--address", address, "--password-stdin"]) != 0:
        failed += 1
sys.exit(1 if failed else 0)
"""
_LISTEN_RE = re.compile(r"(\w+) listening on ([\d.:a-f]+):(\d+)")


class SpawnError(RuntimeError):
    pass


def mailhub_command() -> list[str]:
    return [sys.executable, "-m", "mailhub.cli"]


class LocalHub:
    def __init__(self, domain: str, keep: bool = False, extra_env: dict | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mailhub-loadtest-"))
        self.data_dir = self.dir / "data"
        self.log_path = self.dir / "hub.log"
        self.keep = keep
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MAILHUB_")}
        self.env.update(
            {
                "MAILHUB_DATA_DIR": str(self.data_dir),
                "MAILHUB_DOMAIN": domain,
                "MAILHUB_SMTP_LISTEN": "127.0.0.1:0",
                "MAILHUB_POP3_LISTEN": "127.0.0.1:0",
                "MAILHUB_IMAP_LISTEN": "127.0.0.1:0",
                "MAILHUB_METRICS_LISTEN": "127.0.0.1:0",
                # every simulated site connects from 127.0.0.1: held to the totals only
                **{f"MAILHUB_{p}_LIMIT_EXEMPT_NETWORKS": "127.0.0.0/8" for p in ("SMTP", "POP3", "IMAP")},
                **(extra_env or {}),
            }
        )
        self.proc: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}

    def add_sites(self, sites: dict, workers: int | None = None) -> None:
        """sites: name -> {"address", "password"} (the corpus manifest's). Runs `mailhub site add`
        for each, in a few helper processes that call the command's entry point once per site
        (650 interpreter start-ups would take minutes; the scrypt hashing is the real cost)."""
        items = sorted(sites.items())
        workers = workers or max(1, min(4, os.cpu_count() or 1, len(items) // 20 or 1))
        shards = [items[i::workers] for i in range(workers)]
        procs = []
        for shard in shards:
            plan = json.dumps([[name, site["address"]] for name, site in shard])
            stdin = "".join(site["password"] + "\n" for _, site in shard)
            proc = subprocess.Popen(
                [sys.executable, "-c", _ADD_SITES, plan],
                env=self.env,
                text=True,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            procs.append((proc, stdin))
        errors = []
        for proc, stdin in procs:
            _, err = proc.communicate(stdin, timeout=600)
            if proc.returncode != 0:
                errors.append(err.strip()[-1000:])
        if errors:
            raise SpawnError("mailhub site add failed: " + "; ".join(errors))

    def start(self, wait: float = 30.0) -> dict[str, int]:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*mailhub_command(), "serve"], env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            if "hub ready" in text:
                self.ports = {name: int(port) for name, _, port in _LISTEN_RE.findall(text)}
                return self.ports
            if self.proc.poll() is not None:
                raise SpawnError(f"mailhub serve exited with {self.proc.returncode}:\n{text[-2000:]}")
            time.sleep(0.05)
        self.stop()
        raise SpawnError("mailhub serve did not become ready in time")

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalHub:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
