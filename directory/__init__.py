# The participant directory and the encryption policy: sites' OpenPGP keys, the hub's signing key
# (its rotation and publication), the signed participant list served by mail, and the policy that
# says which recipient sites are under the encryption policy with which keys (the check itself is
# relay.policy.encryption).
from .document import read_document, to_json, to_text
from .errors import DirectoryError
from .hub_key import HubKey, HubKeys, HubKeySource, load_hub_key, load_hub_keys, load_or_create_hub_keys
from .hub_key_rotation import clean_leftovers, rotate_hub_key
from .keys import KeyRing, SiteKey, import_key, parse_public_key, set_policy, site_keys
from .mailer import DirectoryMailer, directory_mail
from .policy import RecipientKeys, recipients_under_policy
from .wkd import wkd_hash, wkd_paths

__all__ = [
    "DirectoryError",
    "DirectoryMailer",
    "HubKey",
    "HubKeySource",
    "HubKeys",
    "KeyRing",
    "RecipientKeys",
    "SiteKey",
    "clean_leftovers",
    "directory_mail",
    "import_key",
    "load_hub_key",
    "load_hub_keys",
    "load_or_create_hub_keys",
    "parse_public_key",
    "read_document",
    "recipients_under_policy",
    "rotate_hub_key",
    "set_policy",
    "site_keys",
    "to_json",
    "to_text",
    "wkd_hash",
    "wkd_paths",
]
