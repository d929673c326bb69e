# The hub's own OpenPGP signing key, which signs the participant directory. Created on first use
# (the server's first start) as DATA_DIR/hub-signing-key.asc, mode 0600, written to a temporary
# file and linked into place so that two processes starting at once end up with the same key.
# After a rotation (hub_key_rotation.py) that file holds the new key, certified by the previous
# one, which is kept in DATA_DIR/hub-keys/<FINGERPRINT>.asc: the certification names the previous
# key and its time starts the grace period during which both keys sign.
# The private keys never leave these files; only public keys and fingerprints are published.
import logging
import os
import threading
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import pgpy
    from pgpy.constants import (
        CompressionAlgorithm,
        HashAlgorithm,
        KeyFlags,
        PubKeyAlgorithm,
        SignatureType,
        SymmetricKeyAlgorithm,
    )

from storage.files import fsync_dir

from .armor import armor
from .document import timestamp
from .errors import DirectoryError
from .keys import load_pgpy_key
from .pgpy_rsa import sign_with_one_key_object

log = logging.getLogger("mailhub.directory")

KEY_FILE = "hub-signing-key.asc"
ARCHIVE_DIR = "hub-keys"
_KEY_BITS = 3072
_CERTIFICATIONS = {
    SignatureType.Generic_Cert,
    SignatureType.Persona_Cert,
    SignatureType.Casual_Cert,
    SignatureType.Positive_Cert,
}


class HubKey:
    """One private key of the hub."""

    def __init__(self, key):
        sign_with_one_key_object(key)  # (else each signature costs ~150 ms of CPU with the GIL held)
        self._key = key

    @property
    def fingerprint(self) -> str:
        return str(self._key.fingerprint).replace(" ", "").upper()

    @property
    def created(self) -> float:
        """The key's creation time: with microseconds for a key just made, whole seconds (as
        OpenPGP keeps it) for one read from its file."""
        return self._key.created.timestamp()

    @property
    def public_armored(self) -> str:
        return str(self._key.pubkey)

    @property
    def public_binary(self) -> bytes:
        return bytes(self._key.pubkey)

    def signature_packet(self, data: bytes, now: float | None = None) -> bytes:
        """A binary detached signature over exactly `data` (binary document, SHA-256)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return bytes(self._key.sign(data, hash=HashAlgorithm.SHA256, created=_utc(now)))

    def certifier(self) -> tuple[str, float] | None:
        """(fingerprint, time) of the newest certification of this key's user ID by another key:
        the key it was rotated from, and when."""
        newest = None
        for uid in self._key.userids:
            for sig in uid.third_party_certifications:
                if sig.type in _CERTIFICATIONS and (newest is None or sig.created > newest.created):
                    newest = sig
        if newest is None:
            return None
        fingerprint = str(newest.signer_fingerprint or newest.signer).replace(" ", "").upper()
        return fingerprint, newest.created.timestamp()

    def certify(self, other: "HubKey", now: float | None = None) -> None:
        """Sign `other`'s user IDs with this key (a key certification, as `gpg --sign-key` makes)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for uid in other._key.userids:
                uid |= self._key.certify(uid, created=_utc(now))

    def private_armored(self) -> str:
        return str(self._key)


class HubKeys:
    """The hub's signing keys at one moment: the current key and, after a rotation, the previous
    one, which co-signs until `previous_signs_until` and is then retired (kept, unused)."""

    def __init__(
        self,
        current: HubKey,
        previous: HubKey | None = None,
        rotated_from: tuple[str, float] | None = None,
        grace_seconds: float = 0.0,
    ):
        self.current = current
        self.previous = previous  # None also when the previous key's file is missing
        self.previous_fingerprint: str | None = None
        self.rotated_at: float | None = None
        if rotated_from is not None:
            self.previous_fingerprint, self.rotated_at = rotated_from
        self.previous_signs_until = None if self.rotated_at is None else self.rotated_at + grace_seconds
        self._published: dict[int, tuple[str, bytes]] = {}

    @property
    def fingerprint(self) -> str:
        return self.current.fingerprint

    def in_grace(self, now: float | None = None) -> bool:
        return (
            self.previous is not None
            and self.previous_signs_until is not None
            and (time.time() if now is None else now) < self.previous_signs_until
        )

    def signers(self, now: float | None = None, announcement: bool = False) -> list[HubKey]:
        """The current key, plus the previous one during the grace period; an announcement of the
        rotation is always signed by both (it is what lets the sites trust the new key)."""
        if self.previous is not None and (announcement or self.in_grace(now)):
            return [self.current, self.previous]
        return [self.current]

    def sign_detached(self, data: bytes, now: float | None = None, announcement: bool = False) -> str:
        """One armored signature block holding a signature by each signing key."""
        return armor("SIGNATURE", b"".join(key.signature_packet(data, now) for key in self.signers(now, announcement)))

    def published(self, now: float | None = None, announcement: bool = False) -> tuple[str, bytes]:
        """The public keys of the signing keys (current first), armored with a comment naming each
        fingerprint, and binary (the Web Key Directory form)."""
        keys = self.signers(now, announcement)
        cache_key = len(keys)
        if cache_key not in self._published:
            binary = b"".join(key.public_binary for key in keys)
            comments = tuple(
                f"{'previous' if key is self.previous else 'current'} hub key {key.fingerprint}" for key in keys
            )
            self._published[cache_key] = (armor("PUBLIC KEY BLOCK", binary, comments), binary)
        return self._published[cache_key]

    def rotation(self) -> dict | None:
        """The last rotation, as the directory document states it."""
        if self.rotated_at is None or self.previous_signs_until is None:  # both are set by a rotation
            return None
        return {
            "previous_fingerprint": self.previous_fingerprint,
            "rotated_at": timestamp(self.rotated_at),
            "previous_signs_until": timestamp(self.previous_signs_until),
        }


def key_path(data_dir: Path) -> Path:
    return Path(data_dir) / KEY_FILE


def archive_path(data_dir: Path, fingerprint: str) -> Path:
    return Path(data_dir) / ARCHIVE_DIR / f"{fingerprint}.asc"


def load_key_file(path: Path) -> HubKey:
    data = path.read_bytes()  # (FileNotFoundError: no key yet)
    try:
        key = load_pgpy_key(data)
        if key.is_public or not key.is_unlocked:
            raise DirectoryError("it does not hold an unprotected private key")
        return HubKey(key)
    except DirectoryError as exc:
        raise DirectoryError(
            f"hub key {path}: {exc}; restore the file from the data folder's backup"
            " (docs/operator-guide.md#directory-and-keys)"
        ) from None


def load_hub_key(data_dir: Path) -> HubKey | None:
    """The current hub key, or None when it was not created yet."""
    try:
        return load_key_file(key_path(data_dir))
    except FileNotFoundError:
        return None


def load_hub_keys(data_dir: Path, grace_seconds: float) -> HubKeys | None:
    """The current key with the previous one it was rotated from (when that is still on file)."""
    current = load_hub_key(data_dir)
    if current is None:
        return None
    certifier = current.certifier()
    if certifier is None:
        return HubKeys(current)
    path = archive_path(data_dir, certifier[0])
    try:
        previous = load_key_file(path)
    except FileNotFoundError:
        log.warning(
            "the hub key was rotated from %s, but %s is missing: only the current key signs"
            " (restore the file from the backup)",
            certifier[0],
            path,
        )
        previous = None
    return HubKeys(current, previous, certifier, grace_seconds)


def load_or_create_hub_keys(data_dir: Path, addresses: list[str], grace_seconds: float) -> HubKeys:
    """The hub keys; the first key is created when there is none (see new_key)."""
    if load_hub_key(data_dir) is None:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        path = key_path(data_dir)
        temporary = path.with_name(f".{KEY_FILE}.{os.getpid()}.tmp")
        write_private(temporary, new_key(addresses))
        try:
            os.link(temporary, path)  # fails if another process created the key meanwhile
        except FileExistsError:
            pass
        finally:
            os.unlink(temporary)
        fsync_dir(path.parent)
    keys = load_hub_keys(data_dir, grace_seconds)
    assert keys is not None, "the key file was made above"
    return keys


class HubKeySource:
    """The server's hub keys, read again when the key file changes (a rotation made by the CLI
    beside the running hub). Safe to call from the event loop and from worker threads."""

    def __init__(self, data_dir: Path, addresses: list[str], grace_seconds: float):
        self.data_dir = Path(data_dir)
        self.grace_seconds = grace_seconds
        self._lock = threading.Lock()
        self._keys = load_or_create_hub_keys(self.data_dir, addresses, grace_seconds)
        self._seen = self._file_state()
        self._problem: str | None = None  # logged once, not at every look

    def _file_state(self):
        st = os.stat(key_path(self.data_dir))
        return st.st_ino, st.st_mtime_ns, st.st_size

    def get(self) -> HubKeys:
        with self._lock:
            try:
                state = self._file_state()
                if state != self._seen:
                    self._keys = load_hub_keys(self.data_dir, self.grace_seconds) or self._keys
                    self._seen = state
                    log.info("directory signing key %s (reloaded)", self._keys.fingerprint)
                self._problem = None
            except (OSError, DirectoryError) as exc:  # keep signing with the keys in hand
                if str(exc) != self._problem:
                    log.error("hub key file unreadable, still signing with %s: %s", self._keys.fingerprint, exc)
                self._problem = str(exc)
            return self._keys


def new_key(addresses: list[str]) -> HubKey:
    """A signing key with a user ID "DICOM Mail Hub directory <address>" per directory address (one
    per local domain, the first primary: a Web Key Directory client wants the address it asked for)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        key = pgpy.PGPKey.new(PubKeyAlgorithm.RSAEncryptOrSign, _KEY_BITS)
        sign_with_one_key_object(key)  # its user IDs' self-signatures too
        for number, address in enumerate(addresses):
            key.add_uid(
                pgpy.PGPUID.new("DICOM Mail Hub directory", email=address),
                primary=number == 0,
                usage={KeyFlags.Sign, KeyFlags.Certify},
                hashes=[HashAlgorithm.SHA256, HashAlgorithm.SHA512],
                ciphers=[SymmetricKeyAlgorithm.AES256],
                compression=[CompressionAlgorithm.Uncompressed],
            )
    return HubKey(key)


def write_private(path: Path, key: HubKey, owner: tuple[int, int] | None = None) -> None:
    """Write the private key to `path` (mode 0600, owned by `owner` if given) and flush it to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with open(fd, "wb") as f:
        if owner is not None and os.geteuid() == 0:
            os.fchown(fd, *owner)
        f.write(key.private_armored().encode())
        f.flush()
        os.fsync(fd)


def _utc(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)
