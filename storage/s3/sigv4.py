# AWS Signature Version 4 for S3 requests (the Authorization header form), sans-I/O: strings in,
# header values out, the time passed in. Checked against the examples of the S3 API reference
# ("Signature Calculations for the Authorization Header: Transferring Payload in a Single Chunk")
# in tests/test_s3_client.py. Must never do I/O, read the clock itself, or put the secret key (or
# the signing key) into anything but the HMAC: no repr, no message, no log.
import hashlib
import hmac
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~")


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str = field(repr=False)

    def __post_init__(self) -> None:
        if not self.access_key or not self.secret_key:
            raise ValueError("an S3 access key and secret key are both needed")


def uri_encode(text: str, encode_slash: bool = True) -> str:
    """S3's UriEncode: every byte of the UTF-8 form except A-Z a-z 0-9 - _ . ~ as %XX (upper case);
    "/" kept as it is in paths (encode_slash=False)."""
    out = []
    for byte in text.encode("utf-8"):
        if byte in _UNRESERVED or (byte == 0x2F and not encode_slash):
            out.append(chr(byte))
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def canonical_query(params: Iterable[tuple[str, str]]) -> str:
    """Name=value pairs, each part URI-encoded, sorted by name then value; "name=" for a name
    without a value (e.g. ?uploads, ?lifecycle)."""
    encoded = sorted((uri_encode(name), uri_encode(value)) for name, value in params)
    return "&".join(f"{name}={value}" for name, value in encoded)


def amz_date(now: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))


def canonical_request(
    method: str, path: str, query: Iterable[tuple[str, str]], headers: Mapping[str, str], payload_hash: str
) -> tuple[str, str]:
    """(the canonical request, its signed-headers list). `path` is the request's path already
    URI-encoded once (as it goes on the wire: S3 does not encode it again); every header given is
    signed, names lower-cased, values trimmed with inner runs of spaces made one."""
    lowered = {name.lower().strip(): " ".join(value.split()) for name, value in headers.items()}
    names = sorted(lowered)
    header_lines = "".join(f"{name}:{lowered[name]}\n" for name in names)
    signed = ";".join(names)
    text = "\n".join([method.upper(), path or "/", canonical_query(query), header_lines, signed, payload_hash])
    return text, signed


def string_to_sign(stamp: str, scope: str, request: str) -> str:
    return "\n".join([ALGORITHM, stamp, scope, hashlib.sha256(request.encode("utf-8")).hexdigest()])


def signing_key(secret_key: str, day: str, region: str, service: str = "s3") -> bytes:
    key = hmac.new(f"AWS4{secret_key}".encode(), day.encode(), hashlib.sha256).digest()
    for part in (region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def sign(
    credentials: Credentials,
    region: str,
    method: str,
    path: str,
    query: Iterable[tuple[str, str]],
    headers: Mapping[str, str],
    payload_hash: str,
    now: float,
    service: str = "s3",
) -> dict[str, str]:
    """The headers to send: `headers` (which must hold Host) plus x-amz-date, x-amz-content-sha256
    and Authorization. `payload_hash` is the hex SHA-256 of the body (EMPTY_SHA256 for none) or
    UNSIGNED_PAYLOAD."""
    stamp = amz_date(now)
    all_headers = {name.lower(): value for name, value in headers.items()}
    if "host" not in all_headers:
        raise ValueError("the Host header must be signed")
    all_headers.setdefault("x-amz-date", stamp)
    all_headers["x-amz-content-sha256"] = payload_hash
    stamp = all_headers["x-amz-date"]
    scope = f"{stamp[:8]}/{region}/{service}/aws4_request"
    request, signed = canonical_request(method, path, query, all_headers, payload_hash)
    key = signing_key(credentials.secret_key, stamp[:8], region, service)
    signature = hmac.new(key, string_to_sign(stamp, scope, request).encode(), hashlib.sha256).hexdigest()
    all_headers["authorization"] = (
        f"{ALGORITHM} Credential={credentials.access_key}/{scope},SignedHeaders={signed},Signature={signature}"
    )
    return all_headers
