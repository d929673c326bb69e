# The participant directory document: per site its name, addresses, current key fingerprint and
# armored public key, as a dict (serialised as JSON) and as readable text; and the update document
# (only what changed between two versions: sites added, changed, removed). Pure functions plus one
# synchronous read of the index (through storage/); signing and mailing live elsewhere.
import json
import sqlite3
import time
from collections.abc import Sequence

from storage.directory_index import directory_version
from storage.sites import list_sites

from .keys import site_keys

FORMAT = "dicom-mail-hub-directory/1"
UPDATE_FORMAT = "dicom-mail-hub-directory-update/1"


def read_document(
    conn: sqlite3.Connection, hub_keys, domains: Sequence[str], directory_local_part: str, now: float | None = None
) -> dict:
    """The directory as the index holds it now; `hub_keys` is the hub's HubKeys (fingerprint and
    last rotation)."""
    return {
        "format": FORMAT,
        "version": directory_version(conn),
        "generated_at": timestamp(time.time() if now is None else now),
        "hub": hub_section(hub_keys, domains, directory_local_part),
        "participants": participants(conn),
    }


def participants(conn: sqlite3.Connection) -> list[dict]:
    """Every site's entry of the directory, by name."""
    entries = []
    for site in list_sites(conn):
        keys = site_keys(conn, site.id)
        current = keys[0] if keys and keys[0].retired_at is None else None
        entries.append(
            {
                "name": site.name,
                "addresses": site.addresses,
                "key_fingerprint": current.fingerprint if current else None,
                "encryption_key_ids": list(current.encryption_key_ids) if current else [],
                "key_imported_at": timestamp(current.imported_at) if current else None,
                "public_key": current.armored if current else None,
            }
        )
    return entries


def hub_section(hub_keys, domains: Sequence[str], directory_local_part: str) -> dict:
    return {
        "fingerprint": hub_keys.fingerprint,
        "directory_addresses": [f"{directory_local_part}@{d}" for d in domains],
        "key_rotation": hub_keys.rotation(),
    }


def update_document(base_version: int, base: dict[str, dict], document: dict) -> dict | None:
    """What changed from the participants `base` (name -> entry, as sent in version
    `base_version`) to the directory `document`: an update document, or None when no entry
    changed. Entries added or changed are whole; removed sites are named."""
    now = {entry["name"]: entry for entry in document["participants"]}
    added = [entry for name, entry in now.items() if name not in base]
    changed = [entry for name, entry in now.items() if name in base and base[name] != entry]
    removed = sorted(name for name in base if name not in now)
    if not (added or changed or removed):
        return None
    return {
        "format": UPDATE_FORMAT,
        "version": document["version"],
        "base_version": base_version,
        "generated_at": document["generated_at"],
        "hub": document["hub"],
        "participant_count": len(now),
        "added": added,
        "changed": changed,
        "removed": removed,
    }


def to_json(document: dict) -> str:
    return json.dumps(document, indent=2, ensure_ascii=True) + "\n"


def to_text(document: dict) -> str:
    if document["format"] == UPDATE_FORMAT:
        return _update_text(document)
    hub = document["hub"]
    lines = [
        "DICOM Mail Hub - participant directory",
        f"Version {document['version']}, generated {document['generated_at']}.",
        f"Signed by the hub key {group_fingerprint(hub['fingerprint'])}.",
        *_rotation_lines(hub.get("key_rotation")),
        f"Ask for it again by mail to {', '.join(hub['directory_addresses'])}.",
        f"{len(document['participants'])} participant(s):",
        "",
    ]
    lines += _entry_lines(document["participants"])
    return "\n".join(lines) + "\n"


def _update_text(update: dict) -> str:
    hub = update["hub"]
    lines = [
        "DICOM Mail Hub - participant directory update",
        f"Version {update['version']} (changes since version {update['base_version']}), generated"
        f" {update['generated_at']}.",
        f"Signed by the hub key {group_fingerprint(hub['fingerprint'])}.",
        *_rotation_lines(hub.get("key_rotation")),
        f"{update['participant_count']} participant(s) in all; the whole list by mail to"
        f" {', '.join(hub['directory_addresses'])}.",
        "",
    ]
    if update["added"]:
        lines += [f"{len(update['added'])} added:", "", *_entry_lines(update["added"])]
    if update["changed"]:
        lines += [f"{len(update['changed'])} changed:", "", *_entry_lines(update["changed"])]
    if update["removed"]:
        lines += [f"{len(update['removed'])} removed:", *(f"* {name}" for name in update["removed"]), ""]
    return "\n".join(lines) + "\n"


def _entry_lines(entries: list[dict]) -> list[str]:
    lines: list[str] = []
    for site in entries:
        lines.append(f"* {site['name']}")
        lines.append(f"  addresses: {', '.join(site['addresses'])}")
        if site["key_fingerprint"] is None:
            lines += ["  key:       none registered (mails to this site cannot be encrypted yet)", ""]
            continue
        lines.append(f"  key:       {group_fingerprint(site['key_fingerprint'])}")
        lines.append(f"  imported:  {site['key_imported_at']}")
        lines += ["", *site["public_key"].strip().splitlines(), ""]
    return lines


def _rotation_lines(rotation: dict | None) -> list[str]:
    if not rotation:
        return []
    return [
        f"The hub key replaced the previous hub key {group_fingerprint(rotation['previous_fingerprint'])}",
        f"on {rotation['rotated_at']} and is certified by it; the previous key also signs",
        f"directory mails until {rotation['previous_signs_until']}, then it is retired.",
    ]


def group_fingerprint(fingerprint: str) -> str:
    """GnuPG's way of showing a fingerprint: groups of four hex digits."""
    return " ".join(fingerprint[i : i + 4] for i in range(0, len(fingerprint), 4))


def timestamp(seconds: float) -> str:
    """ISO 8601 UTC, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
