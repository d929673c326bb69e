# The encryption policy, as a listener on the streaming MIME parser's events (part_start,
# part_body, part_end): it decides while the message streams, keeping only a few KB per part,
# whether the mail may be stored. Refused: DICOM in the clear (an application/dicom part, or any
# non-text part outside an encrypted one whose content starts with the DICOM preamble and "DICM"),
# multipart/encrypted that is not well-formed PGP/MIME (RFC 3156), and PGP/MIME whose public-key
# packets do not name a current or grace-period encryption key of every recipient site. It never
# decrypts and never sees a private key. Exempt: reports (DSNs, MDNs) recognised here by their
# top-level multipart/report type; null-sender mails and directory requests are left out by the
# caller, which then attaches no policy at all.
import binascii
import time
from dataclasses import dataclass

from .keys import KeyRing
from .openpgp_packets import WILDCARD_KEY_ID, SessionPacketReader

_DICOM_MAGIC_AT = 128
_SNIFF_BYTES = _DICOM_MAGIC_AT + 4
_VERSION_PART_LIMIT = 1024
_REPORT_TYPES = {"delivery-status", "disposition-notification"}

# Reply texts (RFC 3463 enhanced codes; README "Encryption policy" explains the choices).
CLEARTEXT_DICOM = ("554 5.7.1 Unencrypted DICOM refused: {where} is DICOM in the clear;"
                   " send it PGP/MIME-encrypted (RFC 3156) to the recipient site's key")
MALFORMED = "554 5.6.0 Malformed PGP/MIME (RFC 3156): {reason}"
WRONG_KEY = ("550 5.7.5 Not encrypted to site {site}'s key: found key ID(s) {found};"
             " expected {expected} (see the directory)")
HIDDEN_REFUSED = ("550 5.7.1 Hidden recipients (key ID 0) are not accepted;"
                  " encrypt to site {site}'s key {expected} without --throw-keyids")


@dataclass(frozen=True)
class RecipientKeys:
    """A recipient site under the policy and the encryption key IDs its mail may be encrypted to."""
    site: str
    key_ids: dict[str, str]  # key ID -> how to name it in a reply ("current key" / "previous key ...")

    def expected(self) -> str:
        return " or ".join(f"{key_id} ({label})" for key_id, label in self.key_ids.items())


def policy_for(sites, keyring: KeyRing, cfg) -> "EncryptionPolicy | None":
    """The policy for a mail to these recipient sites, or None when none of them is under it."""
    now = time.time()
    grace = cfg.directory.key_grace_days * 86400
    recipients = []
    for site in sites:
        if not keyring.encryption_required(site.id, cfg.encryption.required):
            continue
        key_ids = {}
        for key in keyring.keys(site.id):
            if key.usable(now, grace):
                label = "current key" if key.retired_at is None else "previous key, in its grace period"
                key_ids.update((key_id, f"{label} {key.fingerprint}") for key_id in key.encryption_key_ids)
        recipients.append(RecipientKeys(site.name, key_ids))
    if not recipients:
        return None
    return EncryptionPolicy(recipients, cfg.encryption.allow_hidden_recipients)


class _Encrypted:
    """State of one multipart/encrypted part: its children seen so far."""
    __slots__ = ("children", "version_text", "packets")

    def __init__(self):
        self.children = 0
        self.version_text = bytearray()
        self.packets: SessionPacketReader | None = None


class EncryptionPolicy:
    def __init__(self, recipients: list[RecipientKeys], allow_hidden_recipients: bool):
        self.recipients = recipients
        self.allow_hidden = allow_hidden_recipients
        self.exempt = False      # a DSN or an MDN (multipart/report), seen at the top-level part
        self.reply: str | None = None
        self.reason: str | None = None   # cleartext_dicom, malformed, wrong_key or hidden_recipient
        self._encrypted: dict[str, _Encrypted] = {}   # path of a multipart/encrypted -> state
        self._sniff: dict[str, bytearray] = {}        # path of a leaf being sniffed -> first bytes

    # ---- listener ------------------------------------------------------------------------------

    def part_start(self, part) -> None:
        if self.reply is not None or self.exempt:
            return
        if part.parent is None and (part.content_type, part.subtype) == ("multipart", "report") and \
                part.params.get("report-type", "").lower() in _REPORT_TYPES:
            self.exempt = True
            return
        container = self._container_of(part)
        if container is not None:
            self._encrypted_child(part, container)
        elif (part.content_type, part.subtype) == ("multipart", "encrypted"):
            protocol = part.params.get("protocol", "").lower()
            if protocol != "application/pgp-encrypted":
                self._malformed(f"multipart/encrypted with protocol {protocol or 'missing'!r},"
                                " expected \"application/pgp-encrypted\"")
            self._encrypted[part.path] = _Encrypted()
        elif part.kind == "leaf" and not self._inside_encrypted(part):
            if (part.content_type, part.subtype) == ("application", "dicom"):
                self._refuse("cleartext_dicom", CLEARTEXT_DICOM.format(where=_describe(part)))
            elif part.content_type != "text":
                self._sniff[part.path] = bytearray()

    def part_body(self, part, data) -> None:
        if self.reply is not None or self.exempt:
            return
        parent = part.parent
        state = self._encrypted.get(parent.path) if parent is not None else None
        if state is not None:
            if state.children == 1 and len(state.version_text) < _VERSION_PART_LIMIT:
                state.version_text += data[:_VERSION_PART_LIMIT]
            elif state.children == 2 and state.packets is not None and not state.packets.result.complete:
                state.packets.feed(bytes(data))
        elif part.path in self._sniff:
            self._sniff_dicom(part, data)

    def part_end(self, part) -> None:
        if self.reply is not None or self.exempt:
            return
        if part.path in self._sniff:
            self._sniff_dicom(part, b"", final=True)
        parent = part.parent
        state = self._encrypted.get(parent.path) if parent is not None else None
        if state is not None and state.children == 1 and part.kind == "leaf":
            if b"version: 1" not in bytes(state.version_text).lower().replace(b"\r", b""):
                self._malformed("the application/pgp-encrypted part does not say \"Version: 1\"")
        elif state is not None and state.children == 2 and state.packets is not None:
            self._check_keys(state.packets.close())
        if part.path in self._encrypted:
            if self._encrypted.pop(part.path).children != 2:
                self._malformed("multipart/encrypted needs exactly two parts"
                                " (application/pgp-encrypted, application/octet-stream)")

    # ---- checks ----------------------------------------------------------------------------------

    def _container_of(self, part) -> _Encrypted | None:
        return self._encrypted.get(part.parent.path) if part.parent is not None else None

    def _inside_encrypted(self, part) -> bool:
        return any(p in self._encrypted for p in _ancestors(part))

    def _encrypted_child(self, part, state: _Encrypted) -> None:
        state.children += 1
        kind = f"{part.content_type}/{part.subtype}"
        if state.children == 1 and kind != "application/pgp-encrypted":
            self._malformed(f"the first part is {kind}, expected application/pgp-encrypted")
        elif state.children == 2:
            if kind != "application/octet-stream":
                self._malformed(f"the second part is {kind}, expected application/octet-stream")
            else:
                state.packets = SessionPacketReader(part.header("content-transfer-encoding") or "")

    def _check_keys(self, packets) -> None:
        if packets.error is not None:
            self._malformed(packets.error)
            return
        found = set(packets.key_ids)
        for recipient in self.recipients:
            if not recipient.key_ids or found & set(recipient.key_ids):
                continue  # no key registered: nothing to check against
            if WILDCARD_KEY_ID in found and self.allow_hidden:
                continue
            if WILDCARD_KEY_ID in found and found <= {WILDCARD_KEY_ID}:
                self._refuse("hidden_recipient",
                             HIDDEN_REFUSED.format(site=recipient.site, expected=recipient.expected()))
                return
            shown = ", ".join(packets.key_ids) or (
                "none (encrypted to a passphrase only)" if packets.passphrase_packets else "none")
            self._refuse("wrong_key", WRONG_KEY.format(site=recipient.site, found=shown, expected=recipient.expected()))
            return

    def _sniff_dicom(self, part, data, final: bool = False) -> None:
        buffer = self._sniff[part.path]
        encoding = (part.header("content-transfer-encoding") or "").strip().lower()
        want = (_SNIFF_BYTES + 2) // 3 * 4 + 8 if encoding == "base64" else _SNIFF_BYTES
        if len(buffer) < want * 2:
            buffer += bytes(data[:want * 2]).translate(None, b" \t\r\n") if encoding == "base64" else data[:want]
        if len(buffer) < want and not final:
            return
        del self._sniff[part.path]
        content = bytes(buffer)
        if encoding == "base64":
            usable = len(content) - len(content) % 4
            try:
                content = binascii.a2b_base64(content[:usable])
            except binascii.Error:
                return
        if content[_DICOM_MAGIC_AT:_SNIFF_BYTES] == b"DICM":
            self._refuse("cleartext_dicom", CLEARTEXT_DICOM.format(where=_describe(part) + " (DICM file signature)"))

    def _malformed(self, reason: str) -> None:
        self._refuse("malformed", MALFORMED.format(reason=reason))

    def _refuse(self, reason: str, reply: str) -> None:
        if self.reply is None:
            self.reply, self.reason = reply, reason
        self._sniff.clear()


def _ancestors(part):
    parent = part.parent
    while parent is not None:
        yield parent.path
        parent = parent.parent


def _describe(part) -> str:
    where = f"part {part.path}" if part.path else "the message body"
    name = part.params.get("name")
    return f"{where} ({part.content_type}/{part.subtype}{', ' + name if name else ''})"
