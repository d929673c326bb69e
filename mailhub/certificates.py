# What the hub's TLS certificate says (for `mailhub check`, the reload log line): subject, period of
# validity, fingerprint. Reads the PEM files with `cryptography`
# (which pgpy needs too). Must never: print or log the private key, or fail with a traceback on a
# file that is not a certificate (ValueError with one line instead).
import datetime
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

EXPIRY_WARNING_DAYS = 30


@dataclass(frozen=True)
class Certificate:
    subject: str
    not_before: datetime.datetime
    not_after: datetime.datetime
    sha256: str  # of the DER certificate, hex

    def text(self) -> str:
        return f"{self.subject}, valid until {self.not_after:%Y-%m-%d %H:%M} UTC, SHA-256 {self.sha256[:16]}"


def read_certificate(path: Path) -> Certificate:
    """The first certificate of a PEM chain file (the hub's own); ValueError with one line."""
    try:
        data = Path(path).read_bytes()
        cert = x509.load_pem_x509_certificate(data)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError:
        raise ValueError(f"{path} holds no PEM certificate") from None
    return Certificate(
        subject=cert.subject.rfc4514_string() or "(empty subject)",
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        sha256=hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
    )


def problems(cert_path: Path, now: datetime.datetime) -> list[tuple[bool, str]]:
    """What `mailhub check` reports about the certificate: expired, not valid yet, expiring within
    EXPIRY_WARNING_DAYS, a file that cannot be read. (A key that is not the certificate's is found
    by loading both, as the hub does: mailhub.hub.tls_context.) Each is (fatal, one line): only
    expiring soon is not fatal."""
    try:
        cert = read_certificate(cert_path)
    except ValueError as exc:
        return [(True, f"tls.cert_file: {exc}")]
    found = []
    if cert.not_after <= now:
        found.append(
            (True, f"tls.cert_file: the certificate ({cert.subject}) expired on {cert.not_after:%Y-%m-%d %H:%M} UTC")
        )
    elif cert.not_after - now <= datetime.timedelta(days=EXPIRY_WARNING_DAYS):
        days = (cert.not_after - now).total_seconds() / 86400
        found.append(
            (
                False,
                f"tls.cert_file: the certificate ({cert.subject}) expires in {days:.0f} day(s), on "
                f"{cert.not_after:%Y-%m-%d %H:%M} UTC; renew it, then: mailhub reload",
            )
        )
    if cert.not_before > now:
        found.append((True, f"tls.cert_file: the certificate is valid only from {cert.not_before:%Y-%m-%d %H:%M} UTC"))
    return found
