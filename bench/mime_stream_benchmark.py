# MIME parsing cost at ingest: how fast relay.mime_stream (with the structure recorder the hub
# attaches) consumes typical mails fed in 1 MB chunks as the SMTP reader delivers them, in one
# process, no I/O. The figure that matters is the share of one core the parser takes at the
# hub's ingest rate (docs/benchmarks.md: 432 MB/s for 50 MB mails): rate / parser MB/s. Medians of --repeat runs.
#   .venv/bin/python -m bench.mime_stream_benchmark [--repeat 5] [--ingest-rate 432]
import base64
import os
import statistics
import time

from relay.mime_stream import MimeStreamParser
from relay.mime_structure import StructureRecorder
from bench.common import argument_parser, command_line

MB = 1_000_000
CHUNK = 1024 * 1024
BOUNDARY = b"------------7A1C0B2F3E4D5C6B7A8F9E0D"


def base64_lines(size: int) -> bytes:
    block = base64.encodebytes(os.urandom(3 * 1024 * 1024)).replace(b"\n", b"\r\n")
    return (block * (size // len(block) + 1))[:size].rsplit(b"\r\n", 1)[0] + b"\r\n"


def pgp_mime(size: int) -> bytes:
    return (b"From: <a@hub.test>\r\nTo: <b@hub.test>\r\nSubject: study\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted";\r\n boundary="'
            + BOUNDARY[2:] + b'"\r\n\r\nThis is an OpenPGP/MIME encrypted message (RFC 4880 and 3156)\r\n'
            + BOUNDARY + b"\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n\r\n"
            + BOUNDARY + b'\r\nContent-Type: application/octet-stream; name="encrypted.asc"\r\n\r\n'
            b"-----BEGIN PGP MESSAGE-----\r\n\r\n" + base64_lines(size) + b"=Qx1z\r\n-----END PGP MESSAGE-----\r\n"
            b"\r\n" + BOUNDARY + b"--\r\n")


def single_part(size: int) -> bytes:
    return (b"From: <a@hub.test>\r\nSubject: one part\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + base64_lines(size))


def plain_text(size: int) -> bytes:
    """What bench/smtp_blast sends: no Content-Type (text/plain), so body lines are counted."""
    return b"From: <a@hub.test>\r\nTo: <b@hub.test>\r\nSubject: smtp_blast 1\r\n\r\n" + base64_lines(size)


WORKLOADS = (("50 MB PGP/MIME", pgp_mime), ("50 MB application/octet-stream", single_part),
             ("50 MB text/plain (lines counted)", plain_text))


def parse_rate(message: bytes, repeat: int) -> float:
    chunks = [message[i:i + CHUNK] for i in range(0, len(message), CHUNK)]
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        parser = MimeStreamParser(StructureRecorder())
        for chunk in chunks:
            parser.feed(chunk)
        parser.close()
        times.append(time.perf_counter() - started)
    return len(message) / MB / statistics.median(times)


def main() -> None:
    ap = argument_parser("bench.mime_stream_benchmark", "How fast the MIME scanner of the ingest path consumes typical mails, and the\n"
                         "share of one core it takes at the hub's ingest rate.")
    ap.add_argument("--repeat", type=int, default=5, help="runs per workload, the median is shown (default 5)")
    ap.add_argument("--ingest-rate", type=float, default=432.0, help="hub ingest MB/s to relate to (default 432)")
    args = ap.parse_args()
    print(command_line("bench.mime_stream_benchmark"), flush=True)
    print(f"{'workload':34} | parser MB/s | share of one core at {args.ingest_rate:.0f} MB/s ingest")
    for label, build in WORKLOADS:
        rate = parse_rate(build(50 * MB), args.repeat)
        print(f"{label:34} | {rate:11.0f} | {100 * args.ingest_rate / rate:5.1f} %")
    print(f"load average: {os.getloadavg()[0]:.2f} (figures on a busy machine are lower bounds)")


if __name__ == "__main__":
    main()
