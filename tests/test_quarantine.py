# storage.quarantine: items are moved aside with a reason record, never deleted; ranges copied.
import errno
import json
import os
from unittest import mock

import pytest

from storage import quarantine as q


def _data(tmp_path):
    data = tmp_path / "data"
    (data / "blobs" / "2026010112").mkdir(parents=True)
    return data


def test_a_file_is_moved_with_its_reason(tmp_path):
    data = _data(tmp_path)
    blob = data / "blobs" / "2026010112" / "ABC"
    blob.write_bytes(b"x" * 1000)
    entry = q.quarantine(data, blob, "orphan_blob", "no index row", queue_id="ABC", now=1767268800.0)
    assert not blob.exists()
    assert (entry / "ABC").read_bytes() == b"x" * 1000
    assert entry.parent.name == "20260101" and entry.parent.parent == data / "quarantine"
    record = json.loads((entry / q.RECORD_NAME).read_text())
    assert record["original"] == "blobs/2026010112/ABC"
    assert record["reason"] == "orphan_blob" and record["size"] == 1000 and record["queue_id"] == "ABC"
    [listed] = q.list_entries(data)
    assert listed.original == "blobs/2026010112/ABC" and listed.moved and listed.size == 1000
    assert listed.extra == {"queue_id": "ABC"}
    assert q.summary(data) == (1, 1000)


def test_same_name_twice_gets_two_entries_and_folders_move_whole(tmp_path):
    data = _data(tmp_path)
    for _ in range(2):
        stray = data / "spool" / "junk"
        stray.mkdir(parents=True)
        (stray / "a").write_bytes(b"12345")
        q.quarantine(data, stray, "stray", now=1767268800.0)
        assert not stray.exists()
    entries = q.list_entries(data)
    assert len(entries) == 2 and entries[0].id != entries[1].id
    assert all((e.path / "junk" / "a").read_bytes() == b"12345" and e.size == 5 for e in entries)


def test_a_range_is_copied_and_the_file_stays(tmp_path):
    data = _data(tmp_path)
    pack = data / "blobs" / "2026010112" / "PACK"
    pack.write_bytes(b"aaaa" + b"BBBBBB" + b"cc")
    entry = q.quarantine(data, pack, "damaged", "sha256 differs", byte_range=(4, 6), queue_id="Q2")
    assert pack.read_bytes() == b"aaaaBBBBBBcc"
    assert (entry / "PACK@4").read_bytes() == b"BBBBBB"
    [listed] = q.list_entries(data)
    assert listed.size == 6 and listed.extra == {"offset": 4, "length": 6, "queue_id": "Q2"}


def test_a_failed_move_leaves_the_item_and_no_entry(tmp_path):
    data = _data(tmp_path)
    blob = data / "blobs" / "2026010112" / "ABC"
    blob.write_bytes(b"keep me")
    with mock.patch.object(q.os, "rename", side_effect=OSError(errno.ENOSPC, "No space left on device")):
        with pytest.raises(OSError):
            q.quarantine(data, blob, "orphan_blob")
    assert blob.read_bytes() == b"keep me"
    assert q.list_entries(data) == []


def test_across_file_systems_the_item_is_copied_then_removed(tmp_path):
    data = _data(tmp_path)
    blob = data / "blobs" / "2026010112" / "ABC"
    blob.write_bytes(b"payload")
    real_rename = os.rename

    def rename(src, dst):
        if str(src) == str(blob):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_rename(src, dst)

    with mock.patch.object(q.os, "rename", side_effect=rename):
        entry = q.quarantine(data, blob, "orphan_blob")
    assert not blob.exists() and (entry / "ABC").read_bytes() == b"payload"


def test_an_entry_whose_item_never_arrived_is_listed_as_not_moved(tmp_path):
    data = _data(tmp_path)
    entry = data / "quarantine" / "20260101" / "120000-1-blobs_x"
    entry.mkdir(parents=True)
    (entry / q.RECORD_NAME).write_text(
        json.dumps({"original": "blobs/x", "reason": "orphan_blob", "at": 1.0, "size": 3})
    )
    (data / "quarantine" / "20260101" / "damaged-entry").mkdir()
    entries = q.list_entries(data)
    assert {(e.original, e.moved) for e in entries} == {("?", False), ("blobs/x", False)}
    assert {e.reason for e in entries} == {"orphan_blob", "unknown"}


def test_outside_the_data_folder_is_refused(tmp_path):
    data = _data(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.write_text("x")
    with pytest.raises(ValueError):
        q.quarantine(data, outside, "stray")
    assert outside.exists()
