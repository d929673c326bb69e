# Throw-away TLS certificates for tests, made with `cryptography` (EC P-256 keys: milliseconds each,
# unlike RSA): any validity period (expired, expiring soon, not valid yet), written as PEM files.
import datetime
import hashlib
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def make_certificate(
    cert_path: Path, key_path: Path, name: str = "localhost", valid_from_days: float = -1, valid_days: float = 365
) -> str:
    """A self-signed certificate for `name` valid from now + valid_from_days for valid_days, and
    its key; returns the SHA-256 of the certificate (what a client sees: peer_fingerprint)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = now + datetime.timedelta(days=valid_from_days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=valid_days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    Path(key_path).write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    Path(cert_path).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def any_certificate() -> ssl.SSLContext:
    """A client context that accepts any certificate (the tests compare fingerprints instead)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def peer_fingerprint(sock) -> str:
    """SHA-256 of the certificate the server presented on a TLS socket."""
    return hashlib.sha256(sock.getpeercert(binary_form=True)).hexdigest()
