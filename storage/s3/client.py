# An asyncio client for S3-compatible object stores (AWS S3, Ceph RGW, SeaweedFS, MinIO): PUT of a
# stream (multipart above the part size), GET streamed to a sink or a file, HEAD, DELETE, listing
# by prefix (paged), the multipart uploads left pending, and bucket creation (tests, first setup).
#
# Payload signing: every request body is at most one part, which is held in memory anyway (its
# length must be known before it is sent), so its SHA-256 is computed and signed
# (x-amz-content-sha256): the store checks the bytes it got against the signature, over plain HTTP
# as well, with neither UNSIGNED-PAYLOAD (no integrity check) nor the aws-chunked streaming
# signature (a signature per 64 KB chunk, more code and more requests' worth of HMACs) needed.
# Memory: an upload holds at most two parts (the one being sent and the next being read); a
# download holds one slice (storage/s3/http.py SLICE). A failed multipart upload is aborted, so no
# orphan parts stay behind. Must never log or put into a message the secret key.
import asyncio
import datetime
import hashlib
import os
import re
import ssl
import time
import xml.etree.ElementTree as ET
import xml.parsers.expat
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from . import sigv4
from .errors import S3Error, printable
from .http import SLICE, Endpoint, Response, exchange, is_number

Reader = Callable[[int], Awaitable[bytes]]  # read(n): up to n bytes, b"" at the end
MIN_PART = 5 * 1024 * 1024  # S3's smallest part (all but the last)
MAX_PARTS = 10_000
MAX_ERROR_BODY = 64 * 1024
MAX_PREFIX = 900  # bytes of an s3:// URL's prefix: room for the names under it in S3's 1024-byte keys
MAX_XML = 4 * 1024 * 1024  # a list page of 1000 keys of 1 KB each, with room
_NAMESPACE = re.compile(r"^\{[^}]*\}")


@dataclass(frozen=True)
class S3Settings:
    endpoint: str  # http(s)://host[:port]
    region: str
    credentials: sigv4.Credentials
    part_size: int = 8 * 1024 * 1024
    addressing: str = "path"  # "path": http://host/bucket/key; "virtual": http://bucket.host/key
    timeout: float = 30.0
    attempts: int = 3  # tries of a request that failed in passing (5xx, 429, connection, timeout)
    backoff: float = 0.5  # seconds before the second try, doubled before each next one

    def __post_init__(self) -> None:
        Endpoint.parse(self.endpoint)
        if self.attempts < 1:
            raise ValueError("attempts: at least 1")
        if self.part_size < MIN_PART:
            raise ValueError(f"part size {self.part_size} is below S3's minimum of 5 MiB")
        if self.addressing not in ("path", "virtual"):
            raise ValueError(f"addressing: expected path or virtual, got {self.addressing!r}")


@dataclass(frozen=True)
class S3Location:
    """s3://bucket/prefix: where a backup goes. The prefix has no leading or trailing slash."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> "S3Location":
        if not url.startswith("s3://"):
            raise ValueError(f"expected s3://BUCKET/PREFIX, got {url!r}")
        bucket, _, prefix = url[5:].partition("/")
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
            raise ValueError(f"not a bucket name (3-63 of a-z 0-9 . -): {bucket!r}")
        prefix = prefix.strip("/")
        if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
            raise ValueError(f"the prefix {prefix!r} has an empty, '.' or '..' part")
        if any(ord(c) < 32 or ord(c) == 127 for c in prefix):  # (a listing's XML cannot carry most)
            raise ValueError(f"the prefix {prefix!r} has a control character")
        if len(prefix.encode("utf-8", "surrogatepass")) > MAX_PREFIX:
            raise ValueError(f"the prefix is longer than {MAX_PREFIX} bytes (an S3 key ends at 1024)")
        return cls(bucket, prefix)

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str = ""
    modified: float | None = None  # when the store took it (a listing's LastModified), if known


@dataclass
class PutResult:
    key: str
    size: int
    etag: str
    parts: int  # 0: one PUT
    sha256: str = ""  # of the whole object


@dataclass
class _Part:
    """A part read from the source: its chunks as read (no copy into one buffer, so no growing
    buffer's reallocations), and whether the source ended within it."""

    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    eof: bool = False


class S3Client:
    """One object store's client. Stateless between calls (one connection per request): use it
    from one event loop, several calls at a time if wanted."""

    def __init__(self, settings: S3Settings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.endpoint = Endpoint.parse(settings.endpoint)
        self._clock = clock
        self._tls = ssl.create_default_context() if self.endpoint.scheme == "https" else None

    # -- objects --------------------------------------------------------------------------------

    async def put(self, bucket: str, key: str, read: Reader) -> PutResult:
        """Store what `read` gives under `key`: one PUT when it fits in one part, else a multipart
        upload (aborted on any failure, the caller's error raised)."""
        whole = hashlib.sha256()
        first = await self._fill(read, whole)
        if first.eof:
            etag = await self._put_one(bucket, key, first.chunks)
            return PutResult(key, first.size, etag, 0, whole.hexdigest())
        upload_id = await self._create_upload(bucket, key)
        handed = [first]  # handed over, not kept here: a part is freed once it is sent
        del first
        try:
            etags, size = await self._upload_parts(bucket, key, upload_id, handed, read, whole)
            etag = await self._complete(bucket, key, upload_id, etags, size)
        except BaseException as exc:
            await self._abort_quietly(bucket, key, upload_id, exc)
            raise
        return PutResult(key, size, etag, len(etags), whole.hexdigest())

    async def put_file(self, bucket: str, key: str, path: str | os.PathLike[str]) -> PutResult:
        with open(path, "rb") as f:

            async def read(n: int) -> bytes:
                return f.read(n)

            return await self.put(bucket, key, read)

    async def get(self, bucket: str, key: str, sink: Callable[[bytes], Awaitable[None]]) -> int:
        """Hand the object's bytes to `sink` in slices; the number of bytes."""
        response = await self._call("GET", bucket, key)
        return await response.stream(sink)

    async def get_file(
        self, bucket: str, key: str, path: str | os.PathLike[str], limit: int | None = None
    ) -> tuple[int, str]:
        """Write the object into a new file at `path` (fsynced); (its size, its SHA-256 hex). A
        failed download leaves no file. `limit`: the most bytes taken (a store sending more, e.g. an
        endless chunked answer, fails with code "too_large" instead of filling the disk). A download
        cut off in passing (a broken connection, a timeout) starts again from the beginning, up to
        settings.attempts times in all: one reset does not end a restore of many files."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for attempt in range(1, self.settings.attempts + 1):
                digest = hashlib.sha256()
                written = 0
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)

                async def sink(data: bytes) -> None:
                    nonlocal written
                    written += len(data)
                    if limit is not None and written > limit:
                        raise S3Error(
                            f"GET s3://{bucket}/{key}: the object is larger than {limit} bytes", 200, "too_large"
                        )
                    digest.update(data)
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]

                try:
                    size = await self.get(bucket, key, sink)
                    break
                except S3Error as exc:
                    if exc.code not in ("connection", "timeout") or attempt == self.settings.attempts:
                        raise
                await asyncio.sleep(self.settings.backoff * 2 ** (attempt - 1))
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        return size, digest.hexdigest()

    async def head(self, bucket: str, key: str) -> ObjectInfo | None:
        """The object's size and ETag, or None when there is no such object."""
        try:
            response = await self._call("HEAD", bucket, key)
        except S3Error as exc:
            if exc.status == 404 and exc.code in ("NoSuchKey", "NotFound", ""):
                return None
            raise
        response.close()
        return ObjectInfo(key, _int_field(response, "content-length"), response.headers.get("etag", "").strip('"'))

    async def delete(self, bucket: str, key: str) -> None:
        response = await self._call("DELETE", bucket, key)
        await response.read_body(MAX_ERROR_BODY)

    async def list_objects(self, bucket: str, prefix: str = "", page_size: int = 1000) -> AsyncIterator[ObjectInfo]:
        """Every object whose key starts with `prefix`, in key order, a page at a time."""
        token = ""
        while True:
            query = [("list-type", "2"), ("prefix", prefix), ("max-keys", str(page_size))]
            if token:
                query.append(("continuation-token", token))
            root = await self._xml("GET", bucket, "", query)
            for item in _children(root, "Contents"):
                yield ObjectInfo(
                    _text(item, "Key"),
                    _int_text(item, "Size"),
                    _text(item, "ETag").strip('"'),
                    _time_text(item, "LastModified"),
                )
            previous, token = token, _text(root, "NextContinuationToken")
            if _text(root, "IsTruncated").lower() != "true":
                return
            if not token:
                raise S3Error(f"LIST s3://{bucket}/{prefix}: a truncated page without a continuation token")
            if token == previous:  # the same page again and again: a loop for ever
                raise S3Error(f"LIST s3://{bucket}/{prefix}: the store gave the same continuation token twice")

    async def pending_uploads(self, bucket: str, prefix: str = "") -> list[tuple[str, str]]:
        """(key, upload id) of the multipart uploads begun and neither completed nor aborted."""
        found: list[tuple[str, str]] = []
        key_marker = upload_marker = ""
        while True:
            query = [("uploads", ""), ("prefix", prefix)]
            if key_marker:
                query += [("key-marker", key_marker), ("upload-id-marker", upload_marker)]
            root = await self._xml("GET", bucket, "", query)
            found += [(_text(u, "Key"), _text(u, "UploadId")) for u in _children(root, "Upload")]
            if _text(root, "IsTruncated").lower() != "true":
                return found
            markers = (key_marker, upload_marker)
            key_marker, upload_marker = _text(root, "NextKeyMarker"), _text(root, "NextUploadIdMarker")
            if not key_marker:
                return found
            if (key_marker, upload_marker) == markers:  # the same page again: a loop (and a list) for ever
                raise S3Error(f"LIST s3://{bucket}/{prefix}?uploads: the store gave the same markers twice")

    async def abort_upload(self, bucket: str, key: str, upload_id: str) -> None:
        """Abort a pending multipart upload (its parts are freed)."""
        response = await self._call("DELETE", bucket, key, [("uploadId", upload_id)])
        await response.read_body(MAX_ERROR_BODY)

    async def create_bucket(self, bucket: str) -> None:
        body = b""
        if self.settings.region != "us-east-1":
            body = (
                '<CreateBucketConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                f"<LocationConstraint>{self.settings.region}</LocationConstraint></CreateBucketConfiguration>"
            ).encode()
        response = await self._call("PUT", bucket, "", body=body)
        await response.read_body(MAX_ERROR_BODY)

    # -- multipart ------------------------------------------------------------------------------

    async def _fill(self, read: Reader, whole: "hashlib._Hash") -> _Part:
        part = _Part()
        size = self.settings.part_size
        while part.size < size:
            chunk = await read(min(SLICE * 4, size - part.size))
            if not chunk:
                part.eof = True
                break
            whole.update(chunk)
            part.chunks.append(chunk)
            part.size += len(chunk)
        return part

    async def _upload_parts(
        self, bucket: str, key: str, upload_id: str, handed: list[_Part], read: Reader, whole: "hashlib._Hash"
    ) -> tuple[list[str], int]:
        """Send the parts, reading the next one while one is sent: two parts in memory at most."""
        etags: list[str] = []
        size = 0
        current: _Part | None = handed.pop()
        while current is not None:
            if len(etags) >= MAX_PARTS:
                raise S3Error(f"PUT s3://{bucket}/{key}: more than {MAX_PARTS} parts: raise s3.part_size")
            number = len(etags) + 1
            sending = asyncio.ensure_future(self._put_part(bucket, key, upload_id, number, current.chunks))
            try:
                following = None if current.eof else await self._fill(read, whole)  # the 2nd part in memory
                etags.append(await sending)
            except BaseException:
                sending.cancel()
                await asyncio.gather(sending, return_exceptions=True)
                raise
            size += current.size
            # done after a short part, or when the source ended exactly at a part's end
            current = following if following is not None and following.size else None
        return etags, size

    async def _put_part(self, bucket: str, key: str, upload_id: str, number: int, data: list[bytes]) -> str:
        response = await self._call(
            "PUT", bucket, key, [("partNumber", str(number)), ("uploadId", upload_id)], body=data
        )
        response.close()
        etag = response.headers.get("etag", "")
        if not etag:
            raise S3Error(f"PUT s3://{bucket}/{key} part {number}: the store gave no ETag", response.status, "protocol")
        return etag

    async def _put_one(self, bucket: str, key: str, data: list[bytes]) -> str:
        response = await self._call("PUT", bucket, key, body=data)
        response.close()
        return response.headers.get("etag", "").strip('"')

    async def _create_upload(self, bucket: str, key: str) -> str:
        root = await self._xml("POST", bucket, key, [("uploads", "")])
        upload_id = _text(root, "UploadId")
        if not upload_id:
            raise S3Error(f"POST s3://{bucket}/{key}?uploads: no UploadId in the answer", 200, "protocol")
        return upload_id

    async def _complete(self, bucket: str, key: str, upload_id: str, etags: list[str], size: int) -> str:
        """Complete the upload. A failure in passing (5xx, 429, InternalError or SlowDown in a 200's
        body, a broken connection, a timeout) is tried again like other requests: the parts are
        all there, and the whole upload should not be lost at its last step. When a try after a
        lost answer finds the upload gone (NoSuchUpload), the earlier try completed it: the object
        of the expected size is the proof, else the error stands."""
        body = "<CompleteMultipartUpload>" + "".join(
            f"<Part><PartNumber>{n}</PartNumber><ETag>{_escape(etag)}</ETag></Part>" for n, etag in enumerate(etags, 1)
        )
        body += "</CompleteMultipartUpload>"
        for attempt in range(1, self.settings.attempts + 1):
            try:
                # S3 may answer 200 and still fail (an <Error> body): _xml raises for that too.
                root = await self._xml("POST", bucket, key, [("uploadId", upload_id)], body.encode())
                return _text(root, "ETag").strip('"')
            except S3Error as exc:
                if exc.code == "NoSuchUpload" and attempt > 1:
                    found = await self.head(bucket, key)
                    if found is not None and found.size == size:
                        return found.etag
                    raise
                transient = (
                    exc.status >= 500
                    or exc.status == 429
                    or exc.code in ("connection", "timeout", "InternalError", "SlowDown")
                )
                if not transient or attempt == self.settings.attempts:
                    raise
            await asyncio.sleep(self.settings.backoff * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    async def _abort_quietly(self, bucket: str, key: str, upload_id: str, cause: BaseException) -> None:
        """Abort the upload so that its parts are freed. Runs even when the caller was cancelled;
        its own failure is added to the cause's notes (the cause is what the caller sees)."""
        try:
            response = await asyncio.shield(self._call("DELETE", bucket, key, [("uploadId", upload_id)]))
            response.close()
        except (S3Error, asyncio.CancelledError) as exc:
            cause.add_note(
                f"aborting the multipart upload {upload_id} failed too ({exc}); it holds parts until it is"
                " aborted (e.g. `aws s3api abort-multipart-upload`) or the bucket's lifecycle rule"
                " AbortIncompleteMultipartUpload removes it"
            )

    # -- requests -------------------------------------------------------------------------------

    def _where(self, bucket: str, key: str) -> tuple[str, str]:
        """(host to connect to and sign, encoded path) of an object or bucket (key "")."""
        host = self.endpoint.host
        path = self.endpoint.base_path
        if self.settings.addressing == "virtual":
            host = f"{bucket}.{host}"
        else:
            path += f"/{bucket}"
        path += "/" + sigv4.uri_encode(key, encode_slash=False) if key else ("" if path else "/")
        return host, path or "/"

    async def _call(
        self,
        method: str,
        bucket: str,
        key: str,
        query: list[tuple[str, str]] | None = None,
        body: bytes | list[bytes] = b"",
    ) -> Response:
        """One signed request; the answer when its status is 2xx, else S3Error with the S3 code. A
        failure in passing (a 5xx or 429 answer, a broken connection, a timeout) is tried again after
        a pause, up to settings.attempts times, except a POST (creating an upload twice would leave
        one behind; completing one is tried again by _complete, which knows what a second try's
        NoSuchUpload means): the body is in memory, so sending
        it again is safe, and a GET is retried only until its answer's head has come."""
        query = query or []
        what = f"{method} s3://{bucket}/{key}"
        chunks = [body] if isinstance(body, bytes) else body
        digest = hashlib.sha256()
        for chunk in chunks:
            digest.update(chunk)
        attempts = 1 if method == "POST" else self.settings.attempts
        for attempt in range(1, attempts + 1):
            try:
                return await self._send(method, bucket, key, query, chunks, digest.hexdigest(), what)
            except S3Error as exc:
                transient = exc.status >= 500 or exc.status == 429 or exc.code in ("connection", "timeout")
                if not transient or attempt == attempts:
                    if attempt == 1:
                        raise
                    raise S3Error(f"{exc} (tried {attempt} times)", exc.status, exc.code) from None
            await asyncio.sleep(self.settings.backoff * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    async def _send(
        self,
        method: str,
        bucket: str,
        key: str,
        query: list[tuple[str, str]],
        chunks: list[bytes],
        payload_hash: str,
        what: str,
    ) -> Response:
        host, path = self._where(bucket, key)
        headers = sigv4.sign(
            self.settings.credentials,
            self.settings.region,
            method,
            path,
            query,
            {"host": self.endpoint.host_header(host)},
            payload_hash,
            self._clock(),
        )
        canonical = sigv4.canonical_query(query)
        target = path + ("?" + canonical if canonical else "")
        response = await exchange(
            self.endpoint, host, method, target, headers, chunks, self.settings.timeout, what, self._tls
        )
        if 200 <= response.status < 300:
            return response
        raw = b"" if method == "HEAD" else await response.read_body(MAX_ERROR_BODY)
        response.close()
        raise _status_error(
            what, response.status, response.reason, raw, response.headers.get("x-amz-bucket-region", "")
        )

    async def _xml(
        self, method: str, bucket: str, key: str, query: list[tuple[str, str]], body: bytes = b""
    ) -> ET.Element:
        response = await self._call(method, bucket, key, query, body)
        what = f"{method} s3://{bucket}/{key}"
        raw = await response.read_body(MAX_XML)
        root = _parse_xml(raw, what, response.status)
        if _local(root.tag) == "Error":
            raise _status_error(what, response.status, response.reason, raw)
        return root


def _status_error(what: str, status: int, reason: str, raw: bytes, region: str = "") -> S3Error:
    code, message = "", ""
    if raw:
        try:
            root = _parse_xml(raw, what, status)
            code, message = _text(root, "Code"), _text(root, "Message")
        except S3Error as exc:  # not S3's XML (a proxy's page?): its start, unless it declares entities
            message = (
                "an answer declaring a DTD, not read" if exc.code == "dtd" else raw[:120].decode("utf-8", "replace")
            )
    if not code:
        code = {301: "PermanentRedirect", 403: "AccessDenied", 404: "NotFound"}.get(status, "")
    hint = {
        "SignatureDoesNotMatch": " (check the secret key)",
        "InvalidAccessKeyId": " (check the access key)",
        "AccessDenied": " (check the keys and the bucket's permissions)",
        "NoSuchBucket": " (create the bucket first)",
        # AWS: a bucket of another region, or a request signed for the wrong one
        "PermanentRedirect": " (the bucket is in another region: set s3.region and s3.endpoint to that region's)",
        "AuthorizationHeaderMalformed": " (check s3.region: the store says which region it expects)",
        "RequestTimeTooSkewed": " (this machine's clock is off by more than 15 minutes: check its time sync)",
    }.get(code, "")
    detail = f": {printable(message)}" if message else ""
    if region:  # AWS says where the bucket is
        detail += f" (the bucket's region: {printable(region, 40)})"
    return S3Error(f"{what}: HTTP {status} {printable(code or reason, 60)}{detail}{hint}", status, code)


class _Declared(Exception):
    pass


def _declares_dtd(raw: bytes) -> bool:
    """Whether the document has a DOCTYPE (and so maybe entities), in whatever encoding it declares
    (a search of the bytes for "<!ENTITY" misses a UTF-16 document): expat stops at the first sign."""

    def found(*_args: object) -> None:
        raise _Declared

    parser = xml.parsers.expat.ParserCreate()
    parser.StartDoctypeDeclHandler = found
    parser.EntityDeclHandler = found
    try:
        parser.Parse(raw, True)
    except _Declared:
        return True
    except xml.parsers.expat.ExpatError:
        pass  # not XML: ElementTree says so
    return False


def _parse_xml(raw: bytes, what: str, status: int) -> ET.Element:
    if _declares_dtd(raw):  # no entity expansion from a hostile store
        raise S3Error(f"{what}: the store's answer declares a DTD or entities: refused", status, "dtd")
    try:
        return ET.fromstring(raw)
    except ET.ParseError as exc:
        raise S3Error(f"{what}: the store's answer is not XML ({exc})", status, "protocol") from None


def _local(tag: str) -> str:
    return _NAMESPACE.sub("", tag)


def _children(element: ET.Element, name: str) -> list[ET.Element]:
    return [child for child in element if _local(child.tag) == name]


def _text(element: ET.Element, name: str) -> str:
    for child in element:
        if _local(child.tag) == name:
            return child.text or ""
    return ""


def _int_text(element: ET.Element, name: str) -> int:
    text = _text(element, name)
    if not is_number(text):
        raise S3Error(f"expected a number in <{name}>, got {printable(text, 40)!r}", 0, "protocol")
    return int(text)


def _time_text(element: ET.Element, name: str) -> float | None:
    """An ISO 8601 time of a listing (2026-12-07T03:34:11.000Z) as a Unix time, None if absent or malformed."""
    try:
        when = datetime.datetime.fromisoformat(_text(element, name))
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=datetime.UTC)).timestamp()


def _int_field(response: Response, name: str) -> int:
    value = response.headers.get(name, "")
    if not is_number(value):
        raise S3Error(f"{response.what}: no valid {name} in the answer", response.status, "protocol")
    return int(value)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
