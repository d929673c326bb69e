# The benchmarks' SMTP load client (bench/smtp_blast.py) against a real hub: pipelined transactions
# over several sessions, bodies from 256 KB on sent with sendfile(2) from a temporary file, smaller
# ones with one write. Every mail it counts as sent is stored whole.
import asyncio
import os

import pytest

from bench import smtp_blast

from conftest import PASSWORD


@pytest.mark.parametrize("size", [10_000, 600_000], ids=["written", "sendfile"])
def test_blast_mails_arrive_whole(hub, size):
    body = smtp_blast.make_body(size)
    assert (len(body) >= smtp_blast.SENDFILE_MIN) == (size == 600_000)
    result = asyncio.run(
        smtp_blast.blast(
            "127.0.0.1",
            hub.smtp_port,
            sessions=2,
            mails=5,
            user="alpha",
            password=PASSWORD,
            mail_from="alpha@hub.test",
            rcpt="beta@hub.test",
            body=body,
        )
    )
    assert result["mails"] == 5 and result["failures"] == 0, result
    rows = hub.query("SELECT blob, blob_offset, size FROM messages")
    assert len(rows) == 5
    for blob, offset, stored in rows:
        with open(hub.data_dir / "blobs" / blob, "rb") as f:
            data = os.pread(f.fileno(), stored, offset)
        assert data.endswith(b"\r\n\r\n" + body) and b"Subject: smtp_blast " in data
