# Which recipient sites of a mail are under the encryption policy, and the encryption key IDs each
# one's mail may be encrypted to (current key, and previous keys within the grace period). The
# check of a mail itself is relay.policy.encryption, which takes these. No I/O beyond the key
# ring's cached reads.
import time
from dataclasses import dataclass

from .keys import KeyRing


@dataclass(frozen=True)
class RecipientKeys:
    """A recipient site under the policy and the encryption key IDs its mail may be encrypted to."""

    site: str
    key_ids: dict[str, str]  # key ID -> how to name it in a reply ("current key" / "previous key ...")

    def expected(self) -> str:
        return " or ".join(f"{key_id} ({label})" for key_id, label in self.key_ids.items())


def recipients_under_policy(sites, keyring: KeyRing, cfg) -> list[RecipientKeys]:
    """The recipient sites of a mail that are under the policy (empty: none is)."""
    now = time.time()
    grace = cfg.directory.key_grace_days * 86400
    recipients = []
    for site in sites:
        if not keyring.encryption_required(site.id, cfg.encryption.required):
            continue
        key_ids: dict[str, str] = {}
        for key in keyring.keys(site.id):
            if key.usable(now, grace):
                label = "current key" if key.retired_at is None else "previous key, in its grace period"
                key_ids.update((key_id, f"{label} {key.fingerprint}") for key_id in key.encryption_key_ids)
        recipients.append(RecipientKeys(site.name, key_ids))
    return recipients
