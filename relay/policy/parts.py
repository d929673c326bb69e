# The encryption policy's checks of one leaf part's content, fed its body as it streams: text
# (and text-like reports), content in the clear (allowed only when it is an OpenPGP message),
# OpenPGP messages, the PGP/MIME version part, signatures and keys, messages encapsulated in an
# encoded message/* part, and later fragments of a message/partial. Each check refuses through
# policy.refuse() and holds at most SNIFF_BYTES of decoded content. Never decrypts.
import re
import zlib
from typing import Protocol

from directory.openpgp_armor import SessionPacketReader, block_packet_tags
from relay.mime import sniff
from relay.mime.decode import Base64, Decoder, decoder_for
from relay.policy.replies import (
    AMBIGUOUS,
    CLEARTEXT_DATA,
    CLEARTEXT_DICOM,
    FRAGMENT,
    MALFORMED,
    MALFORMED_OPENPGP,
    printable,
)

VERSION_PART_LIMIT = 1024  # bytes of the PGP/MIME version part ("Version: 1")
SIGNATURE_LIMIT = 64 * 1024  # an OpenPGP signature part
KEYS_LIMIT = 1024 * 1024  # an application/pgp-keys part
_B64_LINE = re.compile(rb"[A-Za-z0-9+/]{40,}={0,2}\r?$")
_UU_BEGIN = re.compile(rb"begin(?:-base64)? [0-7]{3,4} ([^\r\n]*)")
_BLANKS = b" \t\r\n"
# each with a byte its marker holds that is found fast, and how far before that byte the marker may
# start: "begin 644 " and "begin-base64 644 " (what `uuencode -m` writes) share one search
_MARKERS = ((b"begin", b" ", len(b"begin-base64")), (b";base64,", b";", 0))
_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


class PartCheck(Protocol):
    """What every check below is: fed a leaf part's body as it streams, closed at the part's end."""

    def feed(self, data: bytes) -> None: ...

    def close(self) -> None: ...


def _dicom_or_archive(content: bytes) -> tuple[str, str] | None:
    """("cleartext_dicom", how) or ("cleartext_data", what) when content is DICOM or an archive."""
    how = sniff.dicom_signature(content)
    if how is not None:
        return "cleartext_dicom", how
    kind = sniff.archive_kind(content)
    if kind is not None:
        inside = sniff.dicom_in_archive(content)
        return ("cleartext_dicom", inside) if inside else ("cleartext_data", kind)
    return None


def refuse_undecodable(policy, where: str, decoder: Decoder) -> None:
    """Refuses a part whose body its transfer encoding cannot decode (x-uuencode without a "begin"
    line, or with a line too long): the hub sees nothing, but a reader that cannot decode it may
    show or save the raw bytes (Python's email package does), so they could be anything."""
    if decoder.error is not None and policy.reply is None:
        policy.refuse(
            "ambiguous",
            AMBIGUOUS.format(where=where, what=f"a body its transfer encoding cannot decode ({decoder.error})"),
        )


class TextCheck:
    """A part shown as text: its decoded content must hold no NUL or other control bytes (binary
    data), must not start as DICOM or an archive (also as base64 text, or in a data: URI), and
    carries no uuencoded or yEnc file."""

    _LOOK = 300  # bytes after a marker needed to judge it

    def __init__(self, policy, where: str, encoding: str) -> None:
        self.policy = policy
        self.where = where
        self.decoder = decoder_for(encoding)
        self.head = bytearray()
        self.head_done = False
        self.nul = False
        self.carry = b"\n"  # undecided end of the text so far (a marker cut short; a line start)

    def feed(self, data: bytes) -> None:
        self._text(self.decoder.feed(data), final=False)

    def close(self) -> None:
        self._text(self.decoder.close(), final=True)
        refuse_undecodable(self.policy, self.where, self.decoder)
        if not self.head_done and self.policy.reply is None:
            self._judge_head()

    def _text(self, text: bytes, final: bool) -> None:
        if self.policy.reply is not None or (not text and not final):
            return
        if not self.head_done:
            self.head += text[: sniff.SNIFF_BYTES - len(self.head)]
            self.nul = self.nul or text.find(b"\0") >= 0
            if len(self.head) >= sniff.SNIFF_BYTES:
                self._judge_head()
        elif text.find(b"\0") >= 0:
            self._refuse("cleartext_data", "binary content (NUL bytes) in a text part")
        if self.policy.reply is None:
            self._markers(self.carry + text if text else self.carry, final)

    def _markers(self, text: bytes, final: bool) -> None:
        """A uuencoded or yEnc file starting in the text ("begin 644 name", "begin-base64 644 name"
        or "=ybegin" at a line start), or a data: URI whose base64 content is DICOM or an archive.
        Markers too close to the end of what came so far wait for the next data."""
        keep = max(len(text) - 16, 0)
        for needle, rare, before in _MARKERS:
            first = text.find(rare)  # memchr: base64-like text has no blank and no ';' at all
            hit = -1 if first < 0 else text.find(needle, max(first - before, 0))
            while hit >= 0:
                if len(text) - hit < self._LOOK and not final:
                    keep = min(keep, max(hit - 3, 0))
                    break
                if self._marker(text, hit, needle):
                    return
                hit = text.find(needle, hit + len(needle))
        self.carry = text[keep:]

    def _marker(self, text: bytes, hit: int, needle: bytes) -> bool:
        if needle == b";base64,":
            found = _dicom_or_archive(Base64().feed(text[hit + 8 : hit + 8 + 4096].split(b'"')[0]))
            if found is not None:
                self._refuse(found[0], f"{found[1]} in a data: URI", dicom=found[0] == "cleartext_dicom")
            return found is not None
        yenc = text[hit - 3 : hit] == b"\n=y"
        match = None if yenc or text[hit - 1 : hit] != b"\n" else _UU_BEGIN.match(text, hit, hit + self._LOOK)
        if not yenc and match is None:
            return False
        name = match.group(1).decode("utf-8", "replace").strip() if match else ""
        if name and sniff.dicom_name(name):
            self._refuse("cleartext_dicom", f"a uuencoded file named {printable(name, 40)}", dicom=True)
        else:
            self._refuse("cleartext_data", f"{'a yEnc-encoded' if yenc else 'a uuencoded'} file in a text part")
        return True

    def _judge_head(self) -> None:
        self.head_done = True
        head = bytes(self.head)
        self.head = bytearray()
        found = _dicom_or_archive(head)
        if found is None:
            lines = head.lstrip(_BLANKS)[:16384].split(b"\n")
            if len(lines) > 1 and _B64_LINE.match(lines[0]):
                decoded = _dicom_or_archive(Base64().feed(b"\n".join(lines[:-1])))
                if decoded is not None:
                    found = decoded[0], f"{decoded[1]}, as base64 text"
        if found is not None:
            self._refuse(found[0], found[1], dicom=found[0] == "cleartext_dicom")
            return
        why = "NUL bytes" if self.nul else sniff.binary_in_text(head)
        if why is not None:
            self._refuse("cleartext_data", f"binary content ({why}) in a text part")

    def _refuse(self, reason: str, what: str, dicom: bool = False) -> None:
        if dicom:
            self.policy.refuse(reason, CLEARTEXT_DICOM.format(where=self.where, how=what))
        else:
            self.policy.refuse(reason, CLEARTEXT_DATA.format(where=self.where, what=what))


class PayloadCheck:
    """An OpenPGP message, checked whole (armor, packets to the last byte): the second part of a
    PGP/MIME mail, or an encrypted file attached as is."""

    def __init__(self, policy, where: str, encoding: str, pgp_mime: bool, truncated: bool, returned: bool) -> None:
        self.policy = policy
        self.where = where
        self.pgp_mime = pgp_mime
        self.returned = returned
        self.reader = SessionPacketReader(encoding, truncated)

    def feed(self, data: bytes) -> None:
        self.reader.feed(data)
        if self.reader.result.error is not None:
            self._malformed(self.reader.result.error)

    def close(self) -> None:
        result = self.reader.close()
        if result.error is not None:
            self._malformed(result.error)
        else:
            self.policy.check_keys(result, self.returned)

    def _malformed(self, reason: str) -> None:
        if self.pgp_mime:
            self.policy.refuse("malformed", MALFORMED.format(reason=reason))
        else:
            self.policy.refuse("malformed", MALFORMED_OPENPGP.format(where=self.where, reason=reason))


class ClearCheck:
    """A part that may carry data, outside any encryption: allowed only when its content is an
    OpenPGP message (then checked as one); otherwise refused, named as precisely as its first
    bytes allow (DICOM, DICOM inside an archive, an archive, or its type)."""

    def __init__(self, policy, where: str, encoding: str, what: str, returned: bool) -> None:
        self.policy = policy
        self.where = where
        self.encoding = encoding
        self.what = what
        self.returned = returned
        self.decoder = decoder_for(encoding)
        self.raw: bytearray | None = bytearray()
        self.head = bytearray()
        self.payload: PayloadCheck | None = None

    def feed(self, data: bytes) -> None:
        if self.payload is not None:
            self.payload.feed(data)
            return
        if self.raw is not None:  # the part's raw bytes so far, while they are few
            if len(self.raw) < sniff.SNIFF_BYTES:
                self.raw += data
            else:
                self.raw = None
        self.head += self.decoder.feed(data)[: sniff.SNIFF_BYTES]
        if len(self.head.lstrip(_BLANKS)) >= 64:
            self._decide(final=False)

    def close(self) -> None:
        if self.payload is None:
            self.head += self.decoder.close()
            self._decide(final=True)
            refuse_undecodable(self.policy, self.where, self.decoder)
        if self.payload is not None:
            self.payload.close()

    def _decide(self, final: bool) -> None:
        content = bytes(self.head.lstrip(_BLANKS))
        if not content:
            return  # nothing but blank space: no data
        if sniff.openpgp_start(content) and self.raw is not None:
            self.payload = PayloadCheck(self.policy, self.where, self.encoding, False, False, self.returned)
            raw, self.raw, self.head = bytes(self.raw), bytearray(), bytearray()
            self.payload.feed(raw)
            return
        if len(self.head) < sniff.SNIFF_BYTES and not final:
            return  # more of it names it better
        found = _dicom_or_archive(content)
        if found is not None and found[0] == "cleartext_dicom":
            self.policy.refuse("cleartext_dicom", CLEARTEXT_DICOM.format(where=self.where, how=found[1]))
        else:
            what = found[1] if found is not None else self.what
            self.policy.refuse("cleartext_data", CLEARTEXT_DATA.format(where=self.where, what=what))


class VersionCheck:
    """The first part of a PGP/MIME mail: "Version: 1", a few bytes of text."""

    def __init__(self, policy) -> None:
        self.policy = policy
        self.text = bytearray()
        self.size = 0

    def feed(self, data: bytes) -> None:
        self.size += len(data)
        self.text += data[: VERSION_PART_LIMIT + 1 - len(self.text)]

    def close(self) -> None:
        text = bytes(self.text)
        if self.size > VERSION_PART_LIMIT or text.find(b"\0") >= 0:
            self.policy.refuse(
                "malformed",
                MALFORMED.format(
                    reason=f'the application/pgp-encrypted part holds {self.size} bytes, not just "Version: 1"'
                ),
            )
        elif b"version: 1" not in text.lower().replace(b"\r", b""):
            self.policy.refuse(
                "malformed", MALFORMED.format(reason='the application/pgp-encrypted part does not say "Version: 1"')
            )


class BlockCheck:
    """application/pgp-signature or application/pgp-keys: small, and nothing but OpenPGP packets
    of the kinds that belong there (armored or binary)."""

    KINDS = {
        "signature": ((b"PGP SIGNATURE",), {2}, SIGNATURE_LIMIT, "an OpenPGP signature"),
        "keys": (
            (b"PGP PUBLIC KEY BLOCK", b"PGP PRIVATE KEY BLOCK"),
            {2, 6, 12, 13, 14, 17},
            KEYS_LIMIT,
            "OpenPGP public keys",
        ),
    }

    def __init__(self, policy, where: str, encoding: str, kind: str) -> None:
        self.policy = policy
        self.where = where
        self.labels, self.tags, self.limit, self.what = self.KINDS[kind]
        self.decoder = decoder_for(encoding)
        self.content = bytearray()
        self.size = 0

    def feed(self, data: bytes) -> None:
        decoded = self.decoder.feed(data)
        self.size += len(decoded)
        if self.size <= self.limit:
            self.content += decoded

    def close(self) -> None:
        decoded = self.decoder.close()
        self.size += len(decoded)
        self.content += decoded
        refuse_undecodable(self.policy, self.where, self.decoder)
        if self.size > self.limit:
            self._refuse(f"{self.size} bytes, more than {self.limit // 1024} KB")
            return
        tags = block_packet_tags(bytes(self.content), self.labels)
        if isinstance(tags, str):
            self._refuse(tags)
        elif 5 in tags or 7 in tags:
            self._refuse("a secret key")
        elif not set(tags) <= self.tags:
            self._refuse(f"OpenPGP packets of tag(s) {sorted(set(tags) - self.tags)}")

    def _refuse(self, problem: str) -> None:
        self.policy.refuse(
            "cleartext_data", CLEARTEXT_DATA.format(where=self.where, what=f"not {self.what} ({problem})")
        )


class NestedCheck:
    """A message carried in a message/global or message/news part (or another whose body must be
    decoded first): decoded and parsed by a parser of its own, whose parts the policy judges."""

    def __init__(self, policy, where: str, parser, encoding: str) -> None:
        self.policy = policy
        self.where = where
        self.parser = parser
        self.decoder = decoder_for(encoding)

    def feed(self, data: bytes) -> None:
        self.parser.feed(self.decoder.feed(data))

    def close(self) -> None:
        self.parser.feed(self.decoder.close())
        self.parser.close()
        refuse_undecodable(self.policy, self.where, self.decoder)


class LaterFragmentCheck:
    """A message/partial fragment after the first: only the rest of an OpenPGP message may be in
    it: base64 lines (armor or transfer encoding), the armor's checksum and END lines, blank lines
    and the closing boundary line, and what the base64 lines decode to must look like ciphertext
    (not compressible, no DICOM or archive at their start)."""

    _BLOCK = 64 * 1024

    def __init__(self, policy, number: int) -> None:
        self.policy = policy
        self.number = number
        self.rest = b""
        self.base64 = Base64()
        self.decoded = bytearray()
        self.state = "data"  # data -> trailer (after the END line) -> closed (after the boundary)
        self.first_block = True

    def feed(self, data: bytes) -> None:
        text = self.rest + data
        cut = text.rfind(b"\n") + 1
        if cut == 0 and len(text) > 1000:
            self._refuse("a line longer than 1000 bytes")
            return
        self.rest = text[cut:]
        self._lines(text[:cut])

    def close(self) -> None:
        if self.rest:
            self._lines(self.rest)
        self._judge(final=True)

    def _lines(self, text: bytes) -> None:
        for line in text.split(b"\n"):
            line = line.rstrip(b"\r \t")
            if self.policy.reply is not None or not line:
                continue
            if self.state == "data":
                if line == b"-----END PGP MESSAGE-----":
                    self.state = "trailer"
                    continue
                if line.startswith(b"=") and len(line) == 5:
                    continue  # the armor's checksum line
                if not line.translate(None, _ALPHABET):
                    self.decoded += self.base64.feed(line)
                    continue
            if self.state != "closed" and line.startswith(b"--"):
                self.state = "closed"
                continue
            self._refuse(f"a line that is not part of an encrypted message ({printable(line.decode('latin-1'), 30)})")
        self._judge(final=False)

    def _judge(self, final: bool) -> None:
        while len(self.decoded) >= self._BLOCK or (final and self.decoded):
            block = bytes(self.decoded[: self._BLOCK])
            del self.decoded[: self._BLOCK]
            if self.first_block:
                self.first_block = False
                found = _dicom_or_archive(block)
                if found is not None:
                    self._refuse(f"it carries {found[1]}")
                    return
            if len(block) >= 4096 and len(zlib.compress(block, 1)) < 0.95 * len(block):
                self._refuse("what it carries is not ciphertext (it compresses)")
                return
        if final:
            self.decoded = bytearray()

    def _refuse(self, reason: str) -> None:
        self.policy.refuse("fragment", FRAGMENT.format(reason=f"fragment {self.number}: {reason}"))
