# Sites' OpenPGP public keys in the index: import (the previous key is retired and stays valid for
# encryption during a grace period), listing, the per-site encryption policy override, and the
# server's in-memory copy reloaded when the CLI changes any of them. Only public keys are stored;
# a private key given by mistake is refused, never written.
import sqlite3
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from storage import directory_index, sql
from storage.index_watch import IndexWatcher
from storage.sites import get_site

with warnings.catch_warnings():  # pgpy 0.6 imports the deprecated imghdr module
    warnings.simplefilter("ignore", DeprecationWarning)
    import pgpy
    from pgpy.constants import KeyFlags, PubKeyAlgorithm

from .errors import DirectoryError

_RELOAD_SECONDS = 0.5
_ENCRYPTING_ALGORITHMS = {
    PubKeyAlgorithm.RSAEncryptOrSign,
    PubKeyAlgorithm.RSAEncrypt,
    PubKeyAlgorithm.ElGamal,
    PubKeyAlgorithm.ECDH,
}


@dataclass(frozen=True)
class ParsedKey:
    fingerprint: str  # 40 hex digits, upper case
    encryption_key_ids: tuple[str, ...]  # 16 hex digits each, upper case
    armored: str
    user_ids: tuple[str, ...]


@dataclass(frozen=True)
class SiteKey:
    fingerprint: str
    encryption_key_ids: tuple[str, ...]
    armored: str
    imported_at: float
    retired_at: float | None  # None: the site's current key

    def usable(self, now: float, grace_seconds: float) -> bool:
        """Mails may be encrypted to it: the current key, or a previous one within the grace period."""
        return self.retired_at is None or now < self.retired_at + grace_seconds


def load_pgpy_key(data: bytes):
    """A pgpy key from armored or binary data (DirectoryError if it is none)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            key, loaded = pgpy.PGPKey.from_blob(
                data if b"-----BEGIN PGP" not in data[:4096] else data.decode("ascii", "replace")
            )
        except Exception as exc:  # pgpy raises ValueError, PGPError, NotImplementedError, ...
            raise DirectoryError(f"not an OpenPGP key: {exc}") from None
    if len(loaded) > 1:
        raise DirectoryError(
            f"{len(loaded)} keys given where one is needed; export only the site's key"
            " (gpg --armor --export FINGERPRINT)"
        )
    return key


def parse_public_key(data: bytes) -> ParsedKey:
    key = load_pgpy_key(data)
    if not key.is_public:
        raise DirectoryError("this is a private key; export and import the public key only (gpg --armor --export NAME)")
    ids = tuple(k.fingerprint.keyid.upper() for k in (key, *key.subkeys.values()) if _can_encrypt(k))
    if not ids:
        raise DirectoryError(f"key {key.fingerprint} has no usable encryption key (add an encryption subkey)")
    armored = data.decode("ascii") if data.lstrip().startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK") else str(key)
    return ParsedKey(
        str(key.fingerprint).replace(" ", "").upper(),
        ids,
        armored.replace("\r\n", "\n"),
        tuple(str(uid.userid) for uid in key.userids),
    )


def _can_encrypt(key) -> bool:
    if key.is_expired:
        return False
    flags = key._get_key_flags()  # the self-signature's (or binding signature's) key flags
    if flags:
        return bool(flags & {KeyFlags.EncryptCommunications, KeyFlags.EncryptStorage})
    return key.key_algorithm in _ENCRYPTING_ALGORITHMS


def import_key(conn: sqlite3.Connection, site_name: str, data: bytes, now: float | None = None) -> ParsedKey:
    """Make the key the site's current one; the current key becomes the previous one."""
    parsed = parse_public_key(data)
    now = time.time() if now is None else now
    if not directory_index.replace_site_key(
        conn, site_name, parsed.fingerprint, " ".join(parsed.encryption_key_ids), parsed.armored, now
    ):
        raise DirectoryError(f"key {parsed.fingerprint} is already the current key of site {site_name}")
    return parsed


def site_keys(conn: sqlite3.Connection, site_id: int) -> list[SiteKey]:
    """The site's keys, current first, then the previous ones, newest first."""
    return [_key(row) for row in directory_index.site_key_rows(conn, site_id)]


def _key(row) -> SiteKey:
    fingerprint, ids, armored, imported_at, retired_at = row
    return SiteKey(fingerprint, tuple(ids.split()), armored, imported_at, retired_at)


POLICY_CHOICES = ("on", "off", "default")


def set_policy(conn: sql.Connection, site_name: str, encryption: str) -> None:
    """Override the hub's encryption policy for one site ('on', 'off'), or follow it ('default')."""
    if encryption not in POLICY_CHOICES:
        raise DirectoryError(f"encryption policy must be one of {', '.join(POLICY_CHOICES)}")
    site = get_site(conn, site_name)
    directory_index.set_policy_override(conn, site.id, None if encryption == "default" else encryption)


class KeyRing:
    """The server's view of every site's keys and policy overrides: loaded at construction, then
    reloaded by a thread (storage.index_watch) when keys_version moves, checked every
    _RELOAD_SECONDS, so that the SMTP path reads memory only and SQLite never blocks the event loop."""

    def __init__(self, data_dir: Path, connect: Callable[[], sql.Connection] | None = None):
        """`connect`: the watcher's connections (default: the data folder's SQLite index)."""
        self._state: tuple[dict[int, list[SiteKey]], dict[int, str]] = ({}, {})  # keys, policy overrides
        self._watcher = IndexWatcher(
            data_dir, "site keys", directory_index.keys_version, self._load, _RELOAD_SECONDS, connect
        )

    def close(self) -> None:
        self._watcher.close()

    def _load(self, conn: sql.Connection) -> None:
        keys = {
            site_id: [_key(row) for row in rows] for site_id, rows in directory_index.all_site_key_rows(conn).items()
        }
        self._state = (keys, directory_index.policy_overrides(conn))  # one assignment: readers see both or neither

    def keys(self, site_id: int) -> list[SiteKey]:
        return self._state[0].get(site_id, [])

    def encryption_required(self, site_id: int, hub_default: bool) -> bool:
        override = self._state[1].get(site_id)
        return hub_default if override is None else override == "on"
