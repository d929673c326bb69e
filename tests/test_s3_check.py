# `mailhub storage check` with the mail on object storage (storage/object_check.py) against the
# session's SeaweedFS (tests/seaweedutil.py), a prefix of its own per test.
import asyncio
import json

from test_s3_blobs import object_hub, objects, send

from storage.s3 import S3Client

from conftest import make_message, queue_id_from


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
