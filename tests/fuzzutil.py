# Shared pieces of the protocol fuzz tests (tests/test_fuzz_protocols.py; usable for SMTP too): a
# session that pipelines generated lines over a real socket while a thread reads everything the hub
# answers, then half-closes and waits for the hub to close; the checks on its transcript (a close the
# hub started must follow a closing reply); a watch on the hub's log for tracebacks; hypothesis
# strategies for hostile bytes (mutations of valid lines, random bytes, control characters,
# over-long lines).
# Must never: wait without a deadline, or leave a socket or thread behind.
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st

END_TIMEOUT = 15.0  # seconds the hub gets to close after our half-close (or to send its replies)
SPECIALS = b'(){}[]"\\*%<>@:;,.=+-~ \t\r\n\x00\x7f\xff'


@dataclass
class Transcript:
    data: bytes  # everything the hub sent
    closed_by_hub: bool  # the hub closed while we were still connected (not after our half-close)
    reset: bool  # ... with a reset (it closed with our input unread: the kernel may drop
    # what it had not sent yet, such as a closing reply)
    hung: bool  # the hub did not close within END_TIMEOUT after our half-close
    inputs_sent: int

    def last_lines(self, count: int) -> list[bytes]:
        return [line for line in self.data.split(b"\r\n") if line][-count:]


class _Reader(threading.Thread):
    def __init__(self, sock: socket.socket):
        super().__init__(daemon=True)
        self.sock, self.data, self.changed, self.reset = sock, bytearray(), time.monotonic(), False

    def run(self) -> None:
        try:
            while chunk := self.sock.recv(1 << 16):
                self.data += chunk
                self.changed = time.monotonic()
        except ConnectionResetError:
            self.reset = True
        except OSError:
            pass

    def wait_quiet(self, quiet: float) -> None:
        """Until the hub closed, or sent nothing for `quiet` seconds (at most END_TIMEOUT)."""
        deadline = time.monotonic() + END_TIMEOUT
        while self.is_alive() and time.monotonic() < deadline and time.monotonic() - self.changed < quiet:
            self.join(0.005)


def run_session(port: int, source: str, inputs: list[bytes], final: bytes, quiet: float = 0.05) -> Transcript:
    """Connect from `source`, send every input, then `final` (e.g. QUIT), without waiting for
    replies (pipelining, as RFC 3501 and RFC 2449 allow); wait until the hub closes or goes quiet,
    then half-close and wait for it to close. Each element is sent as given (callers add CRLF)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=END_TIMEOUT, source_address=(source, 0))
    reader = _Reader(sock)
    reader.start()
    sent, send_reset = 0, False
    try:
        for data in [*inputs, final]:
            try:
                sock.sendall(data)
            except OSError as e:
                # a reset reported to the sender is not reported again to the reader (which then
                # sees a plain end of stream, short of what the kernel dropped)
                send_reset = isinstance(e, (ConnectionResetError, BrokenPipeError))
                break
            sent += 1
        reader.changed = time.monotonic()
        reader.wait_quiet(quiet)
        closed_by_hub = not reader.is_alive()
        if not closed_by_hub:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            reader.join(END_TIMEOUT)
        hung = reader.is_alive()
    finally:
        sock.close()
        reader.join(5)
    return Transcript(
        bytes(reader.data), closed_by_hub, closed_by_hub and (reader.reset or send_reset), hung, min(sent, len(inputs))
    )


class LogWatch:
    """New lines of the hub's log since the last look, and those that show a crash."""

    CRASH = re.compile(rb"Traceback|internal error")

    def __init__(self, path: Path):
        self.path, self.offset = path, path.stat().st_size

    def crashes(self) -> list[str]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            text = f.read()
        self.offset += len(text)
        return [line.decode(errors="replace")[:300] for line in text.splitlines() if self.CRASH.search(line)]


# ------------------------------------------------------------------------- hostile bytes


def mutate(line: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    """Apply (kind, position, bytes) edits: 0 insert, 1 delete, 2 replace, 3 duplicate a span, 4 cut."""
    data = bytearray(line)
    for kind, position, extra in edits:
        at = position % (len(data) + 1)
        if kind == 0:
            data[at:at] = extra
        elif kind == 1:
            del data[at : at + len(extra) + 1]
        elif kind == 2:
            data[at : at + len(extra)] = extra
        elif kind == 3:
            data[at:at] = data[at : at + len(extra) + 3] * 4
        else:
            del data[at:]
    return bytes(data)


_EDIT = st.tuples(
    st.integers(0, 4),
    st.integers(0, 1 << 16),
    st.one_of(st.binary(min_size=1, max_size=4), st.sampled_from([bytes([c]) for c in SPECIALS])),
)


def mutations(valid: st.SearchStrategy) -> st.SearchStrategy:
    """A valid line with a few random edits."""
    return st.builds(mutate, valid, st.lists(_EDIT, min_size=1, max_size=4))


def random_line() -> st.SearchStrategy:
    """Random bytes (with CR, LF, NUL and 8-bit), made a line."""
    return st.binary(max_size=200).map(lambda data: data + b"\r\n")


def long_line(words: list[bytes]) -> st.SearchStrategy:
    """A line of 2 KB to 300 KB: one of `words` repeated, with or without an ending."""
    return st.builds(
        lambda word, count, end: word * count + end,
        st.sampled_from(words),
        st.sampled_from([300, 9000, 40000]),
        st.sampled_from([b"\r\n", b"\n", b""]),
    )
