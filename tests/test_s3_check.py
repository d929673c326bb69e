# `mailhub storage check` and `storage verify` with the mail on object storage (storage/object_check.py)
# against the session's SeaweedFS (tests/seaweedutil.py), a prefix of its own per test.
import asyncio
import json

import pytest
from test_s3_blobs import StoreProxy, object_bytes, object_hub, objects, send

from storage.s3 import S3Client

from conftest import make_message, queue_id_from

pytestmark = pytest.mark.both_engines  # the rows are read a page at a time on either index


def test_check_names_a_missing_or_short_object_and_lists_orphans(make_hub, seaweedfs):
    hub, (bucket, prefix) = object_hub(make_hub, seaweedfs)
    ids = []
    for n in range(3):
        code, reply = send(hub, make_message(3000, f"mail {n}"))
        assert code == 250, reply
        ids.append(queue_id_from(reply))
    result = hub.cli("storage", "check", "--json")
    report = json.loads(result.stdout)
    assert (report["messages"], report["objects"], report["missing"], report["orphans"]) == (3, 3, 0, 0), report
    assert report["problems"] == []
    assert "3 mail(s) checked, 0 missing, 0 short" in result.stderr  # the progress line

    keys = {key.rpartition("/")[2]: key for key in objects(seaweedfs, bucket, prefix)}
    client = S3Client(seaweedfs.settings())
    orphan = f"{prefix}/2000010100/0000000000000000001"

    async def damage() -> None:
        await client.delete(bucket, keys[ids[0]])
        data = [b"x" * 100]

        async def read(n: int) -> bytes:
            return data.pop() if data else b""

        await client.put(bucket, keys[ids[1]], read)  # shorter than its mail
        data.append(b"y" * 10)
        await client.put(bucket, orphan, read)

    asyncio.run(damage())
    result = hub.cli("storage", "check", check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    problems = [line for line in result.stdout.splitlines() if line.startswith("PROBLEM: ")]
    assert len(problems) == 2, result.stdout
    assert f"mail {ids[0]}: object {bucket}/{keys[ids[0]]} missing" in problems[0] + problems[1]
    assert f"mail {ids[1]}: object {bucket}/{keys[ids[1]]} has 100 bytes" in problems[0] + problems[1]
    assert f"ORPHAN: {bucket}/{orphan}" in result.stdout
    assert "1 object(s) missing, 1 short" in result.stdout
    assert hub.stop() == 0


def test_verify_finds_an_object_overwritten_with_other_bytes_and_has_it_marked(make_hub, seaweedfs):
    hub, (bucket, prefix) = object_hub(make_hub, seaweedfs)
    ids = []
    for n in range(3):
        code, reply = send(hub, make_message(5000, f"mail {n}"))
        assert code == 250, reply
        ids.append(queue_id_from(reply))
    result = hub.cli("storage", "verify")
    assert "verified 3 mail(s)" in result.stdout and "0 damaged" in result.stdout, result.stdout
    assert "verified 3 mail(s)" in hub.cli("storage", "verify", "--site", "beta", "--rate", "1M").stdout
    assert "verified 0 mail(s)" in hub.cli("storage", "verify", "--site", "alpha").stdout

    keys = {key.rpartition("/")[2]: key for key in objects(seaweedfs, bucket, prefix)}
    body = bytearray(object_bytes(seaweedfs, bucket, keys[ids[2]]))
    body[200] ^= 0x20  # one bit of the message: same length, trailer intact
    data = [bytes(body)]

    async def read(n: int) -> bytes:
        return data.pop() if data else b""

    asyncio.run(S3Client(seaweedfs.settings()).put(bucket, keys[ids[2]], read))
    result = hub.cli("storage", "verify", "--quiet", check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    damaged = [line for line in result.stdout.splitlines() if line.startswith("DAMAGED ")]
    assert damaged == [f"DAMAGED {ids[2]}: SHA-256 differs from the one recorded at ingest"], result.stdout
    assert "1 newly damaged mail(s) marked by the running hub" in result.stdout
    assert hub.query("SELECT queue_id FROM damaged") == [(ids[2],)]
    assert hub.stop() == 0


@pytest.mark.one_engine("the store's failure, not the index's (each command waits out the client's retries)")
def test_the_store_unreachable_is_one_line_and_exit_1(make_hub, seaweedfs):
    proxy = StoreProxy(seaweedfs.endpoint)
    try:
        hub, _place = object_hub(make_hub, seaweedfs, endpoint=proxy.endpoint)
        code, reply = send(hub, make_message(1000, "one"))
        assert code == 250, reply
        proxy.up = False
        result = hub.cli("storage", "check", check=False)
        assert result.returncode == 1, result.stdout + result.stderr
        lines = [line for line in result.stderr.splitlines() if " mail(s) checked, " not in line]
        assert len(lines) == 1 and lines[0].startswith("mailhub: storage check failed: "), result.stderr
        assert hub.stop() == 0
    finally:
        proxy.close()
