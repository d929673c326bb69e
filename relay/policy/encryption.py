# The encryption policy: "no DICOM in the clear, only to the recipient's key", decided while a mail
# streams, as a listener of relay.mime.stream (part_start, part_body, part_end, skipped). It fails
# closed: a mail is allowed only when every part that could carry data was seen to be an OpenPGP
# message encrypted to the key(s) of every recipient site under the policy (PGP/MIME, RFC 3156, or
# an encrypted file attached as is), or is a small recognised harmless part: text, signatures, keys,
# delivery and read reports, each checked to be what it says. Anything not fully understood (a
# scanner limit, an unknown encoding or type, malformed or ambiguous structure) is refused. No
# exemptions by envelope or label: a report is allowed because its parts are, not because of its
# type. Messages in encoded message/* parts and first fragments of message/partial are parsed by
# nested parsers whose parts go through the same rules. A pure function of the streamed bytes:
# no I/O, never decrypts, never sees a private key; keeps a few KB per open part.
from directory.openpgp_packets import WILDCARD_KEY_ID
from directory.policy import RecipientKeys
from relay.mime.decode import IDENTITY, KNOWN_ENCODINGS, file_names, transfer_encoding
from relay.mime.sniff import binary_in_text, dicom_name
from relay.mime.stream import AMBIGUITY_DEFECTS, LIMIT_DEFECTS, MAX_DEPTH, MAX_PARTS, MimeStreamParser
from relay.policy.parts import (
    BlockCheck,
    ClearCheck,
    LaterFragmentCheck,
    NestedCheck,
    PartCheck,
    PayloadCheck,
    TextCheck,
    VersionCheck,
)
from relay.policy.replies import (
    AMBIGUOUS,
    CLEARTEXT_DATA,
    CLEARTEXT_DICOM,
    FRAGMENT,
    HIDDEN_REFUSED,
    MALFORMED,
    STRUCTURE_LIMIT,
    TWO_ENCRYPTED_PARTS,
    UNSUPPORTED,
    WRONG_KEY,
    printable,
)

__all__ = ["EncryptionPolicy", "RecipientKeys"]

PREAMBLE_LIMIT = 64 * 1024  # bytes of preamble plus epilogue per multipart
FEED_SLICE = 64 * 1024  # body bytes handed to a part's check at a time
DICOM_TYPES = {
    "application/dicom",
    "application/dicom+json",
    "application/dicom+xml",
    "application/x-dicom",
    "image/dicom",
    "image/x-dicom",
    "image/dicom-rle",
}
# shown as text by mail readers, or structured text reports: checked as text
TEXT_TYPES = {
    "application/json",
    "application/xml",
    "message/delivery-status",
    "message/global-delivery-status",
    "message/disposition-notification",
    "message/global-disposition-notification",
    "message/global-headers",
    "message/feedback-report",
}
OPENPGP_LABELS = {"application/pgp-encrypted", "application/pgp"}  # said to be encrypted: the reply says it is not
OPENPGP_SUFFIXES = (".pgp", ".gpg", ".asc")
NESTED_MESSAGES = {"global", "news", "rfc822"}  # message/* subtypes that carry a message
_CONTENT_FIELDS = ("content-type", "content-transfer-encoding", "content-disposition")


class _Scope:
    """Where a parser's parts sit: the path of the part holding its message ("" at the top), the
    depth of that message, whether it is a report's returned content (encrypted to anyone is
    enough there), and whether it is the first fragment of a message/partial (it may end anywhere
    after its session keys)."""

    __slots__ = ("prefix", "depth", "returned", "fragment")

    def __init__(self, prefix: str, depth: int, returned: bool, fragment: bool) -> None:
        self.prefix, self.depth, self.returned, self.fragment = prefix, depth, returned, fragment


class _Multipart:
    __slots__ = ("subtype", "protocol", "children", "skipped")

    def __init__(self, subtype: str, protocol: str) -> None:
        self.subtype, self.protocol, self.children, self.skipped = subtype, protocol, 0, 0


class EncryptionPolicy:
    """One mail's verdict: after the parser is closed, reply is None (allowed) or the refusal's
    reply line, and reason its code (relay.policy.replies.REASONS)."""

    def __init__(self, recipients: list[RecipientKeys], allow_hidden_recipients: bool) -> None:
        self.recipients = recipients
        self.allow_hidden = allow_hidden_recipients
        self.reply: str | None = None
        self.reason: str | None = None
        self._top = _Scope("", 0, False, False)
        self._checks: dict[int, PartCheck] = {}  # id(leaf part) -> its content check
        self._multiparts: dict[int, _Multipart] = {}  # id(multipart) -> its state
        self._returned: set[int] = set()  # ids of parts in a report's returned content
        self._parts = 0

    # ---- listener ------------------------------------------------------------------------------

    def part_start(self, part) -> None:
        if self.reply is None:
            self._start(part, self._top)

    def part_body(self, part, data) -> None:
        if self.reply is None:
            check = self._checks.get(id(part))
            # in slices: copies of 1 MB chunks (and their joins in the checks) would come and go
            # per chunk, and once malloc serves them from its heap they are not given back
            for start in range(0, len(data), FEED_SLICE):
                if check is None or self.reply is not None:
                    return
                check.feed(bytes(data[start : start + FEED_SLICE]))
                check = self._checks.get(id(part))

    def part_end(self, part) -> None:
        if self.reply is None:
            self._end(part, self._top)

    def skipped(self, part, data) -> None:
        """Preamble and epilogue: a little text at most."""
        state = self._multiparts.get(id(part))
        if self.reply is not None or state is None:
            return
        state.skipped += len(data)
        if state.skipped > PREAMBLE_LIMIT:
            self._limit(f"more than {PREAMBLE_LIMIT // 1024} KB of preamble and epilogue", self._where(part, self._top))
        elif binary_in_text(bytes(data)) is not None:
            self.refuse(
                "cleartext_data",
                CLEARTEXT_DATA.format(
                    where=f"the preamble or epilogue of {self._where(part, self._top)}", what="binary content"
                ),
            )

    # ---- verdicts ------------------------------------------------------------------------------

    def refuse(self, reason: str, reply: str) -> None:
        if self.reply is None:
            self.reply, self.reason = reply, reason
            self._checks.clear()

    def check_keys(self, packets, returned: bool) -> None:
        """Session keys of an encrypted message against every recipient site's keys. In a report's
        returned content the original recipient's key is right, so any is accepted there."""
        if returned:
            return
        found = set(packets.key_ids)
        for recipient in self.recipients:
            if not recipient.key_ids or found & set(recipient.key_ids):
                continue  # no key registered: nothing to check against
            if WILDCARD_KEY_ID in found and self.allow_hidden:
                continue
            if WILDCARD_KEY_ID in found and found <= {WILDCARD_KEY_ID}:
                self.refuse(
                    "hidden_recipient", HIDDEN_REFUSED.format(site=recipient.site, expected=recipient.expected())
                )
                return
            shown = ", ".join(packets.key_ids) or (
                "none (encrypted to a passphrase only)" if packets.passphrase_packets else "none"
            )
            self.refuse("wrong_key", WRONG_KEY.format(site=recipient.site, found=shown, expected=recipient.expected()))
            return

    def _limit(self, what: str, where: str) -> None:
        self.refuse("structure_limit", STRUCTURE_LIMIT.format(what=what, where=where))

    def _defects(self, part, where: str, scope: _Scope) -> None:
        for code in part.defects:
            if code in LIMIT_DEFECTS:
                self._limit(LIMIT_DEFECTS[code], where)
            elif scope.fragment and code in ("unterminated", "no_parts"):
                continue  # a first fragment ends where it ends
            elif code in AMBIGUITY_DEFECTS:
                self.refuse("ambiguous", AMBIGUOUS.format(where=where, what=AMBIGUITY_DEFECTS[code]))
            if self.reply is not None:
                return

    # ---- structure -------------------------------------------------------------------------------

    def _start(self, part, scope: _Scope) -> None:
        self._parts += 1
        where = self._where(part, scope)
        if self._parts > MAX_PARTS:
            self._limit(f"more than {MAX_PARTS} MIME parts", where)
        elif scope.depth + part.depth > MAX_DEPTH:
            self._limit(f"MIME nesting deeper than {MAX_DEPTH} levels", where)
        else:
            self._defects(part, where, scope)
        if self.reply is not None:
            return
        content = [field for field, _ in part.content_fields() if field in _CONTENT_FIELDS]
        if len(content) != len(set(content)):
            name = next(field for field in content if content.count(field) > 1)
            self.refuse("ambiguous", AMBIGUOUS.format(where=where, what=f"two {name.title()} fields"))
            return
        parent = self._multiparts.get(id(part.parent)) if part.parent is not None else None
        returned = self._is_returned(part, parent, scope)
        if returned:
            self._returned.add(id(part))
        media = f"{part.content_type}/{part.subtype}"
        encoding = transfer_encoding(part)
        if (
            scope.fragment
            and part.parent is None
            and (
                media != "multipart/encrypted" or part.params.get("protocol", "").lower() != "application/pgp-encrypted"
            )
        ):
            self.refuse(
                "fragment",
                FRAGMENT.format(
                    reason=f"the first fragment announces {printable(media)}, not PGP/MIME (multipart/encrypted)"
                ),
            )
            return
        if parent is not None and parent.subtype == "signed":
            parent.children += 1
            if (
                parent.children == 2
                and parent.protocol == "application/pgp-signature"
                and media != "application/pgp-signature"
            ):
                self.refuse(
                    "malformed",
                    MALFORMED.format(
                        reason=f"the second part of multipart/signed is {printable(media)},"
                        " expected application/pgp-signature"
                    ),
                )
                return
        if part.kind != "leaf":
            self._container(part, parent, media, encoding, where)
            return
        if parent is not None and parent.subtype == "encrypted":
            self._encrypted_child(part, parent, media, encoding, scope, returned)
            return
        if encoding not in KNOWN_ENCODINGS:
            self.refuse(
                "unsupported",
                UNSUPPORTED.format(what=f"Content-Transfer-Encoding {printable(encoding, 40)!r}", where=where),
            )
            return
        self._leaf(part, media, encoding, where, scope, returned)

    def _container(self, part, parent, media: str, encoding: str, where: str) -> None:
        """A multipart or a message/rfc822 part parsed in line."""
        if encoding not in IDENTITY:
            self.refuse(
                "ambiguous",
                AMBIGUOUS.format(
                    where=where, what=f"a Content-Transfer-Encoding ({printable(encoding, 40)}) on a {printable(media)}"
                ),
            )
        elif parent is not None and parent.subtype == "encrypted":
            parent.children += 1
            self.refuse("malformed", MALFORMED.format(reason=f"a {printable(media)} inside multipart/encrypted"))
        elif part.kind == "multipart":
            protocol = part.params.get("protocol", "").lower()
            if part.subtype == "encrypted" and protocol != "application/pgp-encrypted":
                self.refuse(
                    "malformed",
                    MALFORMED.format(
                        reason=f"multipart/encrypted with protocol {printable(protocol, 40) or 'missing'!r},"
                        ' expected "application/pgp-encrypted"'
                    ),
                )
                return
            self._multiparts[id(part)] = _Multipart(part.subtype, protocol)

    def _encrypted_child(
        self, part, parent: _Multipart, media: str, encoding: str, scope: _Scope, returned: bool
    ) -> None:
        parent.children += 1
        if parent.children == 1:
            if media != "application/pgp-encrypted":
                self.refuse(
                    "malformed",
                    MALFORMED.format(
                        reason=f"the first part is {printable(media)}, expected application/pgp-encrypted"
                    ),
                )
            else:
                self._checks[id(part)] = VersionCheck(self)
        elif parent.children == 2:
            if media != "application/octet-stream":
                self.refuse(
                    "malformed",
                    MALFORMED.format(
                        reason=f"the second part is {printable(media)}, expected application/octet-stream"
                    ),
                )
            else:
                self._checks[id(part)] = PayloadCheck(
                    self, self._where(part, scope), encoding, True, scope.fragment, returned
                )
        else:
            self.refuse(
                "malformed",
                MALFORMED.format(reason=TWO_ENCRYPTED_PARTS),
            )

    def _leaf(self, part, media: str, encoding: str, where: str, scope: _Scope, returned: bool) -> None:
        names = file_names(part)
        named = next((name for name in names if dicom_name(name)), None)
        if media in DICOM_TYPES or named is not None:
            how = f"file name {printable(named, 40)}" if named is not None else f"type {media}"
            self.refuse("cleartext_dicom", CLEARTEXT_DICOM.format(where=where, how=how))
            return
        main, sub = part.content_type, part.subtype
        check: PartCheck | None
        if main == "text" or media in TEXT_TYPES:
            check = TextCheck(self, where, encoding)
        elif media == "application/pgp-signature":
            check = BlockCheck(self, where, encoding, "signature")
        elif media == "application/pgp-keys":
            check = BlockCheck(self, where, encoding, "keys")
        elif main == "message" and sub in NESTED_MESSAGES:
            check = self._nested(part, encoding, where, scope, returned, fragment=False)
        elif media == "message/partial":
            check = self._fragment(part, encoding, where, scope, returned)
        elif media == "message/external-body":
            self.refuse(
                "unsupported",
                UNSUPPORTED.format(what="message/external-body (a reference to data elsewhere)", where=where),
            )
            return
        else:
            what = printable(media)
            if media in OPENPGP_LABELS or any(name.lower().endswith(OPENPGP_SUFFIXES) for name in names):
                what = f"data that is no OpenPGP message (though labelled {what})"
            check = ClearCheck(self, where, encoding, what, returned)
        if check is not None:
            self._checks[id(part)] = check

    def _nested(self, part, encoding: str, where: str, scope: _Scope, returned: bool, fragment: bool) -> NestedCheck:
        path = self._path(part, scope) or "1"  # numbered as IMAP numbers a message/rfc822 top level
        nested = _Scope(path, scope.depth + part.depth + 1, returned, fragment)
        return NestedCheck(self, where, MimeStreamParser(_NestedListener(self, nested)), encoding)

    def _fragment(self, part, encoding: str, where: str, scope: _Scope, returned: bool) -> PartCheck | None:
        """message/partial (RFC 2046 5.2.2): the first fragment must announce PGP/MIME and carry
        its session keys; later ones only the rest of the encrypted message."""
        params = part.params
        number, total = params.get("number", ""), params.get("total", "")
        if (
            encoding not in ("", "7bit")
            or not params.get("id")
            or not number.isdigit()
            or int(number) < 1
            or (total and (not total.isdigit() or int(total) < int(number)))
        ):
            self.refuse(
                "fragment",
                FRAGMENT.format(
                    reason=f"{where} lacks a valid id, number or total,"
                    f" or is encoded ({printable(encoding, 20) or '7bit'})"
                ),
            )
            return None
        if int(number) == 1:
            return self._nested(part, encoding, where, scope, returned, fragment=True)
        return LaterFragmentCheck(self, int(number))

    def _end(self, part, scope: _Scope) -> None:
        check = self._checks.pop(id(part), None)
        if check is not None:
            check.close()
        if self.reply is None:
            self._defects(part, self._where(part, scope), scope)
        state = self._multiparts.pop(id(part), None)
        self._returned.discard(id(part))
        if self.reply is not None or state is None:
            return
        if state.subtype == "encrypted" and state.children != 2:
            self.refuse(
                "malformed",
                MALFORMED.format(reason=TWO_ENCRYPTED_PARTS),
            )
        elif state.subtype == "signed" and state.children != 2:
            self.refuse("malformed", MALFORMED.format(reason="multipart/signed needs exactly two parts"))

    # ---- places ------------------------------------------------------------------------------------

    def _is_returned(self, part, parent: _Multipart | None, scope: _Scope) -> bool:
        """In a report's returned content: a message/* child of a multipart/report, and all in it."""
        if part.parent is None:
            return scope.returned
        if id(part.parent) in self._returned:
            return True
        return parent is not None and parent.subtype == "report" and part.content_type == "message"

    @staticmethod
    def _path(part, scope: _Scope) -> str:
        if not scope.prefix:
            return part.path
        return f"{scope.prefix}.{part.path}" if part.path else scope.prefix

    def _where(self, part, scope: _Scope) -> str:
        path = self._path(part, scope)
        where = f"part {path}" if path else "the message body"
        names = file_names(part) if part.kind == "leaf" else []
        name = f", {printable(names[0], 40)}" if names else ""
        return f"{where} ({printable(part.content_type + '/' + part.subtype, 60)}{name})"


class _NestedListener:
    """Events of a nested parser (a message inside an encoded message/* part), in its scope."""

    def __init__(self, policy: EncryptionPolicy, scope: _Scope) -> None:
        self.policy = policy
        self.scope = scope

    def part_start(self, part) -> None:
        if self.policy.reply is None:
            self.policy._start(part, self.scope)

    def part_body(self, part, data) -> None:
        self.policy.part_body(part, data)

    def part_end(self, part) -> None:
        if self.policy.reply is None:
            self.policy._end(part, self.scope)

    def skipped(self, part, data) -> None:
        self.policy.skipped(part, data)
