# Offsite backup to object storage (storage/backup_s3.py, `mailhub storage backup s3://...` and
# `mailhub storage restore`), end to end against SeaweedFS: a hub filled over SMTP (packed mails, a
# file of its own, one large enough to go up in parts), backed up while it runs, restored into a
# new folder that `mailhub storage check` accepts, and a hub started on that folder serves the same
# bytes over POP3. Also: an existing prefix is refused, an unfinished backup (no manifest) and a
# damaged object are refused at restore (leaving no half restore), a backup failing mid-way removes
# what it uploaded, and the secret key is printed nowhere.
import asyncio
import hashlib
import os
import poplib
import signal
import smtplib
import subprocess
import sys

import pytest

from storage.s3 import S3Client, S3Error

from conftest import ALPHA_BETA, PASSWORD, REPO, Hub, hub_env, make_message, wait_for

PART = 5 * 1024 * 1024


def s3_env(seaweedfs, **extra: str) -> dict[str, str]:
    """The [s3] keys as a hub's environment sets them (MAILHUB_* only: the CLI then runs in this
    process, see conftest.cli_in_process_is_the_same)."""
    return {
        "MAILHUB_S3_ENDPOINT": seaweedfs.endpoint,
        "MAILHUB_S3_ACCESS_KEY": seaweedfs.access_key,
        "MAILHUB_S3_SECRET_KEY": seaweedfs.secret_key,
        "MAILHUB_S3_PART_SIZE": "5M",
        **extra,
    }


def fetch_all(port: int, site: str) -> list[bytes]:
    client = poplib.POP3("127.0.0.1", port, timeout=60)
    try:
        client.user(site)
        client.pass_(PASSWORD)
        return [b"\r\n".join(client.retr(n)[1]) for n in range(1, len(client.list()[1]) + 1)]
    finally:
        client.quit()


def test_backup_to_object_storage_restore_check_and_serve_the_same_bytes(make_hub, seaweedfs, tmp_path, capsys):
    hub = make_hub(sites=ALPHA_BETA, **s3_env(seaweedfs)).start()
    sizes = [3_000, 9_000, 40_000, 2_600_000, 6_000_000]  # packed, packed, packed, a file, a file in 2 parts
    with smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=60) as smtp:
        smtp.login("alpha", PASSWORD)
        for n, size in enumerate(sizes):
            smtp.sendmail("alpha@hub.test", ["beta@hub.test"], make_message(size, subject=f"study {n}"))
    before = fetch_all(hub.ports["pop3"], "beta")
    assert len(before) == len(sizes)

    bucket = seaweedfs.new_bucket()
    result = hub.cli("storage", "backup", f"s3://{bucket}/nightly/1")
    figures = [result.stdout.strip()]
    assert f"backup in s3://{bucket}/nightly/1: {len(sizes)} mail(s)" in result.stdout
    assert "(1 in parts)" in result.stdout, result.stdout
    again = hub.cli("storage", "backup", f"s3://{bucket}/nightly/1", check=False)
    assert again.returncode == 1 and "already holds objects" in again.stderr, again.stderr
    assert not [p for p in hub.data_dir.parent.iterdir() if "s3-backup" in p.name], "the temporary copy stays"

    restored = tmp_path / "restored"
    result = hub.cli("storage", "restore", f"s3://{bucket}/nightly/1", str(restored), "--json")
    assert '"files": 9' in result.stdout and '"check_problems": []' in result.stdout, result.stdout
    result = hub.cli("storage", "restore", f"s3://{bucket}/nightly/1", str(tmp_path / "restored-2"))
    figures.append(result.stdout.strip())
    assert f"storage check of {tmp_path / 'restored-2'}: {len(sizes)} mail(s)" in result.stdout, result.stdout
    assert "no problem(s)" in result.stdout, result.stdout
    assert hub.stop() == 0

    check_env = hub_env(restored)
    other = Hub(restored, check_env)
    check = other.cli("storage", "check")
    assert "no problems found" in check.stdout, check.stdout
    other.start()
    try:
        after = fetch_all(other.ports["pop3"], "beta")
    finally:
        other.stop()
    assert [hashlib.sha256(m).hexdigest() for m in after] == [hashlib.sha256(m).hexdigest() for m in before]
    secret = seaweedfs.secret_key
    shown = hub.cli("config", "show").stdout
    (row,) = [line for line in shown.splitlines() if line.startswith("s3.secret_key ")]
    assert '"********"' in row and "MAILHUB_S3_SECRET_KEY" in row, row
    out = capsys.readouterr()
    assert secret not in out.out + out.err + shown + hub.log_text()
    with capsys.disabled():
        print("\n" + "\n".join(figures))


def test_restore_refuses_an_unfinished_or_damaged_backup_and_a_hostile_manifest(make_hub, seaweedfs, tmp_path):
    # the secret from the environment's AWS_SECRET_ACCESS_KEY this time (the CLI runs as a process)
    hub = make_hub(
        sites=ALPHA_BETA, **s3_env(seaweedfs, MAILHUB_S3_SECRET_KEY="", AWS_SECRET_ACCESS_KEY=seaweedfs.secret_key)
    )
    bucket = seaweedfs.new_bucket()
    client = S3Client(seaweedfs.settings())

    def put(key: str, data: bytes) -> None:
        async def read(n: int) -> bytes:
            nonlocal data
            chunk, data = data[:n], data[n:]
            return chunk

        asyncio.run(client.put(bucket, key, read))

    put("unfinished/index.sqlite3", b"half")
    result = hub.cli("storage", "restore", f"s3://{bucket}/unfinished", str(tmp_path / "a"), check=False)
    assert result.returncode == 1 and "no finished backup" in result.stderr and "MANIFEST" in result.stderr, (
        result.stderr
    )

    line = b'{"path": "index.sqlite3", "size": 4, "sha256": "%s"}\n' % hashlib.sha256(b"full").hexdigest().encode()
    put("damaged/MANIFEST.jsonl", line)
    put("damaged/index.sqlite3", b"fall")  # same size, other bytes
    result = hub.cli("storage", "restore", f"s3://{bucket}/damaged", str(tmp_path / "b"), check=False)
    assert result.returncode == 1 and "index.sqlite3 differs from the manifest" in result.stderr, result.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # no half restore left behind

    put("hostile/MANIFEST.jsonl", b'{"path": "../../etc/evil", "size": 1, "sha256": "%s"}\n' % (b"0" * 64))
    result = hub.cli("storage", "restore", f"s3://{bucket}/hostile", str(tmp_path / "c"), check=False)
    assert result.returncode == 1 and "unsafe path" in result.stderr, result.stderr
    assert not (tmp_path / "etc").exists()

    bad = hub.cli("storage", "restore", "s3://Not_A_Bucket/x", str(tmp_path / "d"), check=False)
    assert bad.returncode == 2 and "not a bucket name" in bad.stderr
    for result in (bad,):
        assert seaweedfs.secret_key not in result.stderr + result.stdout


@pytest.mark.parametrize(
    "env, message",
    [
        ({"MAILHUB_S3_ENDPOINT": ""}, "no object store configured"),
        ({"MAILHUB_S3_SECRET_KEY": ""}, "no S3 credentials"),
        ({"MAILHUB_S3_SECRET_KEY": "", "MAILHUB_S3_SECRET_KEY_FILE": "/nonexistent/secret"}, "cannot read"),
        ({"MAILHUB_S3_SECRET_KEY": "wrong-secret-value"}, "SignatureDoesNotMatch"),
    ],
)
def test_setup_mistakes_are_one_line_naming_the_fix(make_hub, seaweedfs, tmp_path, env, message):
    hub = make_hub(**{**s3_env(seaweedfs), **env})
    bucket = seaweedfs.new_bucket()
    result = hub.cli("storage", "restore", f"s3://{bucket}/x", str(tmp_path / "r"), check=False)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "wrong-secret-value" not in result.stderr


def test_a_backup_failing_mid_way_removes_what_it_uploaded(make_hub, seaweedfs, monkeypatch):
    hub = make_hub(sites=ALPHA_BETA, **s3_env(seaweedfs)).start()
    with smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=60) as smtp:
        smtp.login("alpha", PASSWORD)
        smtp.sendmail("alpha@hub.test", ["beta@hub.test"], make_message(3000))
    bucket = seaweedfs.new_bucket()
    real_put_file = S3Client.put_file
    calls = []

    async def failing_put_file(self, bucket, key, path):
        calls.append(key)
        if len(calls) == 3:
            raise S3Error(f"PUT s3://{bucket}/{key}: HTTP 507 InsufficientStorage", 507, "InsufficientStorage")
        return await real_put_file(self, bucket, key, path)

    monkeypatch.setattr(S3Client, "put_file", failing_put_file)
    result = hub.cli("storage", "backup", f"s3://{bucket}/failed", check=False)
    assert result.returncode == 1, result
    assert "InsufficientStorage" in result.stderr and "the 2 object(s) it had uploaded" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    remaining = asyncio.run(_keys(S3Client(seaweedfs.settings()), bucket))
    assert remaining == [], remaining
    assert not [p for p in hub.data_dir.parent.iterdir() if "s3-backup" in p.name]


async def _keys(client, bucket):
    return [o.key async for o in client.list_objects(bucket)]


def test_a_file_restore_would_refuse_is_refused_before_anything_is_uploaded(make_hub, seaweedfs):
    hub = make_hub(sites=ALPHA_BETA, **s3_env(seaweedfs))
    (hub.data_dir / "notes for the night shift.txt").write_text("left by an operator\n")
    bucket = seaweedfs.new_bucket()
    result = hub.cli("storage", "backup", f"s3://{bucket}/nightly", check=False)
    assert result.returncode == 1 and "notes for the night shift.txt" in result.stderr, result
    assert "rename it or move it out of the data folder" in result.stderr, result.stderr
    assert asyncio.run(_keys(S3Client(seaweedfs.settings()), bucket)) == []
    assert not [p for p in hub.data_dir.parent.iterdir() if "s3-backup" in p.name]


def test_sigterm_during_a_backup_removes_what_it_uploaded_and_says_so(make_hub, seaweedfs):
    hub = make_hub(sites=ALPHA_BETA, **s3_env(seaweedfs))
    with open(hub.data_dir / "big.bin", "wb") as f:  # a large file of the folder's own: 24 parts
        f.truncate(120 * 1024 * 1024)
    bucket = seaweedfs.new_bucket()
    client = S3Client(seaweedfs.settings())

    async def uploaded() -> int:
        return len(await _keys(client, bucket)) + len(await client.pending_uploads(bucket))

    backup = subprocess.Popen(
        [sys.executable, "-m", "mailhub.cli", "storage", "backup", f"s3://{bucket}/nightly"],
        env=hub.env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: asyncio.run(uploaded()) > 0 or backup.poll() is not None, timeout=60)
        assert backup.poll() is None, backup.communicate()
        backup.send_signal(signal.SIGTERM)
        out, err = backup.communicate(timeout=60)
    finally:
        if backup.poll() is None:
            backup.kill()
            backup.wait()
    assert backup.returncode == 130, (backup.returncode, err)
    assert err.startswith("mailhub: interrupted; the ") and "were removed" in err and err.count("\n") == 1, err
    assert asyncio.run(uploaded()) == 0  # no object, no pending multipart upload
    assert not [p for p in hub.data_dir.parent.iterdir() if "s3-backup" in p.name]  # nor the local copy


def test_the_local_copy_of_a_backup_that_died_is_removed_by_the_next(make_hub, seaweedfs):
    hub = make_hub(sites=ALPHA_BETA, **s3_env(seaweedfs))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process id no process has now: a backup killed with SIGKILL
    stale = hub.data_dir.parent / f".{hub.data_dir.name}-s3-backup-{dead.pid}-k1ll3d"
    (stale / "backup" / "blobs").mkdir(parents=True)
    (stale / "backup" / "blobs" / "link").write_bytes(b"a mail deleted since, kept by its hard link")
    running = hub.data_dir.parent / f".{hub.data_dir.name}-s3-backup-{os.getpid()}-running"
    running.mkdir()  # a backup still running (this process): left alone
    bucket = seaweedfs.new_bucket()
    result = hub.cli("storage", "backup", f"s3://{bucket}/nightly")
    assert "backup in s3://" in result.stdout, result
    assert not stale.exists() and running.exists()
    assert [p.name for p in hub.data_dir.parent.iterdir() if "s3-backup" in p.name] == [running.name]


def test_sigterm_during_a_restore_leaves_no_half_restore(make_hub, seaweedfs, tmp_path):
    hub = make_hub(sites=ALPHA_BETA, **s3_env(seaweedfs))
    with open(hub.data_dir / "big.bin", "wb") as f:
        f.truncate(80 * 1024 * 1024)
    bucket = seaweedfs.new_bucket()
    hub.cli("storage", "backup", f"s3://{bucket}/nightly")
    dest = tmp_path / "restored"
    restore = subprocess.Popen(
        [sys.executable, "-m", "mailhub.cli", "storage", "restore", f"s3://{bucket}/nightly", str(dest)],
        env=hub.env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: (dest / "big.bin").exists() or restore.poll() is not None, timeout=60)
        assert restore.poll() is None, restore.communicate()
        restore.send_signal(signal.SIGTERM)
        _out, err = restore.communicate(timeout=60)
    finally:
        if restore.poll() is None:
            restore.kill()
            restore.wait()
    assert restore.returncode == 130 and err.startswith("mailhub: interrupted;") and err.count("\n") == 1, err
    assert not dest.exists()  # made by the restore: removed, no half restore to be taken for a whole one
