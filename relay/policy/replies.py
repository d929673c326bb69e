# The encryption policy's refusals: reason codes (the label of mailhub_encryption_refusals_total)
# and reply texts (RFC 3463 enhanced codes; docs/encryption-policy.md explains each). Only text:
# client-controlled values are cleaned by printable() before they go into a reply.
import re

CLEARTEXT_DICOM = (
    "554 5.7.1 Unencrypted DICOM refused: {where} is DICOM in the clear ({how});"
    " send it PGP/MIME-encrypted (RFC 3156) to the recipient site's key"
)
CLEARTEXT_DATA = (
    "554 5.7.1 Unencrypted content refused: {where} is {what} in the clear; only text,"
    " signatures, keys and delivery or read reports may travel unencrypted: send it"
    " PGP/MIME-encrypted (RFC 3156) to the recipient site's key"
)
MALFORMED = "554 5.6.0 Malformed PGP/MIME (RFC 3156): {reason}"
TWO_ENCRYPTED_PARTS = (
    "multipart/encrypted needs exactly two parts (application/pgp-encrypted, application/octet-stream)"
)
MALFORMED_OPENPGP = "554 5.6.0 Malformed OpenPGP message in {where}: {reason}"
AMBIGUOUS = (
    "554 5.6.0 Ambiguous MIME structure refused: {where} has {what}; mail readers may see"
    " other parts than the hub checked"
)
UNSUPPORTED = "554 5.6.1 {what} in {where} is not understood here, so it is refused"
STRUCTURE_LIMIT = "552 5.6.0 MIME structure over the hub's limits refused: {what} (in {where})"
FRAGMENT = "554 5.7.1 Fragment refused (message/partial, RFC 2046): {reason}"
WRONG_KEY = (
    "550 5.7.5 Not encrypted to site {site}'s key: found key ID(s) {found}; expected {expected} (see the directory)"
)
HIDDEN_REFUSED = (
    "550 5.7.1 Hidden recipients (key ID 0) are not accepted;"
    " encrypt to site {site}'s key {expected} without --throw-keyids"
)

# reason code -> what it covers (the metric's help text lists them)
REASONS = {
    "cleartext_dicom": "DICOM in the clear, by type, file name or content (also in archives and text)",
    "cleartext_data": "other content in the clear that is not text, a signature, a key or a report",
    "malformed": "PGP/MIME or OpenPGP structure that is not what RFC 3156 / RFC 4880 describe",
    "ambiguous": "MIME that mail readers may read otherwise (duplicate fields, lone CRs, prefix boundaries...)",
    "unsupported": "an unknown Content-Transfer-Encoding or a type the hub cannot look into",
    "structure_limit": "over a limit of the MIME scanner (header size, fields, parts, depth...)",
    "fragment": "message/partial that is not a PGP/MIME message in fragments",
    "wrong_key": "encrypted, but not to the key(s) of every recipient site",
    "hidden_recipient": "encrypted to hidden recipients only (key ID 0) while not allowed",
}

_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def printable(text: str, limit: int = 80) -> str:
    """Client-controlled text fit for a reply line: printable ASCII ('?' for the rest), cut."""
    text = _UNPRINTABLE.sub("?", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
