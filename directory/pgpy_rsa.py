# One RSA key object per loaded private key, for PGPy's signatures. PGPy (0.6) builds a new
# `cryptography` key from the RSA numbers for every signature it makes (RSAPriv.__privkey__), and
# cryptography checks each new key: ~150 ms of CPU for a 3072-bit key, with the GIL held, so that
# every directory mail the hub signed in a worker thread stopped its event loop for as long.
# Here a private key's RSA material gets one key object, built and checked once (a signature its
# public key verifies), which PGPy then signs with (~1.5 ms a signature).
# The one module that touches PGPy's private members (PGPKey._key.keymaterial, RSAPriv.__privkey__);
# tests/test_pgpy_rsa.py pins their behaviour for the PGPy versions pyproject.toml allows.
import warnings
from collections.abc import Iterator

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from pgpy.packet.fields import RSAPriv

from .errors import DirectoryError

_PROBE = b"DICOM Mail Hub: does this RSA key sign what its public key verifies?"


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
    """The key object, checked by a signature instead of cryptography's validation of the numbers
    (which tests p and q for primality, the 150 ms): a wrong p, q, d or n fails the verification."""
    try:
        private = rsa.RSAPrivateNumbers(
            m.p,
            m.q,
            m.d,
            rsa.rsa_crt_dmp1(m.d, m.p),
            rsa.rsa_crt_dmq1(m.d, m.q),
            rsa.rsa_crt_iqmp(m.p, m.q),
            rsa.RSAPublicNumbers(m.e, m.n),
        ).private_key(unsafe_skip_rsa_key_validation=True)
        signature = private.sign(_PROBE, padding.PKCS1v15(), hashes.SHA256())
        private.public_key().verify(signature, _PROBE, padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, ValueError) as exc:
        raise DirectoryError(
            f"private key {fingerprint}: its RSA numbers do not form a working key ({exc!r})"
        ) from None
    return private
