# A real, throw-away PostgreSQL server for the tests: Debian's binaries (package postgresql,
# bench/debian-packages.txt) run initdb into a new temporary folder and start a server listening on
# 127.0.0.1 at a free port and on a unix socket in that folder. It runs with fsync off (commits
# still wait for their WAL write: synchronous_commit stays on, as the hub sets it): no test is about
# the server's own durability through a crash of the machine (restart() is a clean shutdown, no test
# kills the server), and each fsync cost the suite a wait. initdb and postgres
# refuse to run as root: as root (CI) they run as the user `postgres` (runuser), the folder given
# to it; as anyone else, as that user. stop() stops the server and removes the folder. Each test
# gets a database of its own (create_database: CREATE DATABASE from template1, or from a template
# with the index's schema, a fraction of a second).
# pg_ctl detaches the server, so a test session that is killed (SIGKILL, a CI timeout) cannot stop
# it: each folder names its session's process (owner.pid), and the next session's start() stops and
# removes the servers whose session is gone (sweep_abandoned).
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from loadtest.ports import free_port

SUPERUSER = "mailhub"
# a role that must give its password (scram-sha-256); every other role is trusted on this server
PASSWORD_ROLE = "secured"


def postgres_bin() -> Path:
    """The newest installed version's bin folder (/usr/lib/postgresql/NN/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name))
    if not found:
        raise RuntimeError(
            "PostgreSQL's server binaries are missing (/usr/lib/postgresql/*/bin/initdb): install the Debian"
            " package postgresql (bench/install-debian-packages.sh)"
        )
    return Path(found[-1]).parent


OWNER = "owner.pid"  # in the server's folder: the process id of the test session that started it


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed session not yet reaped by its parent is gone too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def sweep_abandoned(folder: str | None = None) -> list[Path]:
    """Stop and remove the servers left by killed test sessions (their owner process is gone): the
    folders mailhub-test-pg-* in the temporary folder whose owner.pid names no live process."""
    swept = []
    for root in sorted(Path(folder or tempfile.gettempdir()).glob("mailhub-test-pg-*")):
        try:
            owner = int((root / OWNER).read_text())
        except (OSError, ValueError):
            continue  # being made, or not ours to judge
        if _alive(owner):
            continue
        try:
            PostgresServer(root).stop(mode="immediate")
        except (RuntimeError, subprocess.TimeoutExpired):
            continue
        swept.append(root)
    return swept


class PostgresServer:
    def __init__(self, root: Path | None = None) -> None:
        """A new server's folder, or (`root`) one made before, to stop it."""
        self.bin = postgres_bin()
        self.root = root or Path(tempfile.mkdtemp(prefix="mailhub-test-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = 0
        self._as_user: list[str] = []
        self._names = itertools.count(1)
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root, and there is no user `postgres` to run PostgreSQL as") from None
            if root is None:
                os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]
        if root is None:
            (self.root / OWNER).write_text(str(os.getpid()))

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        result = subprocess.run([*self._as_user, *args], capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({result.returncode}): {result.stdout}{result.stderr}")
        return result

    def start(self) -> "PostgresServer":
        sweep_abandoned()
        # -N: the cluster is made without fsyncing its files (throw-away; faster); the server runs
        # with fsync off too (see the top of this file)
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-locale",
            "-N",
        )
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\n"
            f"host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256\n"
            "host all all 127.0.0.1/32 trust\n"
        )
        for attempt in range(3):
            self.port = free_port()
            with open(self.data / "postgresql.conf", "a") as conf:
                conf.write(
                    f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = '{self.root}'\n"
                    "fsync = off\nsynchronous_commit = on\nmax_connections = 40\nshared_buffers = 16MB\n"
                    "log_min_messages = warning\n"
                )
            try:
                self._run(
                    str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start"
                )
                return self
            except RuntimeError:
                if attempt == 2 or "could not bind" not in self.log_text():
                    raise RuntimeError(f"PostgreSQL did not start:\n{self.log_text()[-3000:]}") from None
        return self

    def restart(self) -> None:
        """Restart the server (fast shutdown: every connection is ended), same folder and port."""
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-m",
            "fast",
            "-w",
            "-t",
            "60",
            "restart",
        )

    def log_text(self) -> str:
        try:
            return self.log.read_text()
        except OSError:
            return ""

    def stop(self, mode: str = "fast") -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                try:
                    self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")
                except (RuntimeError, subprocess.TimeoutExpired):
                    self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres", user: str = SUPERUSER, password: str | None = None) -> str:
        secret = f":{password}" if password is not None else ""
        return f"postgresql://{user}{secret}@127.0.0.1:{self.port}/{database}"

    def admin(self, sql: str) -> None:
        """One statement as the superuser, outside a transaction (CREATE/DROP DATABASE, roles)."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql.encode())

    def create_database(self, template: str = "template1") -> str:
        """A new database, a copy of `template` (by default empty); its name."""
        name = f"test_{os.getpid()}_{next(self._names)}"
        self.admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return name

    def drop_database(self, name: str) -> None:
        self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
