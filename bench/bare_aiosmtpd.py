# "Stock aiosmtpd" baseline server for benchmarks: plain aiosmtpd.smtp.SMTP whose
# handler writes each message to a file, fsyncs it and replies 250.
# Run as: python -m bench.bare_aiosmtpd --port 0 --dir DIR   (prints the port)
import argparse
import asyncio
import itertools
import logging
import os
import signal

from aiosmtpd.smtp import SMTP

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
        lambda: SMTP(handler, data_size_limit=DATA_SIZE_LIMIT, hostname="bare-aiosmtpd"),
        host, port)
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--dir", required=True)
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(serve(a.host, a.port, a.dir))


if __name__ == "__main__":
    main()
