# mailhub-loadtest: a network load generator for SMTP + POP3/IMAP mail servers with end-to-end
# integrity checks (decrypt, SHA-256 of every DICOM file), JSON results and an HTML report.
# It must never target anything but loopback addresses unless an operator names the host, and
# it must never modify a server's data itself (the tests do that, behind its back).
from .profile import Profile, ProfileError, load_profile

__all__ = ["Profile", "ProfileError", "load_profile"]
