# Tests of the abuse benchmark (bench/abuse.py, docs/abuse-benchmark.md): its hostile inputs stay
# within the limits they are meant to probe (IMAP command lines up to 64 KB, mail lines up to 998
# octets, nothing outside 127.0.0.0/8), its reading of the lag histogram, and one short run of every
# attack against a hub of this checkout in which no attacker fails and the good gateway works.
import itertools
import json
import math
import subprocess
import sys

import pytest

from bench import abuse
from bench import abuse_inputs as inputs
from bench.abuse_attacks import ATTACKS, Target

from conftest import REPO


def test_imap_commands_fit_the_command_limit():
    generators = (
        inputs.list_patterns(7),
        inputs.many_item_fetches(),
        inputs.deep_searches(),
        inputs.text_searches(),
        inputs.structure_fetches(),
    )
    for generator in generators:
        for command in itertools.islice(generator, 12):
            assert len(b"Z123 " + command + b"\r\n") <= 64 * 1024, command[:60]


def test_mails_are_valid_smtp_data():
    mails = [mail for _name, mail in inputs.hostile_mime_mails("hub.test", "a", "b", 20_000)]
    mails += [inputs.bulk_mail("hub.test", "a", "b", 1), inputs.data_filler(100_000) + b"\r\n"]
    for mail in mails:
        lines = mail.split(b"\r\n")
        assert lines[-1] == b"" and all(b"\n" not in line and b"\r" not in line for line in lines)
        assert max(len(line) for line in lines) <= 998
        assert not any(line.startswith(b".") for line in lines)


def test_wide_and_deep_mails_go_past_the_recorded_caps():
    wide = dict(inputs.hostile_mime_mails("hub.test", "a", "b", 20_000))["wide"]
    deep = dict(inputs.hostile_mime_mails("hub.test", "a", "b", 20_000))["deep"]
    assert wide.count(b"\r\n--w\r\n") == 20_000
    assert deep.count(b"Content-Type: multipart/mixed") == 2001


def test_worst_bucket_of_a_window():
    before = {0.1: 5, 0.25: 5, 1.0: 6, math.inf: 6}
    assert abuse.worst_bucket(before, {0.1: 7, 0.25: 8, 1.0: 9, math.inf: 9}) == "<= 0.25"
    assert abuse.worst_bucket(before, {0.1: 5, 0.25: 5, 1.0: 6, math.inf: 8}) == "> 1"
    assert abuse.worst_bucket(before, dict(before)) == "none"
    assert abuse.worst_bucket(None, before) == "n/a"


def test_attacks_refuse_addresses_outside_loopback():
    spec = dict(
        host="127.0.0.1",
        smtp=1,
        pop3=2,
        imap=3,
        metrics=None,
        domain="hub.test",
        password="x",
        sites={},
        sources=["127.0.10.1"],
        duration=1,
        connections=1,
        stalled_sessions=1,
        mime_parts=1,
    )
    Target(**spec)
    with pytest.raises(SystemExit):
        Target(**{**spec, "sources": ["192.0.2.1"]})
    with pytest.raises(SystemExit):
        Target(**{**spec, "host": "10.0.0.1"})


def test_every_attack_runs_against_a_hub(tmp_path):
    rows_path = tmp_path / "rows.json"
    command = [
        sys.executable,
        "-m",
        "bench.abuse",
        "--duration",
        "1",
        "--recover",
        "5",
        "--connections",
        "20",
        "--stalled-sessions",
        "4",
        "--mime-parts",
        "300",
        "--bulk-mails",
        "3",
        "--workdir",
        str(tmp_path),
        "--json",
        str(rows_path),
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(rows_path.read_text())
    assert [row["attack"] for row in rows] == [abuse.BASELINE, *ATTACKS]
    for row in rows[1:]:
        assert row["note"] != "-" and not row["note"].startswith("attacker"), row
    assert rows[0]["state"] == "ok" and rows[0]["probe_worst"] is not None, rows[0]
    for op in abuse.OPS:
        assert sum(row["ops"][op][2] - row["ops"][op][3] for row in rows) > 0, f"no good {op} operation succeeded"
    assert "| imap-list-pattern |" in result.stdout and "What each attacker saw" in result.stdout
