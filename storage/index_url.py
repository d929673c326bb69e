# The PostgreSQL index's URL as text an operator may see: the URL without its password (redacted),
# the passwords it holds (to blank them out of a message libpq wrote), and the check that a value of
# `storage.index` is one (index_url). Plain text functions: imports neither psycopg nor sqlite3.
# Must never return or log a password.
import re
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

_SECRET_PARAMETERS = ("password", "sslpassword")
SCHEMES = ("postgresql", "postgres")


def redacted(url: str) -> str:
    """The URL without a password (in the user part or as a password= parameter). A password that
    holds '/', '?' or '#' not percent-encoded ends the user part early for urlsplit, which would show
    it: such a URL is not shown at all, the text says to percent-encode them."""
    shown = _redacted(url)
    for password in _user_part_passwords(url):
        if any(piece and piece in shown for piece in re.split(r"[/?#]", password)):
            scheme = url.partition("://")[0]
            return f"{scheme}://(a URL whose password holds '/', '?' or '#': percent-encode them, %2F %3F %23)"
    return shown


def _user_part_passwords(url: str) -> list[str]:
    """What may be a password in the URL's user part, however it is read: the text after the first
    ':' of the text before each '@' (a password with '/', '?', '#' or '@' not percent-encoded)."""
    rest = url.partition("://")[2]
    return [rest[:i].partition(":")[2] for i, char in enumerate(rest) if char == "@" and ":" in rest[:i]]


def _redacted(url: str) -> str:
    try:
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")
        if netloc[1]:
            user = netloc[0].partition(":")[0]
            hostport = netloc[2]
            netloc_text = f"{user}@{hostport}" if user else hostport
        else:
            netloc_text = parts.netloc
        query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k.lower() not in _SECRET_PARAMETERS])
        # (not urlunsplit: it drops the "//" of an empty host, postgresql:///db?host=/run/postgresql)
        return f"{parts.scheme}://{netloc_text}{parts.path}" + (f"?{query}" if query else "")
    except ValueError:
        return "(a URL that cannot be parsed)"


def _secrets(url: str) -> list[str]:
    """The passwords in the URL, also in one that urlsplit refuses and libpq may still quote whole in
    its message ("...in IPv6 host address in URI: "postgresql://user:secret@[::1/db""): the user
    part taken by hand, up to the first "@" (as libpq reads it) and up to the last (as urlsplit)."""
    found = []
    try:
        parts = urlsplit(url)
        if parts.password:
            found.append(parts.password)
    except ValueError:
        pass
    authority = url.partition("://")[2].partition("/")[0].partition("?")[0]
    for userinfo in (authority.partition("@")[0], authority.rpartition("@")[0]):
        if ":" in userinfo:
            found.append(userinfo.partition(":")[2])
    found += [v for k, v in parse_qsl(url.partition("?")[2]) if k.lower() in _SECRET_PARAMETERS]
    found += _user_part_passwords(url)
    found += [unquote(secret) for secret in found]
    return sorted({s for s in found if s}, key=len, reverse=True)  # the longest first: no half left


def index_url(value: str) -> str:
    """`value` if it is "" or a postgresql:// URL with a database name; else ValueError with one
    line that shows no password."""
    if value == "":
        return value
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        shown = redacted(value) if sep else "a value that is not a URL"
        raise ValueError(f'expected "" (SQLite in data_dir) or a postgresql://USER@HOST:PORT/DATABASE URL, got {shown}')
    try:
        parts = urlsplit(value)
        # libpq's failover form names several hosts, each with its port: h1:5432,h2:5433
        for host in parts.netloc.rpartition("@")[2].split(","):
            if not host and "," in parts.netloc:
                raise ValueError("an empty host in the list")
            urlsplit(f"//{host}").port  # noqa: B018  (raises ValueError for a port that is not a number)
    except ValueError:
        raise ValueError(f"not a valid URL: {redacted(value)}") from None
    if "\n" in value or any(ch.isspace() for ch in parts.netloc):
        raise ValueError(f"not a valid URL: {redacted(value)}")
    database = parts.path.lstrip("/") or dict(parse_qsl(parts.query)).get("dbname", "")
    if not database:
        raise ValueError(f"the URL names no database (postgresql://USER@HOST/DATABASE): {redacted(value)}")
    return value
