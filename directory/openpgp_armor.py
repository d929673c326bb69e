# The text layers around an OpenPGP message as mail carries it: a Content-Transfer-Encoding
# (base64, quoted-printable or none), ASCII armor (RFC 4880 6.2), and base64 text that is decoded
# only where the packet walker must look (partial-length chunk headers): the payload of a 50 MB
# message is checked to be base64 (one bytes.translate per chunk deletes the alphabet) but never
# decoded or copied, so that the encryption policy keeps up with ingest. SessionPacketReader is the
# front: feed() a part's body as transmitted, close() -> SessionPackets. Sans-I/O; never decrypts;
# holds a few KB at most.
import binascii
from collections.abc import Callable

from .openpgp_packets import PacketStream, SessionPackets, packet_tags

_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_CLASSIFY = bytes(c if c in _ALPHABET or c == 0x3D else 0x21 for c in range(256))  # others -> "!"
_BLANKS = b" \t\r\n"
_MAX_LINE = 4096
_MAX_ARMOR_HEADERS = 64 * 1024  # bytes of armor header lines (Version:, Comment: ...)
_FRONT = 64  # content bytes looked at to tell armor from binary
_ARMOR_BEGIN = b"-----BEGIN PGP MESSAGE-----"
_ARMOR_END = b"-----END PGP MESSAGE-----"
IDENTITY_ENCODINGS = ("", "7bit", "8bit", "binary")


class Base64Feed:
    """Base64 text (any line breaks and blanks; '=' only as the final padding) into a
    PacketStream, decoding only the bytes the stream has to see. A chunk is checked with one
    bytes.translate that deletes the alphabet (what is left must be blanks); when its lines are
    all of one length the position of any character is computed, not found by copying the text
    without its blanks."""

    def __init__(self, stream: PacketStream) -> None:
        self.stream = stream
        self.error: str | None = None
        self._carry = b""  # fewer than 4 base64 characters not decoded yet
        self._pads = 0  # '=' seen: the text is over

    def feed(self, text) -> None:
        if self.error is not None:
            return
        text = bytes(text)
        residue = text.translate(None, _ALPHABET)
        if self._pads or residue.translate(None, _BLANKS):
            self._feed_unusual(text)  # padding, or characters outside the alphabet
            return
        count = len(text) - len(residue)
        if count:
            self._take(_layout(text, residue) or text.translate(None, _BLANKS).__getitem__, count)

    def _feed_unusual(self, text: bytes) -> None:
        pure = text.translate(_CLASSIFY, _BLANKS)
        if not pure:
            return
        if pure.find(b"!") >= 0:
            self.error = "invalid base64 (characters outside the alphabet)"
            return
        if self._pads:  # only more padding may follow padding
            if pure.strip(b"=") or self._pads + len(pure) > 2:
                self.error = "base64 text goes on after its padding"
            self._pads += len(pure)
            return
        pad = pure.find(b"=")
        if pad >= 0:
            if pure[pad:].strip(b"=") or len(pure) - pad > 2:
                self.error = "base64 text goes on after its padding"
                return
            self._pads = len(pure) - pad
            pure = pure[:pad]
        if pure:
            self._take(pure.__getitem__, len(pure))

    def _take(self, chars, count: int) -> None:
        """count more base64 characters, chars(slice(i, j)) giving characters i to j."""
        start = 0
        if self._carry:
            start = min(4 - len(self._carry), count)
            quad = self._carry + chars(slice(0, start))
            if len(quad) < 4:
                self._carry = quad
                return
            self._carry = b""
            self._walk(quad.__getitem__, 4, 0)
        self._walk(chars, count, start)

    def _walk(self, chars, count: int, i: int) -> None:
        stream = self.stream
        while count - i >= 4 and stream.result.error is None:
            available = (count - i) // 4 * 3
            at = i

            def byte_at(ahead: int) -> int:
                quad = at + ahead // 3 * 4
                return binascii.a2b_base64(chars(slice(quad, quad + 4)))[ahead % 3]

            used = stream.walk(available, byte_at)
            i += used // 3 * 4
            if used < available:  # the stream must see these bytes
                window = min(count - i, 8) // 4 * 4
                stream.feed(binascii.a2b_base64(chars(slice(i, i + window)))[used % 3 :])
                i += window
        self._carry = chars(slice(i, count)) if count - i < 4 else b""

    def close(self) -> None:
        """The text is over: decode the last, padded quad."""
        if self.error is None and self._carry:
            if len(self._carry) == 1 or (self._pads and self._pads != 4 - len(self._carry)):
                self.error = "base64 text ends in the middle of a group"
            else:
                self.stream.feed(binascii.a2b_base64(self._carry + b"=" * (4 - len(self._carry))))
            self._carry = b""


def _layout(text: bytes, residue: bytes):
    """For base64 text whose only other bytes (residue) are blanks: when every line break is the
    same run of blanks and the full lines are all equally long, a function chars(slice) that
    gives the base64 characters of a range from their computed positions; else None."""
    if not residue:
        return text.__getitem__
    newline = text.find(b"\n")
    following = text.find(b"\n", newline + 1) if newline >= 0 else -1
    if following < 0:
        return None
    begin = following  # the line break before `following`, the first one seen whole
    while begin > newline + 1 and text[begin - 1] in _BLANKS:
        begin -= 1
    eol = text[begin : following + 1]
    period = following - newline
    line = period - len(eol)
    if line <= 0:
        return None
    start = newline + 1 - len(eol)  # where the first line break begins (< 0: in the last chunk)
    expected = 0
    for k in range(len(eol)):  # every line break in place, and no other blank anywhere
        offset = start + k if start + k >= 0 else start + k + period
        run = text[offset::period]
        if run != eol[k : k + 1] * len(run):
            return None
        expected += len(run)
    if expected != len(residue):
        return None
    head, after = max(start, 0), newline + 1

    def position(i: int) -> int:
        if i < head:
            return i
        lines, column = divmod(i - head, line)
        return after + lines * period + column

    def chars(span: slice) -> bytes:
        if span.stop <= span.start:
            return b""
        return text[position(span.start) : position(span.stop - 1) + 1].translate(None, _BLANKS)

    return chars


class ArmorReader:
    """An ASCII-armored PGP MESSAGE: BEGIN line, armor header lines, an empty line, the base64
    body (into a Base64Feed), an optional "=XXXX" checksum line, the END line, then nothing but
    blank space."""

    def __init__(self, body: Base64Feed) -> None:
        self.body = body
        self.error: str | None = None
        self._state = "begin"  # begin -> headers -> body -> trailer -> after
        self._line = bytearray()
        self._checksum = False
        self._header_bytes = 0

    def feed(self, data) -> None:
        pos, end = 0, len(data)
        while pos < end and self.error is None:
            if self._state == "body":
                pos = self._bulk(data, pos)
            elif self._state == "after":
                if not bytes(data[pos:]).isspace():
                    self.error = "data after the end of the armored message"
                return
            else:
                nl = data.find(b"\n", pos)
                if nl < 0:
                    self._line += data[pos:]
                    if len(self._line) > _MAX_LINE:
                        self.error = "an ASCII armor line is too long"
                    return
                self._line += data[pos:nl]
                pos = nl + 1
                line = bytes(self._line).rstrip(b"\r \t")
                self._line.clear()
                self._armor_line(line)
        self._take_error()

    def close(self, truncated: bool = False) -> None:
        if self.error is None and self._line:
            line = bytes(self._line).rstrip(b"\r \t")
            self._line.clear()
            self._armor_line(line)
        if self.error is None and self._state != "after" and not truncated:
            self.error = (
                "the armored message has no END line"
                if self._state in ("body", "trailer")
                else "the encrypted part is not an ASCII-armored PGP MESSAGE"
            )
        self._take_error()

    def _bulk(self, data, pos: int) -> int:
        """Base64 body lines up to the first '=' or '-' (neither is in the alphabet: padding, the
        checksum line or the END line follow)."""
        stop = _first_of(data, pos, b"=", b"-")
        if stop < 0:
            self.body.feed(data[pos:])
            return len(data)
        self.body.feed(data[pos:stop])
        self._state = "trailer"
        return stop

    def _armor_line(self, line: bytes) -> None:
        state = self._state
        if state == "begin":
            if line == _ARMOR_BEGIN:
                self._state = "headers"
            elif line:
                self.error = "the encrypted part is neither an ASCII-armored PGP MESSAGE nor binary OpenPGP"
        elif state == "headers":
            self._header_bytes += len(line) + 2
            if not line:
                self._state = "body"
            elif b": " not in line:
                self.error = "malformed ASCII armor header line"
            elif self._header_bytes > _MAX_ARMOR_HEADERS:
                self.error = f"more than {_MAX_ARMOR_HEADERS // 1024} KB of ASCII armor header lines"
        elif line == _ARMOR_END:
            self._state = "after"
        elif self._checksum and line:
            self.error = "unexpected line after the ASCII armor checksum"
        elif line.startswith(b"=") and len(line) == 5 and not line[1:].translate(None, _ALPHABET):
            self._checksum = True  # the CRC-24 line (not checked: that would mean decoding everything)
        elif line and not line.translate(None, _ALPHABET + b"="):
            self.body.feed(line)  # the rest of the last body line: padding
        elif line:
            self.error = "unexpected line in the ASCII armor"

    def _take_error(self) -> None:
        if self.error is None and self.body.error is not None:
            self.error = self.body.error


class SessionPacketReader:
    """The front: feed() a part's body as transmitted (after its header), close() at its end ->
    SessionPackets with the session keys and, if anything is wrong, an error. Checks the whole
    message: transfer encoding, armor, packets up to the last byte."""

    def __init__(self, transfer_encoding: str = "", truncated: bool = False) -> None:
        self.stream = PacketStream()
        self.truncated = truncated
        encoding = transfer_encoding.strip().lower()
        self._encoding = "" if encoding in IDENTITY_ENCODINGS else encoding
        self._front = bytearray()
        self._sink: Callable[[bytes], None] | None = None  # where the body goes once its form is known
        self._closers: list = []  # layers to close, outermost first
        self._layers: list = []  # layers whose errors count
        if self._encoding not in ("", "base64", "quoted-printable"):
            self.stream._fail(f"unsupported Content-Transfer-Encoding {encoding!r}")

    @property
    def result(self) -> SessionPackets:
        return self.stream.result

    def feed(self, data) -> None:
        if self.result.error is not None or not data:
            return
        if self._sink is not None:
            self._sink(data)
        else:
            self._front += data
            if len(self._front) >= _FRONT * 2:
                self._decide(final=False)
        self._check_layers()

    def close(self) -> SessionPackets:
        """The part is over. truncated (the first fragment of a message/partial): the message may
        stop anywhere after its data packet began."""
        if self.result.error is None:
            if self._sink is None:
                self._decide(final=True)
                self._check_layers()
            if self.result.error is None and self._sink is not None and self.stream.offset == 0 and not self.truncated:
                self.stream._fail("the OpenPGP message ends before its encrypted data packet")
            for layer in self._closers:
                if self.result.error is None:
                    if isinstance(layer, ArmorReader):
                        layer.close(self.truncated)
                    elif not self.truncated:
                        layer.close()
                    self._check_layers()
        return self.stream.close(self.truncated)

    def _decide(self, final: bool) -> None:
        """Armored or binary, from the first content bytes; then replay what was held."""
        front = bytes(self._front)
        self._front = bytearray()
        if self._encoding == "base64":
            peek = _decode_prefix(front)
            if len(peek) < 1 and not final:
                self._front += front
                return
            content = peek.lstrip(_BLANKS)
        elif self._encoding == "quoted-printable":
            content = binascii.a2b_qp(front).lstrip(_BLANKS)
        else:
            content = front.lstrip(_BLANKS)
        if not content:
            if final:
                return  # empty: the stream reports it
            self._front += front
            return
        armored = content[:1] == b"-"
        if not armored and not content[0] & 0x80:
            self.stream._fail("the encrypted part is neither an ASCII-armored PGP MESSAGE nor binary OpenPGP")
            return
        sink: Callable[[bytes], None]
        if armored:
            feed = Base64Feed(self.stream)
            armor = ArmorReader(feed)
            sink, self._closers, self._layers = armor.feed, [armor, feed], [armor, feed]
        else:
            sink = self.stream.feed
            if not self._encoding:
                front = front.lstrip(_BLANKS)
        if self._encoding == "base64":
            if armored:  # rare: armor inside base64, so the transfer encoding is decoded whole
                decoder = Base64Decoder(sink)
                self._closers.insert(0, decoder)
                self._layers.append(decoder)
                sink = decoder.feed
            else:  # binary inside base64: the transfer encoding is the base64 layer
                feed = Base64Feed(self.stream)
                sink, self._closers, self._layers = feed.feed, [feed], [feed]
        elif self._encoding == "quoted-printable":
            qp_decoder = QuotedPrintableDecoder(sink)
            self._closers.insert(0, qp_decoder)
            sink = qp_decoder.feed
        self._sink = sink
        sink(front)

    def _check_layers(self) -> None:
        for layer in self._layers:
            if layer.error is not None:
                self.stream._fail(layer.error)
                return


class Base64Decoder:
    """A whole base64 transfer encoding decoded into a sink (strict alphabet, blanks ignored)."""

    def __init__(self, sink) -> None:
        self.sink = sink
        self.error: str | None = None
        self._rest = b""

    def feed(self, data) -> None:
        if self.error is not None:
            return
        text = self._rest + bytes(data).translate(None, _BLANKS)
        usable = len(text) - len(text) % 4
        self._rest = text[usable:]
        try:
            decoded = binascii.a2b_base64(text[:usable], strict_mode=True) if usable else b""
        except binascii.Error:
            self.error = "invalid base64 in the Content-Transfer-Encoding"
            return
        if decoded:
            self.sink(decoded)

    def close(self) -> None:
        if self._rest and self.error is None:
            self.error = "the base64 Content-Transfer-Encoding ends in the middle of a group"


class QuotedPrintableDecoder:
    """quoted-printable decoded line by line into a sink."""

    error = None

    def __init__(self, sink) -> None:
        self.sink = sink
        self._rest = b""

    def feed(self, data) -> None:
        text = self._rest + bytes(data)
        cut = text.rfind(b"\n") + 1
        if cut == 0 and len(text) > _MAX_LINE:
            cut = len(text) - 2
        self._rest = text[cut:]
        if cut:
            self.sink(binascii.a2b_qp(text[:cut]))

    def close(self) -> None:
        if self._rest:
            self.sink(binascii.a2b_qp(self._rest))
            self._rest = b""


def _decode_prefix(text: bytes) -> bytes:
    """The bytes the first whole base64 groups of text decode to (blanks skipped)."""
    pure = text[: _FRONT * 2].translate(None, _BLANKS)
    usable = len(pure) - len(pure) % 4
    try:
        return binascii.a2b_base64(pure[:usable])
    except binascii.Error:
        return b""


def _first_of(data, pos: int, a: bytes, b: bytes) -> int:
    first = data.find(a, pos)
    second = data.find(b, pos, first if first >= 0 else len(data))
    return second if second >= 0 else first


def dearmor(data: bytes, labels: tuple[bytes, ...]) -> list[bytes] | str:
    """The binary contents of the ASCII-armored blocks of data whose BEGIN line names one of the
    labels (b"PGP SIGNATURE", b"PGP PUBLIC KEY BLOCK"), or an error text. Only blank space may
    surround the blocks."""
    blocks: list[bytes] = []
    body: list[bytes] = []
    state = "outside"
    for raw in data.split(b"\n"):
        line = raw.rstrip(b"\r \t")
        if state == "outside":
            if not line:
                continue
            label = (
                line[len(b"-----BEGIN ") : -5] if line.startswith(b"-----BEGIN ") and line.endswith(b"-----") else None
            )
            if label not in labels:
                return "text outside an ASCII-armored block"
            state, body = "headers", []
        elif state == "headers":
            if not line:
                state = "body"
            elif b": " not in line:
                return "malformed ASCII armor header line"
        elif line.startswith(b"-----END "):
            try:
                blocks.append(binascii.a2b_base64(b"".join(body), strict_mode=True))
            except binascii.Error:
                return "invalid base64 in the ASCII armor"
            state = "outside"
        elif not (line.startswith(b"=") and len(line) == 5):
            body.append(line)
    if state != "outside":
        return "an ASCII-armored block without its END line"
    return blocks


def block_packet_tags(data: bytes, labels: tuple[bytes, ...]) -> list[int] | str:
    """The packet tags of a small OpenPGP block given armored (one of labels) or binary."""
    stripped = data.strip(_BLANKS)
    if stripped[:1] == b"-":
        blocks = dearmor(stripped, labels)
        if isinstance(blocks, str):
            return blocks
        binary = b"".join(blocks)
    else:
        binary = stripped
    if not binary:
        return "no OpenPGP packets"
    return packet_tags(binary)
