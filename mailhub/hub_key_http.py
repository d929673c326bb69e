# The hub's public key on the HTTP port (beside /metrics and /healthz): armored at /hub-key.asc,
# and in OpenPGP Web Key Directory form for the directory address (binary key under
# /.well-known/openpgpkey/[DOMAIN/]hu/<hash>, with an empty policy file), so that a gateway can
# fetch it with `gpg --fetch-keys` or any WKD client. Only public keys are ever served.
# Must never: serve anything but the published public keys, or block the event loop for long
# (the keys are armored once per change; a lookup is a dict access and one stat()).
from collections.abc import Sequence

from directory import HubKeySource, wkd_paths

ARMORED_PATH = "/hub-key.asc"


class HubKeyRoutes:
    def __init__(self, source: HubKeySource, local_part: str, domains: Sequence[str]):
        self.source = source
        self.key_paths, self.policy_paths = wkd_paths(local_part, domains)

    def route(self, path: str) -> tuple[str, str, bytes] | None:
        """(status, content type, body) for a key path, None for any other path."""
        if path == ARMORED_PATH:
            return "200 OK", "application/pgp-keys", self.source.get().published()[0].encode("ascii")
        if path in self.key_paths:
            return "200 OK", "application/octet-stream", self.source.get().published()[1]
        if path in self.policy_paths:
            return "200 OK", "text/plain", b""
        return None
