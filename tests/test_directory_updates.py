# Directory updates coalesced: changes seen within directory.update_delay go out as one update per
# site, carrying only what changed since the version sent before (sites added, changed, removed),
# so that ten sites added in a row to a directory of thirty mean one small mail per site, not ten
# copies of the whole list. The update format is documented in docs/gateway-guide.md.
import email
import json
import threading

import pytest

from directory import mailer
from mailhub import control
from storage import db
from storage.sites import add_site

from conftest import PASSWORD, wait_for

# The stop of a hub waits for the directory mailer's work under way (the record of what was sent,
# written in its thread), up to a bound, so that a stopped hub writes nothing more.
# Every test that starts a hub runs on SQLite and again on PostgreSQL (tests/conftest.py).
pytestmark = [pytest.mark.both_engines, pytest.mark.usefixtures("cheaper_site_passwords")]


def site_names(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i:02d}" for i in range(count)]


def add_sites(hub, names: list[str]) -> None:
    """Add sites as `mailhub site add` does, on one connection (a CLI run per site costs more)."""
    conn = hub.db() if hub.index_url else db.connect(hub.data_dir)  # SQLite: made with its schema if new
    try:
        for name in names:
            add_site(conn, name, [f"{name}@hub.test"], PASSWORD, ["hub.test"])
    finally:
        conn.close()


def assert_first_record(hub) -> None:
    """The first start of an index counts what is there as sent: the hub records it
    (directory-sent.json) before it says it is ready, so that a site added after that is a change."""
    assert (hub.data_dir / mailer.SENT_FILE).exists(), "no record of what was there at the first start"


def mails_by_site(hub) -> dict[str, list[str]]:
    rows = hub.query("SELECT s.name, m.queue_id FROM mailbox m JOIN sites s ON s.id = m.site_id ORDER BY m.uid")
    mails: dict[str, list[str]] = {}
    for name, queue_id in rows:
        mails.setdefault(name, []).append(queue_id)
    return mails


def json_part(raw: bytes) -> tuple[bytes, dict]:
    message = email.message_from_bytes(raw)
    signed, _signature = message.get_payload()
    attachment = signed.get_payload()[1]
    assert attachment.get_filename() == "directory.json"
    data = attachment.get_payload(decode=True)
    return data, json.loads(data)


def test_ten_sites_added_within_the_window_make_one_update_of_the_size_of_the_change(make_hub):
    hub = make_hub(MAILHUB_DIRECTORY_NOTIFY_ON_CHANGE="true", MAILHUB_DIRECTORY_UPDATE_DELAY="600")
    hub.data_dir.mkdir(parents=True)
    add_sites(hub, site_names("old", 20))
    hub.start()
    assert_first_record(hub)  # at once: the first new site below is a change
    new = site_names("new", 10)
    add_sites(hub, new[:1])
    wait_for(lambda: "the update goes out in 600 s" in hub.log_text(), 15, message="the mailer did not see the change")
    add_sites(hub, new[1:])  # within the window: the same update
    assert hub.query("SELECT count(*) FROM mailbox") == [(0,)]  # held back for the window

    sent = control.request(hub.data_dir, "hub-key-announce")  # what `rotate-key` asks: send what is due now
    assert sent["kind"] == "update" and sent["sites"] == 30
    assert (sent["added"], sent["changed"], sent["removed"]) == (10, 0, 0)
    mails = mails_by_site(hub)
    assert sorted(mails) == sorted(site_names("old", 20) + new)
    assert all(len(queue_ids) == 1 for queue_ids in mails.values())  # one update each
    assert len({q for queue_ids in mails.values() for q in queue_ids}) == 1  # one stored copy for all

    raw = hub.stored(mails["old00"][0])
    data, update = json_part(raw)
    assert update["format"] == "dicom-mail-hub-directory-update/1"
    assert [entry["name"] for entry in update["added"]] == new
    assert update["changed"] == [] and update["removed"] == [] and update["participant_count"] == 30
    assert email.message_from_bytes(raw)["X-DICOM-Mail-Hub-Directory-Version"] == str(update["version"])
    # of the size of the change: ten entries and the hub's section, where the whole list has thirty
    full_mail = hub.cli("directory", "export", "--format", "signed").stdout.encode().replace(b"\n", b"\r\n")
    full_data, full = json_part(full_mail)
    assert len(full["participants"]) == 30
    per_entry = (len(full_data) - len(json.dumps({**full, "participants": []}, indent=2))) / 30
    overhead = len(json.dumps({**update, "added": []}, indent=2))
    assert abs(len(data.replace(b"\r\n", b"\n")) - (overhead + 10 * per_entry)) < per_entry, (len(data), per_entry)
    assert len(full_mail) - len(raw) > 15 * per_entry, (len(raw), len(full_mail))  # 20 entries less, twice (text, JSON)

    # nothing more is due; a removal is one more update naming the site, based on the version sent
    assert control.request(hub.data_dir, "hub-key-announce")["kind"] is None
    hub.cli("site", "remove", "old05")
    sent = control.request(hub.data_dir, "hub-key-announce")
    assert sent["kind"] == "update" and sent["sites"] == 29 and (sent["added"], sent["removed"]) == (0, 1)
    (queue_id,) = {q for q in mails_by_site(hub)["new09"] if q not in mails["new09"]}
    _, removal = json_part(hub.stored(queue_id))
    assert removal["removed"] == ["old05"] and removal["added"] == removal["changed"] == []
    assert removal["base_version"] == update["version"] < removal["version"]


def test_without_a_record_of_what_was_sent_the_update_is_the_whole_directory(make_hub):
    hub = make_hub(MAILHUB_DIRECTORY_NOTIFY_ON_CHANGE="true", MAILHUB_DIRECTORY_UPDATE_DELAY="600")
    hub.data_dir.mkdir(parents=True)
    add_sites(hub, site_names("old", 3))
    hub.start()
    assert_first_record(hub)
    hub.stop()
    (hub.data_dir / "directory-sent.json").write_text("{not json")  # damaged (or an older hub's folder)
    add_sites(hub, ["late"])
    hub.start()
    sent = control.request(hub.data_dir, "hub-key-announce")
    assert sent["kind"] == "update" and sent["whole"] == 4
    (queue_id,) = mails_by_site(hub)["late"]
    _, document = json_part(hub.stored(queue_id))
    assert document["format"] == "dicom-mail-hub-directory/1" and len(document["participants"]) == 4
    assert "unusable" in hub.log_text()
    # the record is written again: the next change is an update of its own size
    add_sites(hub, ["later"])
    sent = control.request(hub.data_dir, "hub-key-announce")
    assert (sent["added"], sent["changed"], sent["removed"]) == (1, 0, 0)
    assert isinstance(json.loads((hub.data_dir / "directory-sent.json").read_text())["participants"], dict)
    ((sent_version,),) = hub.query("SELECT value FROM meta WHERE key = 'directory_sent_version'")
    assert json.loads((hub.data_dir / "directory-sent.json").read_text())["version"] == sent_version


def _hold_the_first_record(monkeypatch) -> tuple[threading.Event, threading.Event, list[str]]:
    """The mailer's writes of its record wait for `held`; `writing` is set when one waits; `order`
    gets "record written" after each. The hub's start waits for the first one only 0.2 s."""
    monkeypatch.setattr(mailer, "_FIRST_LOOK_WAIT", 0.2)
    held, writing, order = threading.Event(), threading.Event(), []
    save = mailer.DirectoryMailer._save_sent

    def held_save(self, document):
        writing.set()
        held.wait(60)
        save(self, document)
        order.append("record written")

    monkeypatch.setattr(mailer.DirectoryMailer, "_save_sent", held_save)
    return held, writing, order


def _stop_in_a_thread(hub, order: list[str]) -> threading.Thread:
    stopping = threading.Thread(target=lambda: (hub.stop(), order.append("stopped")))
    stopping.start()
    return stopping


def test_a_stop_waits_for_the_record_the_mailer_is_writing(make_hub, monkeypatch):
    hub = make_hub()
    hub.data_dir.mkdir(parents=True)
    add_sites(hub, site_names("old", 2))
    held, writing, order = _hold_the_first_record(monkeypatch)
    try:
        hub.start()  # its first start writes the record of what the sites have
        assert writing.wait(60), "the mailer never wrote its first record"
        stopping = _stop_in_a_thread(hub, order)
        stopping.join(1.0)  # a stop that does not wait for the mailer returns meanwhile
    finally:
        held.set()
    stopping.join(60)
    assert order == ["record written", "stopped"]
    assert json.loads((hub.data_dir / "directory-sent.json").read_text())["participants"].keys() == {"old00", "old01"}


def test_a_start_waits_for_a_slow_first_record_only_so_long(make_hub, monkeypatch):
    hub = make_hub()
    hub.data_dir.mkdir(parents=True)
    add_sites(hub, site_names("old", 2))
    held, writing, order = _hold_the_first_record(monkeypatch)  # an index that does not answer
    try:
        hub.start(wait=10)  # ready while the record is held: a slow index does not hold up the start
        assert writing.wait(60) and order == []  # (the look may outlast 0.2 s before it reaches the write)
        assert "the index did not answer within 0.2 s of the start; retrying" in hub.log_text()
    finally:
        held.set()
    wait_for(lambda: order == ["record written"], message="the held record is written once let go")
    assert json.loads((hub.data_dir / "directory-sent.json").read_text())["participants"].keys() == {"old00", "old01"}


def test_a_stop_waits_for_the_mailer_only_so_long(make_hub, monkeypatch):
    monkeypatch.setattr(mailer, "_STOP_WAIT", 0.3)
    hub = make_hub()
    hub.data_dir.mkdir(parents=True)
    add_sites(hub, site_names("old", 2))
    held, writing, order = _hold_the_first_record(monkeypatch)
    try:
        hub.start()
        assert writing.wait(60), "the mailer never wrote its first record"
        stopping = _stop_in_a_thread(hub, order)
        stopping.join(60)
        assert order == ["stopped"]
        assert "job(s) still running in the mailer's threads after 0.3 s" in hub.log_text()
    finally:
        held.set()
    wait_for(lambda: order == ["stopped", "record written"], message="the held write ends")
