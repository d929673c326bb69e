# The participant directory and the encryption policy: sites' OpenPGP keys, the hub's signing key,
# the signed participant list served by mail, and the policy that checks PGP/MIME mails as they
# stream (never decrypting anything).
from .document import read_document, to_json, to_text
from .errors import DirectoryError
from .hub_key import HubKey, load_hub_key, load_or_create_hub_key
from .keys import KeyRing, SiteKey, import_key, parse_public_key, set_policy, site_keys
from .mailer import DirectoryMailer, directory_mail
from .policy import EncryptionPolicy, policy_for

__all__ = ["DirectoryError", "DirectoryMailer", "EncryptionPolicy", "HubKey", "KeyRing", "SiteKey", "directory_mail", "import_key",
           "load_hub_key", "load_or_create_hub_key", "parse_public_key", "read_document", "set_policy",
           "policy_for", "site_keys", "to_json", "to_text"]
