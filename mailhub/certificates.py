# What the hub's TLS certificate says (for `mailhub check`, the reload log line): subject, end of
# validity, fingerprint, whether the key belongs to it. Reads the PEM files with `cryptography`
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


def key_matches(cert_path: Path, key_path: Path) -> bool:
    """Whether the private key in key_path is the one of the certificate's public key; ValueError
    with one line when either file cannot be read."""
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    except OSError as exc:
        raise ValueError(f"cannot read {exc.filename}: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise ValueError(f"{key_path} holds no unencrypted PEM private key") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return bool(cert.public_key().public_bytes(der, public) == key.public_key().public_bytes(der, public))


def problems(cert_path: Path, key_path: Path, now: datetime.datetime) -> list[str]:
    """What `mailhub check` reports about the certificate: expired, not valid yet, expiring within
    EXPIRY_WARNING_DAYS, a key that is not its key, a file that cannot be read."""
    try:
        cert = read_certificate(cert_path)
    except ValueError as exc:
        return [f"tls.cert_file: {exc}"]
    found = []
    if cert.not_after <= now:
        found.append(f"tls.cert_file: the certificate ({cert.subject}) expired on {cert.not_after:%Y-%m-%d %H:%M} UTC")
    elif cert.not_after - now <= datetime.timedelta(days=EXPIRY_WARNING_DAYS):
        days = (cert.not_after - now).total_seconds() / 86400
        found.append(
            f"tls.cert_file: the certificate ({cert.subject}) expires in {days:.0f} day(s), on "
            f"{cert.not_after:%Y-%m-%d %H:%M} UTC; renew it, then: mailhub reload"
        )
    if cert.not_before > now:
        found.append(f"tls.cert_file: the certificate is valid only from {cert.not_before:%Y-%m-%d %H:%M} UTC")
    try:
        if not key_matches(cert_path, key_path):
            found.append(f"tls.key_file: {key_path} is not the key of the certificate in {cert_path}")
    except ValueError as exc:
        found.append(f"tls.key_file: {exc}")
    return found
