# The hub's own OpenPGP signing key, which signs the participant directory. Created on first use
# (the server's first start) as DATA_DIR/hub-signing-key.asc, mode 0600, written to a temporary
# file and linked into place so that two processes starting at once end up with the same key.
# The private key never leaves this file; only the public key and fingerprint are published.
import os
import warnings
from pathlib import Path

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import pgpy
    from pgpy.constants import (CompressionAlgorithm, HashAlgorithm, KeyFlags, PubKeyAlgorithm,
                                SymmetricKeyAlgorithm)

from .errors import DirectoryError
from .keys import load_pgpy_key

KEY_FILE = "hub-signing-key.asc"
_KEY_BITS = 3072


class HubKey:
    def __init__(self, key):
        self._key = key

    @property
    def fingerprint(self) -> str:
        return str(self._key.fingerprint).replace(" ", "").upper()

    @property
    def public_armored(self) -> str:
        return str(self._key.pubkey)

    def sign_detached(self, data: bytes) -> str:
        """An armored detached signature over exactly `data` (binary signature, SHA-256)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return str(self._key.sign(data, hash=HashAlgorithm.SHA256))


def key_path(data_dir: Path) -> Path:
    return Path(data_dir) / KEY_FILE


def load_hub_key(data_dir: Path) -> HubKey | None:
    """The hub key, or None when it was not created yet."""
    path = key_path(data_dir)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    key = load_pgpy_key(data)
    if key.is_public or not key.is_unlocked:
        raise DirectoryError(f"{path} does not hold an unprotected private key")
    return HubKey(key)


def load_or_create_hub_key(data_dir: Path, address: str) -> HubKey:
    """The hub key, created when missing, with the user ID "DICOM Mail Hub directory <address>"."""
    existing = load_hub_key(data_dir)
    if existing is not None:
        return existing
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    key = _new_key(address)
    path = key_path(data_dir)
    temporary = path.with_name(f".{KEY_FILE}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, str(key).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temporary, path)  # fails if another process created the key meanwhile
    except FileExistsError:
        pass
    finally:
        os.unlink(temporary)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return load_hub_key(data_dir)


def _new_key(address: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        key = pgpy.PGPKey.new(PubKeyAlgorithm.RSAEncryptOrSign, _KEY_BITS)
        key.add_uid(pgpy.PGPUID.new("DICOM Mail Hub directory", email=address), usage={KeyFlags.Sign, KeyFlags.Certify},
                    hashes=[HashAlgorithm.SHA256, HashAlgorithm.SHA512],
                    ciphers=[SymmetricKeyAlgorithm.AES256], compression=[CompressionAlgorithm.Uncompressed])
    return key
