# Jinja filters of the mailhub_postgresql role: the SCRAM-SHA-256 verifier PostgreSQL stores for a
# role's password (pg_authid.rolpassword), so that the role sets a password by its verifier and
# the password itself never reaches the server, its logs or a command line; the current verifier
# is kept when the password still matches it (a second run changes nothing).
# Must never return or log the password, and never a verifier the server would read otherwise.
import base64
import hashlib
import hmac
import os
import re
import stringprep
import unicodedata

ITERATIONS = 4096  # PostgreSQL's default (scram_iterations)
_VERIFIER = re.compile(r"^SCRAM-SHA-256\$(\d+):([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+):([A-Za-z0-9+/=]+)$")
_PROHIBITED = (
    stringprep.in_table_c12,
    stringprep.in_table_c21,
    stringprep.in_table_c22,
    stringprep.in_table_c3,
    stringprep.in_table_c4,
    stringprep.in_table_c5,
    stringprep.in_table_c6,
    stringprep.in_table_c7,
    stringprep.in_table_c8,
    stringprep.in_table_c9,
    stringprep.in_table_a1,
)


def saslprep(password: str) -> bytes:
    """The bytes PostgreSQL hashes (pg_saslprep, RFC 4013): ASCII as it is; else non-ASCII spaces
    mapped to a space, characters mapped to nothing dropped, NFKC; the raw UTF-8 when the result
    has a prohibited character or breaks the bidirectional rules (as PostgreSQL then does)."""
    if password.isascii():
        return password.encode()
    mapped = "".join(" " if stringprep.in_table_c12(c) else c for c in password if not stringprep.in_table_b1(c))
    prepared = unicodedata.normalize("NFKC", mapped)
    if any(check(c) for c in prepared for check in _PROHIBITED):
        return password.encode()
    if any(stringprep.in_table_d1(c) for c in prepared):
        if any(stringprep.in_table_d2(c) for c in prepared) or not (
            stringprep.in_table_d1(prepared[0]) and stringprep.in_table_d1(prepared[-1])
        ):
            return password.encode()
    return prepared.encode()


def _keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    salted = hashlib.pbkdf2_hmac("sha256", saslprep(password), salt, iterations)
    stored = hashlib.sha256(hmac.new(salted, b"Client Key", "sha256").digest()).digest()
    server = hmac.new(salted, b"Server Key", "sha256").digest()
    return stored, server


def scram_verifier(password: str, current: str = "") -> str:
    """`current` when it is a SCRAM-SHA-256 verifier of `password`, else a new one (random salt)."""
    if not password:
        raise ValueError("mailhub_scram_verifier: an empty password (set the vault variable)")
    found = _VERIFIER.match((current or "").strip())
    if found:
        iterations, salt = int(found.group(1)), base64.b64decode(found.group(2))
        stored, server = _keys(password, salt, iterations)
        if hmac.compare_digest(base64.b64encode(stored).decode(), found.group(3)) and hmac.compare_digest(
            base64.b64encode(server).decode(), found.group(4)
        ):
            return current.strip()
    salt = os.urandom(16)
    stored, server = _keys(password, salt, ITERATIONS)
    encoded = [base64.b64encode(part).decode() for part in (salt, stored, server)]
    return f"SCRAM-SHA-256${ITERATIONS}:{encoded[0]}${encoded[1]}:{encoded[2]}"


class FilterModule:
    def filters(self):
        return {"mailhub_scram_verifier": scram_verifier}
