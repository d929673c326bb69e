# MIME scanning cost at ingest: how fast relay.mime.stream, with the structure recorder and the
# encryption policy the hub attaches, consumes mails fed in 1 MB chunks as the SMTP reader
# delivers them (one process, no I/O), for ordinary mail and for adversarial shapes (issue 20:
# runs of dashes, folded headers, thousands of boundaries, huge header blocks, boundaries that are
# prefixes of each other, deep nesting, endless lines). Each figure parses the same mail again and
# again for --seconds (default 10) and prints MB/s; with --baseline TREE (a checkout of an older
# commit, e.g. `git worktree add /tmp/before 8e0198b`) every figure is measured for both trees in
# alternating rounds, each in its own process, and the ratio of the medians is printed.
#   .venv/bin/python -m bench.mime_stream_benchmark [--seconds 10] [--rounds 3] [--baseline /tmp/before]
#       [--only NAME ...] [--ingest-rate 450]
import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import time

MB = 1_000_000
CHUNK = 1024 * 1024
KEY_ID = bytes.fromhex("0FDD75A8550A376D")
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- OpenPGP-shaped payloads (structure only: the policy never decrypts) -----------------------


def _pkesk() -> bytes:
    body = bytes([3]) + KEY_ID + bytes([18]) + os.urandom(80)
    return bytes([0xC1, len(body)]) + body


def _seipd(size: int, partial: bool) -> bytes:
    data = b"\x01" + os.urandom(min(size, 1 << 20))
    data = (data * (size // len(data) + 1))[:size]
    if not partial:
        return bytes([0xD2, 0xFF]) + len(data).to_bytes(4, "big") + data
    out, pos = [bytes([0xD2])], 0
    while len(data) - pos > 8192:  # GnuPG streams with 8 KB partial body chunks
        out += [bytes([0xED]), data[pos : pos + 8192]]
        pos += 8192
    rest = len(data) - pos
    out += [
        bytes([192 + ((rest - 192) >> 8), (rest - 192) & 0xFF])
        if 192 <= rest < 8384
        else bytes([0xFF]) + rest.to_bytes(4, "big"),
        data[pos:],
    ]
    return b"".join(out)


def _armor(binary: bytes) -> bytes:
    text = base64.encodebytes(binary).replace(b"\n", b"\r\n")
    return b"-----BEGIN PGP MESSAGE-----\r\n\r\n" + text + b"-----END PGP MESSAGE-----\r\n"


def pgp_mime(size: int, partial: bool = True) -> bytes:
    boundary = b"------------7A1C0B2F3E4D5C6B7A8F9E0D"
    payload = _armor(_pkesk() + _seipd(size * 3 // 4, partial))
    return (
        b"From: <a@hub.test>\r\nTo: <b@hub.test>\r\nSubject: study\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted";\r\n boundary="'
        + boundary[2:]
        + b'"\r\n\r\nThis is an OpenPGP/MIME encrypted message (RFC 4880 and 3156)\r\n'
        + boundary
        + b"\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n\r\n"
        + boundary
        + b'\r\nContent-Type: application/octet-stream; name="encrypted.asc"\r\n\r\n'
        + payload
        + b"\r\n"
        + boundary
        + b"--\r\n"
    )


def plain_text(size: int) -> bytes:
    """What bench/smtp_blast sends: no Content-Type (text/plain), base64-like lines."""
    block = base64.encodebytes(os.urandom(3 * 1024 * 1024)).replace(b"\n", b"\r\n")
    body = (block * (size // len(block) + 1))[:size].rsplit(b"\r\n", 1)[0] + b"\r\n"
    return b"From: <a@hub.test>\r\nTo: <b@hub.test>\r\nSubject: smtp_blast 1\r\n\r\n" + body


# ---- adversarial shapes --------------------------------------------------------------------------


def _mixed(boundary: bytes, body: bytes) -> bytes:
    return (
        b'From: <a@hub.test>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="'
        + boundary
        + b'"\r\n\r\n--'
        + boundary
        + b"\r\nContent-Type: text/plain\r\n\r\n"
        + body
        + b"\r\n--"
        + boundary
        + b"--\r\n"
    )


def _repeat(unit: bytes, size: int) -> bytes:
    return unit * max(1, size // len(unit))


def dash_runs(size: int) -> bytes:
    return _mixed(b"b0undary", _repeat(b"-" * 76 + b"\r\n", size))


def dash_lines(size: int) -> bytes:
    return _mixed(b"b0undary", _repeat(b"--\r\n", size))


def near_miss_boundaries(size: int) -> bytes:
    """Lines that start like the boundary but are not delimiter lines."""
    return _mixed(b"b0undary", _repeat(b"--b0undaryX\r\n", size))


def prefix_boundaries(size: int) -> bytes:
    """32 nested multiparts whose boundaries are prefixes of each other; the innermost body is
    lines that start like every one of them."""
    depth = 30
    head = b"From: <a@hub.test>\r\nMIME-Version: 1.0\r\n"
    opening = b""
    for level in range(1, depth + 1):
        opening += b'Content-Type: multipart/mixed; boundary="' + b"p" * level + b'"\r\n\r\n--' + b"p" * level + b"\r\n"
    lines = b"".join(b"--" + b"p" * k + b"q\r\n" for k in range(1, depth + 1))
    closing = b"".join(b"\r\n--" + b"p" * level + b"--" for level in range(depth, 0, -1)) + b"\r\n"
    return head + opening + b"Content-Type: text/plain\r\n\r\n" + _repeat(lines, size) + closing


def many_boundaries(size: int) -> bytes:
    """Empty parts one after the other: the parser's part limit, then delimiter lines as body."""
    return _mixed(b"b", _repeat(b"\r\n--b\r\n", size))


def folded_header(size: int) -> bytes:
    """Parts whose header is one field folded over thousands of 3-byte lines (each block stops at
    the header limit)."""
    part = b"--b\r\nX-Long: a\r\n" + _repeat(b" a\r\n", 250_000) + b"\r\nbody\r\n"
    return (
        b'From: <a@hub.test>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
        + _repeat(part, size)
        + b"--b--\r\n"
    )


def huge_header_blocks(size: int) -> bytes:
    """Parts with a thousand short header fields each."""
    part = b"--b\r\n" + b"".join(b"X-F%d: v\r\n" % i for i in range(1000)) + b"\r\nbody\r\n"
    return (
        b'From: <a@hub.test>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
        + _repeat(part, size)
        + b"--b--\r\n"
    )


def deep_nesting(size: int) -> bytes:
    """Multiparts and message/rfc822 alternating, past the depth limit, repeated."""
    unit = b""
    for level in range(40):
        unit += (
            b'Content-Type: multipart/mixed; boundary="n%d"\r\n\r\n--n%d\r\n' % (level, level)
            + b"Content-Type: message/rfc822\r\n\r\n"
        )
    unit += b"Content-Type: text/plain\r\n\r\nleaf\r\n"
    unit += b"".join(b"--n%d--\r\n" % level for level in range(39, -1, -1))
    block = b"--top\r\n" + unit
    return (
        b'From: <a@hub.test>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="top"\r\n\r\n'
        + _repeat(block, size)
        + b"--top--\r\n"
    )


def long_line_body(size: int) -> bytes:
    return _mixed(b"b0undary", b"x" * size)


def long_header_line(size: int) -> bytes:
    return b"From: <a@hub.test>\r\nX-Long: " + b"x" * size + b"\r\n\r\nbody\r\n"


# name -> (builder, size, feed piece): pieces smaller than 1 MB are what a slow client's reads give
WORKLOADS = {
    "pgp-mime-partial": (pgp_mime, 50 * MB, CHUNK),
    "pgp-mime-definite": (lambda size: pgp_mime(size, partial=False), 50 * MB, CHUNK),
    "text-plain": (plain_text, 50 * MB, CHUNK),
    "dash-runs": (dash_runs, 20 * MB, CHUNK),
    "dash-lines": (dash_lines, 20 * MB, CHUNK),
    "near-miss-boundaries": (near_miss_boundaries, 20 * MB, CHUNK),
    "prefix-boundaries": (prefix_boundaries, 20 * MB, CHUNK),
    "many-boundaries": (many_boundaries, 20 * MB, CHUNK),
    "folded-header": (folded_header, 20 * MB, CHUNK),
    "huge-header-blocks": (huge_header_blocks, 20 * MB, CHUNK),
    "deep-nesting": (deep_nesting, 5 * MB, CHUNK),
    "long-line-body": (long_line_body, 20 * MB, CHUNK),
    "long-header-line-1k-reads": (long_header_line, 20 * MB, 1024),
}


# ---- measuring (in a child process per tree) ----------------------------------------------------


def _first_module(*names: str):
    """The first of the module names that the measured tree has (modules moved between commits)."""
    import importlib

    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError(f"none of {names} in this tree")


def _listener_factory():
    """The structure recorder plus the encryption policy, as the hub attaches them (the policy
    for one recipient site whose key ID is KEY_ID); works with the code before and after issue 22
    and before and after relay/ was split into packages."""
    from directory.policy import RecipientKeys

    stream = _first_module("relay.mime.stream", "relay.mime_stream")
    structure = _first_module("relay.mime.structure", "relay.mime_structure")
    policy = _first_module("relay.policy.encryption", "relay.encryption_policy", "directory.policy")
    recipients = [RecipientKeys("beta", {KEY_ID.hex().upper(): "current key"})]
    return lambda: stream.Listeners(structure.StructureRecorder(), policy.EncryptionPolicy(recipients, False))


def measure(name: str, seconds: float) -> dict:
    """MB/s of one tree on one workload: parsed bytes per second of this process's CPU time (the
    machine may be shared; CPU time is what the scanner costs the hub), after one unmeasured
    warm-up run (first-use imports, the allocator growing its heap)."""
    parser_class = _first_module("relay.mime.stream", "relay.mime_stream").MimeStreamParser
    build, size, piece = WORKLOADS[name]
    message = build(size)
    chunks = [message[i : i + piece] for i in range(0, len(message), piece)]
    make = _listener_factory()

    def parse_once():
        listener = make()
        parser = parser_class(listener)
        for chunk in chunks:
            parser.feed(chunk)
        parser.close()
        return listener

    parse_once()
    done, started = 0, time.process_time()
    while True:
        listener = parse_once()
        done += 1
        elapsed = time.process_time() - started
        if elapsed >= seconds:
            break
    policy = listener.listeners[1]
    verdict = policy.reply or ("exempt" if getattr(policy, "exempt", False) else "allowed")
    return {"mb_s": len(message) * done / MB / elapsed, "size": len(message), "runs": done, "verdict": verdict[:70]}


def _child(tree: str, name: str, seconds: float) -> dict:
    """measure() in a new process that imports relay/ and directory/ from `tree`."""
    env = dict(os.environ, PYTHONPATH=tree)
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", name, str(seconds)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tree,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    # argparse here, not bench.common: a --child process runs with an older tree (--baseline) on its path
    ap = argparse.ArgumentParser(
        prog="python -m bench.mime_stream_benchmark",
        description=(
            "How fast the MIME scanner of the ingest path (parser, structure recorder, encryption policy)\n"
            "consumes ordinary and adversarial mails, and the share of one core it takes at the hub's\n"
            "ingest rate; with --baseline, side by side with an older checkout."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--seconds", type=float, default=10.0, help="parsing time per figure")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per figure (median)")
    ap.add_argument("--baseline", help="a checkout of an older commit to measure side by side")
    ap.add_argument("--only", nargs="*", help="workload names")
    ap.add_argument("--ingest-rate", type=float, default=450.0, help="hub ingest MB/s to relate to")
    ap.add_argument("--child", nargs=2, metavar=("NAME", "SECONDS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        # only the measured tree: the editable install of this checkout would otherwise supply the
        # modules an older tree lacks (relay.mime.stream under an older relay/)
        sys.meta_path[:] = [
            finder for finder in sys.meta_path if "__editable__" not in getattr(finder, "__module__", "")
        ]
        print(json.dumps(measure(args.child[0], float(args.child[1]))))
        return
    from bench.common import command_line

    print(command_line("bench.mime_stream_benchmark"), flush=True)
    trees = [("after", HERE)] + ([("before", os.path.abspath(args.baseline))] if args.baseline else [])
    names = args.only or list(WORKLOADS)
    print(
        f"load average at start: {os.getloadavg()[0]:.2f}; {args.seconds:.0f} s per figure, "
        f"{args.rounds} alternating round(s); MB/s = parsed bytes / CPU time of the parsing process",
        flush=True,
    )
    header = f"{'workload':27} | {'size MB':>7} |" + "".join(f" {label + ' MB/s':>12} |" for label, _ in trees)
    header += " after/before |" if args.baseline else ""
    print(header + f" core share at {args.ingest_rate:.0f} MB/s | verdict (after)")
    for name in names:
        rates: dict[str, list[float]] = {label: [] for label, _ in trees}
        result = {}
        for _ in range(args.rounds):
            for label, tree in trees if _ % 2 == 0 else trees[::-1]:
                got = _child(tree, name, args.seconds)
                rates[label].append(got["mb_s"])
                if label == "after":
                    result = got
        medians = {label: statistics.median(values) for label, values in rates.items()}
        line = f"{name:27} | {result['size'] / MB:7.1f} |" + "".join(f" {medians[label]:12.1f} |" for label, _ in trees)
        if args.baseline:
            line += f" {medians['after'] / medians['before']:11.2f}x |"
        line += f" {100 * args.ingest_rate / medians['after']:6.1f} % | {result['verdict']}"
        print(line, flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.2f} (figures on a busy machine are lower bounds)")


if __name__ == "__main__":
    main()
