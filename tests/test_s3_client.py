# The S3 client (storage/s3/): the SigV4 signer against the examples of the S3 API reference
# (exact strings), round trips against a real SeaweedFS (the session's `seaweedfs` fixture), a 40 MB
# multipart upload whose memory stays at a few parts, an upload failed or cancelled mid-way that
# leaves no object and no pending upload, and every failure of a store - wrong key, missing bucket,
# refused connection, silence, oversized, chunked or hostile answers - as one clear S3Error, those
# in passing tried again (in-process misbehaving stores on loopback for what SeaweedFS never does).
import asyncio
import hashlib
import itertools
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from storage.s3 import Credentials, S3Client, S3Error, S3Settings, sigv4

from conftest import wait_for

# --- the signer: the S3 API reference's examples ("Signature Calculations for the Authorization Header:
# Transferring Payload in a Single Chunk"), bucket examplebucket, 2013-05-24T00:00:00Z, us-east-1 ---
EXAMPLE = Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
EXAMPLE_TIME = 1369353600.0  # Fri, 24 May 2013 00:00:00 GMT
HOST = {"host": "examplebucket.s3.amazonaws.com"}
CREDENTIAL = "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request"


def test_sigv4_get_object_example_step_by_step():
    headers = {
        **HOST,
        "range": "bytes=0-9",
        "x-amz-content-sha256": sigv4.EMPTY_SHA256,
        "x-amz-date": "20130524T000000Z",
    }
    request, signed = sigv4.canonical_request("GET", "/test.txt", [], headers, sigv4.EMPTY_SHA256)
    assert request == (
        "GET\n/test.txt\n\nhost:examplebucket.s3.amazonaws.com\nrange:bytes=0-9\n"
        "x-amz-content-sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n"
        "x-amz-date:20130524T000000Z\n\nhost;range;x-amz-content-sha256;x-amz-date\n"
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    assert sigv4.string_to_sign("20130524T000000Z", "20130524/us-east-1/s3/aws4_request", request) == (
        "AWS4-HMAC-SHA256\n20130524T000000Z\n20130524/us-east-1/s3/aws4_request\n"
        "7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972"
    )
    signed_headers = sigv4.sign(
        EXAMPLE, "us-east-1", "GET", "/test.txt", [], {**HOST, "Range": "bytes=0-9"}, sigv4.EMPTY_SHA256, EXAMPLE_TIME
    )
    assert signed_headers["authorization"] == (
        f"{CREDENTIAL},SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,"
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )
    assert signed_headers["x-amz-date"] == "20130524T000000Z"


def test_sigv4_put_object_example_with_an_encoded_key_and_a_signed_payload():
    body = b"Welcome to Amazon S3."
    payload = hashlib.sha256(body).hexdigest()
    assert payload == "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072"
    path = "/" + sigv4.uri_encode("test$file.text", encode_slash=False)
    assert path == "/test%24file.text"
    headers = {**HOST, "Date": "Fri, 24 May 2013 00:00:00 GMT", "x-amz-storage-class": "REDUCED_REDUNDANCY"}
    signed = sigv4.sign(EXAMPLE, "us-east-1", "PUT", path, [], headers, payload, EXAMPLE_TIME)
    assert signed["authorization"] == (
        f"{CREDENTIAL},SignedHeaders=date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class,"
        "Signature=98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd"
    )


@pytest.mark.parametrize(
    "query, signature",
    [
        (
            [("lifecycle", "")],
            "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543",
        ),  # GET Bucket Lifecycle
        ([("prefix", "J"), ("max-keys", "2")], "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"),
    ],
)
def test_sigv4_bucket_examples_with_a_query(query, signature):
    signed = sigv4.sign(EXAMPLE, "us-east-1", "GET", "/", query, HOST, sigv4.EMPTY_SHA256, EXAMPLE_TIME)
    assert (
        signed["authorization"]
        == f"{CREDENTIAL},SignedHeaders=host;x-amz-content-sha256;x-amz-date,Signature={signature}"
    )


def test_uri_encoding_and_the_secret_kept_out_of_reprs():
    assert sigv4.uri_encode("a b+c/ü~", encode_slash=False) == "a%20b%2Bc/%C3%BC~"
    assert sigv4.uri_encode("a/b") == "a%2Fb"
    assert sigv4.canonical_query([("prefix", "x/y z"), ("list-type", "2"), ("uploads", "")]) == (
        "list-type=2&prefix=x%2Fy%20z&uploads="
    )
    assert EXAMPLE.secret_key not in repr(EXAMPLE)
    assert EXAMPLE.secret_key not in repr(S3Settings("http://127.0.0.1:1", "us-east-1", EXAMPLE))


def test_path_and_virtual_host_addressing_and_endpoints():
    def client(endpoint: str, addressing: str = "path") -> S3Client:
        return S3Client(S3Settings(endpoint, "eu-central-1", EXAMPLE, addressing=addressing))

    assert client("http://127.0.0.1:8333")._where("bkt", "a b/c.eml") == ("127.0.0.1", "/bkt/a%20b/c.eml")
    assert client("http://127.0.0.1:8333")._where("bkt", "") == ("127.0.0.1", "/bkt")
    aws = client("https://s3.eu-central-1.amazonaws.com", "virtual")
    assert aws._where("bkt", "a b/c.eml") == ("bkt.s3.eu-central-1.amazonaws.com", "/a%20b/c.eml")
    assert aws._where("bkt", "") == ("bkt.s3.eu-central-1.amazonaws.com", "/")
    assert aws.endpoint.host_header("bkt.s3.eu-central-1.amazonaws.com") == "bkt.s3.eu-central-1.amazonaws.com"
    assert client("http://rgw.example:7480/base/")._where("bkt", "k") == ("rgw.example", "/base/bkt/k")
    v6 = client("http://[::1]:8333")
    assert (v6.endpoint.host, v6.endpoint.port, v6.endpoint.host_header()) == ("::1", 8333, "[::1]:8333")
    for bad in ("ftp://host", "http://", "http://host:99999", "s3.example"):
        with pytest.raises(ValueError):
            client(bad)


# --- against SeaweedFS -------------------------------------------------------------------------


def run(coro):
    return asyncio.run(coro)


async def collect(client, bucket, key) -> bytes:
    parts: list[bytes] = []

    async def sink(data: bytes) -> None:
        parts.append(data)

    await client.get(bucket, key, sink)
    return b"".join(parts)


def from_bytes(data: bytes):
    offset = 0

    async def read(n: int) -> bytes:
        nonlocal offset
        chunk = data[offset : offset + n]
        offset += len(chunk)
        return chunk

    return read


def test_put_get_head_list_delete_round_trips(seaweedfs):
    client = S3Client(seaweedfs.settings())
    bucket = seaweedfs.new_bucket()
    keys = {
        "plain.txt": b"hello object store\r\n",
        "empty": b"",
        "dir/with space+plus & ü.bin": bytes(range(256)) * 40,
        "dir/sub/deeper.eml": b"x" * 70_000,
        "other/not-listed": b"-",
    }

    async def scenario():
        for key, data in keys.items():
            result = await client.put(bucket, key, from_bytes(data))
            assert (result.size, result.parts, result.sha256) == (len(data), 0, hashlib.sha256(data).hexdigest())
        for key, data in keys.items():
            assert await collect(client, bucket, key) == data
            info = await client.head(bucket, key)
            assert info is not None and info.size == len(data), (key, info)
        listed = [(o.key, o.size) async for o in client.list_objects(bucket, "dir/", page_size=1)]  # one per page
        assert listed == [("dir/sub/deeper.eml", 70_000), ("dir/with space+plus & ü.bin", 10_240)]
        everything = [o.key async for o in client.list_objects(bucket, page_size=2)]
        assert everything == sorted(keys)
        await client.delete(bucket, "plain.txt")
        assert await client.head(bucket, "plain.txt") is None
        with pytest.raises(S3Error) as caught:
            await collect(client, bucket, "plain.txt")
        assert caught.value.status == 404 and "NoSuchKey" in str(caught.value), caught.value
        assert [o.key async for o in client.list_objects(bucket, "plain")] == []

    run(scenario())


class RssSampler:
    """The process's peak resident memory above where it was at the start, sampled every 5 ms."""

    def __init__(self):
        self.process = psutil.Process()
        self.base = self.process.memory_info().rss
        self.peak = self.base
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self.done.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.base


def test_a_40_mb_object_goes_up_in_parts_with_memory_of_a_few_parts(seaweedfs):
    part = 5 * 1024 * 1024
    size = 40 * 1000 * 1000
    client = S3Client(seaweedfs.settings(part_size=part))
    bucket = seaweedfs.new_bucket()
    rng = random.Random(27)
    sent = hashlib.sha256()
    given = 0

    async def read(n: int) -> bytes:
        nonlocal given
        chunk = rng.randbytes(min(n, size - given))
        given += len(chunk)
        sent.update(chunk)
        return chunk

    with RssSampler() as rss:
        started = time.monotonic()
        result = run(client.put(bucket, "big/study.eml", read))
        up = time.monotonic() - started
    assert (result.size, result.parts, result.sha256) == (size, 8, sent.hexdigest())
    info = run(client.head(bucket, "big/study.eml"))
    assert info is not None and info.size == size
    got = hashlib.sha256()

    async def sink(data: bytes) -> None:
        got.update(data)

    with RssSampler() as rss_down:
        started = time.monotonic()
        assert run(client.get(bucket, "big/study.eml", sink)) == size
        down = time.monotonic() - started
    assert got.hexdigest() == sent.hexdigest()
    print(
        f"40 MB in {result.parts} parts of 5 MiB: up {size / 1e6 / up:.0f} MB/s, down {size / 1e6 / down:.0f} MB/s;"
        f" peak RSS growth up {rss.growth / 2**20:.1f} MiB,"
        f" down {rss_down.growth / 2**20:.1f} MiB"
    )
    assert rss.growth < 3 * part, rss.growth  # two parts (sent, next read) and slices, never the object
    assert rss_down.growth < part, rss_down.growth


def test_an_upload_failing_or_cancelled_mid_way_leaves_no_object_and_no_pending_upload(seaweedfs):
    part = 5 * 1024 * 1024
    client = S3Client(seaweedfs.settings(part_size=part))
    bucket = seaweedfs.new_bucket()

    def source(fail_after: int, stall: asyncio.Event | None = None):
        given = 0

        async def read(n: int) -> bytes:
            nonlocal given
            if given >= fail_after:
                if stall is not None:
                    stall.set()
                    await asyncio.sleep(3600)  # until cancelled
                raise OSError(5, "Input/output error")
            given += n
            return b"d" * n

        return read

    async def scenario():
        with pytest.raises(OSError, match="Input/output error"):
            await client.put(bucket, "failed.eml", source(2 * part + 100_000))
        stalled = asyncio.Event()
        task = asyncio.ensure_future(client.put(bucket, "cancelled.eml", source(part + 1, stalled)))
        await asyncio.wait_for(stalled.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for key in ("failed.eml", "cancelled.eml"):
            assert await client.head(bucket, key) is None
        return await client.pending_uploads(bucket)

    assert run(scenario()) == []


def test_a_wrong_key_or_a_missing_bucket_is_one_clear_error(seaweedfs):
    bucket = seaweedfs.new_bucket()
    right = seaweedfs.settings()
    wrong_secret = S3Settings(right.endpoint, right.region, Credentials(right.credentials.access_key, "not-the-secret"))
    unknown_key = S3Settings(right.endpoint, right.region, Credentials("NOSUCHKEYID", "whatever-secret"))
    errors = {}
    for name, settings, where in (
        ("wrong secret", wrong_secret, bucket),
        ("unknown key", unknown_key, bucket),
        ("missing bucket", right, "no-such-bucket-here"),
    ):
        with pytest.raises(S3Error) as caught:
            run(S3Client(settings).put(where, "k", from_bytes(b"data")))
        errors[name] = caught.value
        message = str(caught.value)
        print(f"{name}: {message}")
        assert "\n" not in message and "not-the-secret" not in message and "whatever-secret" not in message
        assert message.startswith(f"PUT s3://{where}/k: HTTP "), message
    assert errors["wrong secret"].status == 403 and errors["wrong secret"].code == "SignatureDoesNotMatch"
    assert "check the secret key" in str(errors["wrong secret"])
    assert errors["unknown key"].status == 403 and errors["unknown key"].code in ("InvalidAccessKeyId", "AccessDenied")
    assert errors["missing bucket"].status == 404 and errors["missing bucket"].code == "NoSuchBucket"


# --- a store that misbehaves: in-process servers on loopback ------------------------------------


class Store:
    """A store that misbehaves: a server on loopback that reads each request's head and gives the
    next of `answers` (None: says nothing until the client gives up; the last one again when they run
    out), counting the requests it got by their first line."""

    def __init__(self, *answers: bytes | None, read_body: bool = True):
        self.answers = list(answers)
        self.requests: list[str] = []
        self.read_body = read_body  # False: answer at once, take no body, close a second later

    async def handle(self, reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.requests.append(head.split(b"\r\n", 1)[0].decode())
            answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
            if answer is None:
                await reader.read()
            else:
                writer.write(answer)
                await writer.drain()
                writer.write_eof()
                if self.read_body:
                    await reader.read()  # the body, until the client is done and closes
                else:
                    await asyncio.sleep(1)  # time-based: the server closes a second later, the body unread
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def run(self, operation, timeout: float = 0.5):
        """operation(client) against this store (3 tries, 10 ms apart); its result or S3Error."""

        async def scenario():
            server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            settings = S3Settings(f"http://127.0.0.1:{port}", "us-east-1", EXAMPLE, timeout=timeout, backoff=0.01)
            try:
                return await operation(S3Client(settings))
            except S3Error as exc:
                return exc
            finally:
                server.close()

        return run(scenario())


def hostile(answer: bytes | None) -> S3Error:
    """The S3Error of a DELETE (a HEAD when the store says nothing) against a store answering `answer`."""
    error = Store(answer).run(lambda c: c.head("bucket", "key") if answer is None else c.delete("bucket", "key"))
    assert isinstance(error, S3Error), error
    return error


def test_failures_in_passing_are_tried_again_but_never_a_post():
    flaky = Store(b"HTTP/1.1 503 Slow Down\r\nContent-Length: 0\r\n\r\n", None, b"HTTP/1.1 204 No Content\r\n\r\n")
    assert flaky.run(lambda c: c.delete("bucket", "key")) is None  # 503, a timeout, then done
    assert flaky.requests == ["DELETE /bucket/key HTTP/1.1"] * 3
    down = Store(b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n")
    error = down.run(lambda c: c.head("bucket", "key"))
    assert isinstance(error, S3Error) and error.status == 500 and str(error).endswith("(tried 3 times)"), error
    refused = Store(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(refused.run(lambda c: c.head("bucket", "key")), S3Error) and len(refused.requests) == 1
    busy = b"HTTP/1.1 503 Slow Down\r\nContent-Length: 0\r\n\r\n"
    early = Store(busy, read_body=False)  # answers before it has read the body: its answer is still read
    error = early.run(lambda c: c.put("bucket", "one", from_bytes(b"x" * (6 * 1024 * 1024))))
    assert isinstance(error, S3Error) and error.status == 503 and len(early.requests) == 3, error
    post = Store(busy)
    error = post.run(lambda c: c.put("bucket", "big", from_bytes(b"x" * (9 * 1024 * 1024))))
    assert isinstance(error, S3Error) and error.status == 503, error
    assert post.requests == ["POST /bucket/big?uploads= HTTP/1.1"]  # creating an upload is never repeated


def test_silence_oversized_answers_and_entities_are_bounded_errors():
    started = time.monotonic()
    silent = hostile(None)
    assert silent.code == "timeout" and "no answer from the store within 0.5 s" in str(silent), silent
    assert time.monotonic() - started < 10
    huge_head = hostile(b"HTTP/1.1 200 OK\r\nX-Junk: " + b"a" * 200_000 + b"\r\n\r\n")
    assert huge_head.code == "protocol" and "longer than 65536" in str(huge_head), huge_head
    many = hostile(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 500 + b"\r\n")
    assert "more than 100 header fields" in str(many), many
    huge_error = hostile(b"HTTP/1.1 500 Oops\r\nContent-Length: 50000000\r\n\r\n" + b"<" * 100_000)
    assert huge_error.code == "too_large" and "larger than 65536 bytes" in str(huge_error), huge_error
    bomb = (
        b'<?xml version="1.0"?><!DOCTYPE e [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>'
        b"<Error><Code>&b;</Code></Error>"
    )
    entities = hostile(b"HTTP/1.1 400 Bad\r\nContent-Length: %d\r\n\r\n%s" % (len(bomb), bomb))
    assert entities.status == 400 and "aaaaaaaaaa" not in str(entities), entities
    not_http = hostile(b"SSH-2.0-OpenSSH\r\n\r\n")
    assert "not an HTTP answer" in str(not_http), not_http
    cut = hostile(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    assert cut.code == "connection" and "after 3 of 10 bytes" in str(cut), cut
    slow = b"<Error><Code>SlowDown</Code><Message>Reduce your\r\nrequest rate.</Message></Error>"
    with_code = hostile(b"HTTP/1.1 503 Slow Down\r\nContent-Length: %d\r\n\r\n%s" % (len(slow), slow))
    assert with_code.code == "SlowDown" and "Reduce your?request rate" in str(with_code), with_code
    for error in (silent, huge_head, many, huge_error, entities, not_http, cut, with_code):
        assert "\n" not in str(error) and len(str(error)) < 400, error


def test_chunked_and_oversized_listings():
    page = (
        b'<?xml version="1.0"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
        b"<IsTruncated>false</IsTruncated><Contents><Key>a&amp;b</Key><Size>7</Size><ETag>&quot;x&quot;</ETag>"
        b"</Contents></ListBucketResult>"
    )
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(page[i : i + 50]), page[i : i + 50]) for i in range(0, len(page), 50))
    store = Store(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked + b"0\r\n\r\n")
    listed = store.run(lambda c: _all(c.list_objects("bucket", "a")))
    assert [(o.key, o.size, o.etag) for o in listed] == [("a&b", 7, "x")], listed
    assert store.requests == ["GET /bucket?list-type=2&max-keys=1000&prefix=a HTTP/1.1"]
    huge = Store(b"HTTP/1.1 200 OK\r\nContent-Length: 5000000\r\n\r\n" + b"<" * 5_000_000)
    error = huge.run(lambda c: _all(c.list_objects("bucket")))
    assert isinstance(error, S3Error) and "larger than 4194304 bytes" in str(error) and len(huge.requests) == 1
    endless = Store(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"f" * 100_000)
    error = endless.run(lambda c: _all(c.list_objects("bucket")))
    assert isinstance(error, S3Error) and error.code == "protocol" and "longer than 65536" in str(error), error


async def _all(iterator):
    return [item async for item in iterator]


def test_a_refused_connection_names_the_endpoint():
    import socket

    with socket.socket() as s:  # bound and kept, never listening: connections to it are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        settings = S3Settings(f"http://127.0.0.1:{port}", "us-east-1", EXAMPLE, timeout=5, backoff=0.01)
        with pytest.raises(S3Error) as caught:
            run(S3Client(settings).head("bucket", "key"))
    assert caught.value.code == "connection" and f"cannot connect to 127.0.0.1:{port}" in str(caught.value)
    assert str(caught.value).endswith("(tried 3 times)"), caught.value


# --- review (issue 27): hostile numbers, chunk sizes, trailers, trickles and encodings ---------


class Trickle:
    """A store that sends its answer in pieces, `pause` seconds apart (the head at once, then the
    body a few bytes at a time, or interim answers for ever)."""

    def __init__(self, head: bytes, pieces, pause: float):
        self.head, self.pieces, self.pause = head, pieces, pause

    async def handle(self, reader, writer):
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(self.head)
            for piece in self.pieces:
                await writer.drain()
                await asyncio.sleep(self.pause)  # pacing: a server sending its pieces apart
                writer.write(piece)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def run(self, operation, timeout: float = 0.5):
        async def scenario():
            server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            settings = S3Settings(f"http://127.0.0.1:{port}", "us-east-1", EXAMPLE, timeout=timeout, attempts=1)
            try:
                async with asyncio.timeout(15):  # what a stuck client would do: the test fails instead
                    return await operation(S3Client(settings))
            except S3Error as exc:
                return exc
            finally:
                server.close()

        return run(scenario())


def test_hostile_chunk_sizes_numbers_and_trailers_are_bounded_protocol_errors():
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    # "-1" made the client read the rest of the connection into memory, whatever its length
    for size in (b"-1", b"0x5", b"+5", b"1_0", b" ", b"1" * 17):
        store = Store(chunked + size + b"\r\n" + b"<" * 8_000_000)
        started = time.monotonic()
        error = store.run(lambda c: _all(c.list_objects("bucket")))
        assert isinstance(error, S3Error) and "bad chunk size" in str(error), (size, error)
        assert time.monotonic() - started < 5, size
    # digits that str.isdigit() takes and int() refuses: an S3Error, never a ValueError
    for answer in (
        b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n",
        b"HTTP/1.1 2\xb2\xb2 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 12345678901234567890123\r\n\r\n",
    ):
        error = Store(answer).run(lambda c: _all(c.list_objects("bucket")))
        assert isinstance(error, S3Error) and error.code == "protocol", (answer, error)
    error = Store(b"HTTP/1.1 200 OK\r\nContent-Length: \xb3\r\n\r\n").run(lambda c: c.head("bucket", "key"))
    assert isinstance(error, S3Error) and "content-length" in str(error), error
    size = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n<a>"  # a listing whose <Size> is "²"
    listing = b"<ListBucketResult><IsTruncated>false</IsTruncated><Contents><Key>k</Key><Size>\xc2\xb2</Size>"
    listing += b"</Contents></ListBucketResult>"
    store = Store(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(listing), listing))
    error = store.run(lambda c: _all(c.list_objects("bucket")))
    assert isinstance(error, S3Error) and "expected a number in <Size>" in str(error), (size, error)
    # trailer fields without end: bounded, not a loop for as long as the store sends
    trailers = Store(chunked + b"0\r\n" + b"X-Trailer: y\r\n" * 100_000)
    error = trailers.run(lambda c: c.delete("bucket", "key"))
    assert isinstance(error, S3Error) and "more than 100 trailer fields" in str(error), error


def test_a_store_that_trickles_or_sends_interim_answers_for_ever_is_given_up():
    started = time.monotonic()
    body = Trickle(b"HTTP/1.1 500 Oops\r\nContent-Length: 10000\r\n\r\n", [b"x"] * 10_000, 0.05)
    error = body.run(lambda c: c.delete("bucket", "key"))  # each byte within the timeout, the body never
    assert isinstance(error, S3Error) and error.code == "timeout" and "less than 65536 bytes per 0.5 s" in str(error)
    interim = Trickle(b"", [b"HTTP/1.1 100 Continue\r\n\r\n"] * 10_000, 0.05)
    error = interim.run(lambda c: c.delete("bucket", "key"))
    assert (
        isinstance(error, S3Error) and error.code == "timeout" and "no answer from the store within 0.5 s" in str(error)
    ), error
    assert time.monotonic() - started < 10


def test_a_download_stops_at_its_limit_and_leaves_no_file(tmp_path):
    chunk = b"10000\r\n" + b"z" * 65536 + b"\r\n"
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    endless = Trickle(head, itertools.repeat(chunk), 0)  # a store sending for ever, fast
    longer = Store(head + chunk * 64)
    for server in (endless, longer):
        error = server.run(lambda c: c.get_file("bucket", "key", tmp_path / "object", limit=100_000))
        assert isinstance(error, S3Error) and error.code == "too_large", error
        assert "larger than 100000 bytes" in str(error) and not (tmp_path / "object").exists()


def test_entities_are_refused_in_any_encoding_and_an_endpoint_holds_no_password():
    bomb = (
        '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE e [<!ENTITY a "EXPANDED"><!ENTITY b "&a;&a;&a;">]>'
        "<Error><Code>Bad</Code><Message>&b;</Message></Error>"
    ).encode("utf-16")
    for body in (bomb, b"<!--" + b" " * 5000 + b'--><!DOCTYPE e SYSTEM "x.dtd"><Error><Code>Bad</Code></Error>'):
        error = hostile(b"HTTP/1.1 400 Bad\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        assert "EXPANDED" not in str(error) and "declaring a DTD, not read" in str(error), error
        listing = Store(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        error = listing.run(lambda c: _all(c.list_objects("bucket")))
        assert isinstance(error, S3Error) and error.code == "dtd", error
    with pytest.raises(ValueError) as caught:
        S3Settings("http://AKID:s3cr3t@127.0.0.1:8333", "us-east-1", EXAMPLE)
    assert "s3cr3t" not in str(caught.value)


def test_a_killed_test_session_leaves_no_weed_running_and_no_files_in_tmp(seaweedfs, tmp_path):
    # the session's own store keeps its logs and sockets in its folder, not in the temporary folder
    assert not list(Path(tempfile.gettempdir()).glob(f"weed.*.{seaweedfs.proc.pid}"))
    assert list(seaweedfs.folder.glob(f"weed.*.{seaweedfs.proc.pid}"))
    session = subprocess.Popen(  # a test session that starts a store and is then killed
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from seaweedutil import SeaweedFS; "
            "s = SeaweedFS(Path(sys.argv[1])); s.spawn(); print(s.proc.pid, flush=True); time.sleep(600)",
            str(tmp_path),
        ],
        cwd=Path(__file__).parent,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        weed = int(session.stdout.readline())
    finally:
        session.kill()
        session.wait()
        session.stdout.close()

    def gone() -> bool:
        try:
            os.kill(weed, 0)
        except ProcessLookupError:
            return True
        return Path(f"/proc/{weed}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"

    wait_for(gone, timeout=30)


def test_a_bucket_of_another_region_names_the_setting_to_change():
    moved = (
        b"<Error><Code>PermanentRedirect</Code><Message>The bucket you are attempting to access must be addressed"
        b" using the specified endpoint.</Message><Endpoint>bkt.s3.eu-west-1.amazonaws.com</Endpoint></Error>"
    )
    error = hostile(b"HTTP/1.1 301 Moved Permanently\r\nContent-Length: %d\r\n\r\n%s" % (len(moved), moved))
    assert error.code == "PermanentRedirect" and "set s3.region and s3.endpoint" in str(error), error
    head = Store(b"HTTP/1.1 301 Moved Permanently\r\nx-amz-bucket-region: eu-west-1\r\n\r\n")
    error = head.run(lambda c: c.head("bucket", "key"))  # a HEAD's answer has no body to say it
    assert isinstance(error, S3Error) and "set s3.region and s3.endpoint" in str(error), error
    assert "the bucket's region: eu-west-1" in str(error), error
    region = b"<Error><Code>AuthorizationHeaderMalformed</Code><Region>eu-west-1</Region></Error>"
    error = hostile(b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n%s" % (len(region), region))
    assert "check s3.region" in str(error), error
    skewed = b"<Error><Code>RequestTimeTooSkewed</Code></Error>"
    error = hostile(b"HTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\n\r\n%s" % (len(skewed), skewed))
    assert "clock is off" in str(error), error


def test_a_store_giving_the_same_page_for_ever_is_refused():
    page = (
        b"<ListBucketResult><IsTruncated>true</IsTruncated><NextContinuationToken>again</NextContinuationToken>"
        b"<Contents><Key>k</Key><Size>1</Size></Contents></ListBucketResult>"
    )
    listing = Store(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(page), page))
    error = listing.run(lambda c: _all(c.list_objects("bucket")))
    assert isinstance(error, S3Error) and "same continuation token twice" in str(error), error
    assert len(listing.requests) == 2
    uploads = (
        b"<ListMultipartUploadsResult><IsTruncated>true</IsTruncated><NextKeyMarker>k</NextKeyMarker>"
        b"<NextUploadIdMarker>u</NextUploadIdMarker><Upload><Key>k</Key><UploadId>u</UploadId></Upload>"
        b"</ListMultipartUploadsResult>"
    )
    pending = Store(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(uploads), uploads))
    error = pending.run(lambda c: c.pending_uploads("bucket"))  # (its list grew for ever)
    assert isinstance(error, S3Error) and "same markers twice" in str(error), error
    assert len(pending.requests) == 2


def test_a_download_cut_off_in_passing_starts_again_and_gives_the_whole_object(tmp_path):
    body = b"0123456789" * 1000
    cut = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body[:3000])  # then closed
    whole = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    store = Store(cut, whole)
    result = store.run(lambda c: c.get_file("bucket", "key", tmp_path / "object", limit=len(body)))
    assert result == (len(body), hashlib.sha256(body).hexdigest()), result
    assert (tmp_path / "object").read_bytes() == body and len(store.requests) == 2
    broken = Store(cut)  # cut every time: the last try's error, no file
    error = broken.run(lambda c: c.get_file("bucket", "key", tmp_path / "other"))
    assert isinstance(error, S3Error) and error.code == "connection" and len(broken.requests) == 3, error
    assert not (tmp_path / "other").exists()


def test_completing_a_multipart_upload_is_tried_again_and_a_lost_answer_is_checked():
    data = b"d" * (8 * 1024 * 1024 + 10)  # two parts of the default size
    created = b"<InitiateMultipartUploadResult><UploadId>u1</UploadId></InitiateMultipartUploadResult>"
    begin = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(created), created)
    part = b'HTTP/1.1 200 OK\r\nETag: "p"\r\nContent-Length: 0\r\n\r\n'
    done = b'<CompleteMultipartUploadResult><ETag>"whole-2"</ETag></CompleteMultipartUploadResult>'
    complete = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(done), done)
    slow = b"<Error><Code>SlowDown</Code></Error>"
    busy = b"HTTP/1.1 503 Slow Down\r\nContent-Length: %d\r\n\r\n%s" % (len(slow), slow)
    store = Store(begin, part, part, busy, complete)
    result = store.run(lambda c: c.put("bucket", "big", from_bytes(data)), timeout=5)
    assert not isinstance(result, S3Error) and (result.etag, result.parts) == ("whole-2", 2), result
    assert [r.split()[0] for r in store.requests] == ["POST", "PUT", "PUT", "POST", "POST"], store.requests
    # the answer to the first try lost (no answer in time), the second finds the upload gone: done if
    # the object is there, of its size
    gone = b"<Error><Code>NoSuchUpload</Code></Error>"
    no_such = b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s" % (len(gone), gone)
    there = b'HTTP/1.1 200 OK\r\nContent-Length: %d\r\nETag: "whole-2"\r\n\r\n' % len(data)
    lost = Store(begin, part, part, None, no_such, there)
    result = lost.run(lambda c: c.put("bucket", "big", from_bytes(data)), timeout=1)
    assert not isinstance(result, S3Error) and result.etag == "whole-2", result
    assert lost.requests[-1] == "HEAD /bucket/big HTTP/1.1", lost.requests
