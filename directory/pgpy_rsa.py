# One RSA key object per loaded private key, for PGPy's signatures. PGPy (0.6) builds a new
# `cryptography` key from the RSA numbers for every signature it makes (RSAPriv.__privkey__), and
# cryptography checks each new key: ~150 ms of CPU for a 3072-bit key, with the GIL held, so that
# every directory mail the hub signed in a worker thread stopped its event loop for as long.
# Here a private key's RSA material gets one key object, built and checked once (its numbers form a
# key), which PGPy then signs with (~1.5 ms a signature).
# The one module that touches PGPy's private members (PGPKey._key.keymaterial, RSAPriv.__privkey__);
# tests/test_pgpy_rsa.py pins their behaviour for the PGPy versions pyproject.toml allows.
import math
import warnings
from collections.abc import Iterator

from cryptography.hazmat.primitives.asymmetric import rsa

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from pgpy.packet.fields import RSAPriv

from .errors import DirectoryError


def sign_with_one_key_object(key) -> None:
    """Give each RSA private key material of the pgpy key `key` (its primary key and subkeys) one
    checked `cryptography` key object to sign with. DirectoryError if the numbers do not form a key."""
    for material in _rsa_materials(key):
        if "__privkey__" not in vars(material):  # (done already)
            private = _checked_private_key(material, str(key.fingerprint))
            material.__privkey__ = lambda private=private: private  # shadows RSAPriv.__privkey__


def _rsa_materials(key) -> Iterator[RSAPriv]:
    for each in (key, *key.subkeys.values()):
        material = each._key.keymaterial
        if isinstance(material, RSAPriv):
            yield material


def _checked_private_key(m: RSAPriv, fingerprint: str) -> rsa.RSAPrivateKey:
    """The key object, built without cryptography's validation of the numbers (which tests p and q
    for primality: the 150 ms) but checked to form a key: n = pq, p != q, ed = 1 mod lcm(p-1, q-1), so
    that what it signs, the public key verifies (a damaged number fails here, not at a site)."""
    p, q, d, e, n = int(m.p), int(m.q), int(m.d), int(m.e), int(m.n)
    if p < 3 or q < 3 or p == q or p * q != n or e * d % math.lcm(p - 1, q - 1) != 1:
        raise DirectoryError(f"private key {fingerprint}: its RSA numbers do not form a key")
    try:
        return rsa.RSAPrivateNumbers(
            p, q, d, rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q), rsa.rsa_crt_iqmp(p, q), rsa.RSAPublicNumbers(e, n)
        ).private_key(unsafe_skip_rsa_key_validation=True)
    except ValueError as exc:  # (OpenSSL's own refusals)
        raise DirectoryError(f"private key {fingerprint}: its RSA numbers do not form a key ({exc})") from None
