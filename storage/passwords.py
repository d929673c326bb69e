# Password hashing for site logins: salted scrypt, stored as one self-describing string.
# Must never log or store a password in the clear.
import base64
import hashlib
import hmac
import os

_N, _R, _P = 2**14, 8, 1


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, n: int = _N) -> str:
    """The stored form of `password`. `n`: scrypt's cost, which the stored string carries for
    verify_password; only the tests' prepared sites take a lower one (a login costs 45 ms of CPU)."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=_R, p=_P, dklen=32)
    return f"scrypt${n}${_R}${_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(
            password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p), dklen=len(expected)
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def unmatchable_hash(parameters: str = f"{_N}${_R}${_P}") -> str:
    """A stored form that no password matches, checked at scrypt's `parameters` ("N$r$p"): what a
    login with an unknown name is checked against, to take as long as one with a known name."""
    return f"scrypt${parameters}$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="


def parameters_of(stored: str) -> str | None:
    """The "N$r$p" of a stored form; None for one of another scheme (or damaged)."""
    scheme, _, rest = stored.partition("$")
    parameters = rest.split("$")[:3]
    return "$".join(parameters) if scheme == "scrypt" and len(parameters) == 3 else None
