# OpenPGP Web Key Directory names (draft-koch-openpgp-webkey-service): the hashed local part under
# /.well-known/openpgpkey/[DOMAIN/]hu/, and the paths of both lookup methods. Pure functions; the
# HTTP side lives in mailhub/hub_key_http.py.
import hashlib
from collections.abc import Sequence

_ZBASE32 = "ybndrfg8ejkmcpqxot1uwisza345h769"


def zbase32(data: bytes) -> str:
    """z-base-32 (RFC 6189 section 5.1.6) of whole bytes, without padding."""
    bits = int.from_bytes(data, "big")
    count = len(data) * 8
    chars = []
    for shift in range(count - 5, -5, -5):
        chars.append(_ZBASE32[(bits >> shift if shift >= 0 else bits << -shift) & 31])
    return "".join(chars)


def wkd_hash(local_part: str) -> str:
    """The 32-character name of a mail address's key file: z-base-32 of SHA-1 of the lowercased
    local part (ASCII case folding only, as GnuPG does)."""
    lowered = "".join(c.lower() if "A" <= c <= "Z" else c for c in local_part)
    return zbase32(hashlib.sha1(lowered.encode("utf-8")).digest())


def wkd_paths(local_part: str, domains: Sequence[str]) -> tuple[set[str], set[str]]:
    """(key paths, policy paths) of the direct method and of the advanced method per domain."""
    name = wkd_hash(local_part)
    keys = {f"/.well-known/openpgpkey/hu/{name}"}
    policies = {"/.well-known/openpgpkey/policy"}
    for domain in domains:
        keys.add(f"/.well-known/openpgpkey/{domain.lower()}/hu/{name}")
        policies.add(f"/.well-known/openpgpkey/{domain.lower()}/policy")
    return keys, policies
