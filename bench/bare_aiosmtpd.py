# "Stock aiosmtpd" baseline server for the ingest benchmark: plain aiosmtpd.smtp.SMTP whose
# handler writes each message to a file, fsyncs it and replies 250; bare_aiosmtpd() runs it in a
# process of its own. Run as: python -m bench.bare_aiosmtpd --port 0 --dir DIR   (prints the port)
# Must never listen beyond loopback unless --host says so.
import asyncio
import contextlib
import itertools
import logging
import os
import signal
import subprocess
import sys

from aiosmtpd.smtp import SMTP

from bench.common import REPO_ROOT, argument_parser
from loadtest.thirdparty import wait_banner

DATA_SIZE_LIMIT = 200 * 1024 * 1024  # room for 50 MB mails and more


class FileHandler:
    def __init__(self, directory):
        self.directory = directory
        self.counter = itertools.count()

    async def handle_DATA(self, server, session, envelope):
        path = os.path.join(self.directory, "%d-%d.eml" % (os.getpid(), next(self.counter)))
        with open(path, "wb") as f:
            f.write(envelope.content)
            f.flush()
            os.fsync(f.fileno())
        return "250 OK"


async def serve(host, port, directory):
    os.makedirs(directory, exist_ok=True)
    handler = FileHandler(directory)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, data_size_limit=DATA_SIZE_LIMIT, hostname="bare-aiosmtpd"), host, port
    )
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


@contextlib.contextmanager
def bare_aiosmtpd(workdir):
    """This server in its own process on 127.0.0.1, storing and fsyncing each mail under
    workdir/aiosmtpd. Yields the port."""
    d = os.path.join(os.path.abspath(workdir), "aiosmtpd")
    os.makedirs(d, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.bare_aiosmtpd", "--port", "0", "--dir", d],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=REPO_ROOT,
        start_new_session=True,
    )
    try:
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError("bare_aiosmtpd did not start: %r" % line)
        port = int(line)
        wait_banner(port, proc=proc)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def main():
    ap = argument_parser(
        "bench.bare_aiosmtpd",
        "Stock aiosmtpd storing and fsyncing each mail: the baseline of "
        "bench.ingest_benchmark.\nPrints the port it listens on.",
    )
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=0, help="port (default 0: a free one)")
    ap.add_argument("--dir", required=True, help="folder for the received mails")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(serve(a.host, a.port, a.dir))


if __name__ == "__main__":
    main()
