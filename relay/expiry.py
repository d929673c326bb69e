# Expiry planning (issue 25): which unfetched mailbox entries expire now and which sites are to be
# warned, from the waiting entries (storage.lifecycle.waiting_entries) and a time. The parts of one
# study (X-TELEMEDICINE-SETID) from one sender in one mailbox expire together, when the newest of
# them is past the site's retention (never a part before its own time), so that the sender gets one
# notice per study, not one per mail. Mails without a study (receipts, mail to postmaster@) expire
# each at its own time, and those of one sender in one mailbox that expire in the same round go
# together (up to MAX_UNSTUDIED per notice): a gateway that stopped fetching must not set off one
# notice per receipt it was sent. A warning goes
# `warn_before` seconds before a group expires, once per entry, never for mail from the null sender
# (the hub's own notices, bounces: they expire silently). Pure: no I/O, the time is passed in.
from collections.abc import Iterable
from dataclasses import dataclass, field

from storage.lifecycle import ExpiryGroup, Waiting, WarningGroup

DAY = 86400.0
MAX_UNSTUDIED = 500  # mails without a study in one expiry group (one notice; one transaction at most)


@dataclass
class Plan:
    expire: list[ExpiryGroup] = field(default_factory=list)
    warn: list[WarningGroup] = field(default_factory=list)
    entries: dict[int, Waiting] = field(default_factory=dict)  # uid -> entry, of both lists

    def expiring(self) -> list[Waiting]:
        return [self.entries[uid] for group in self.expire for uid in group.uids]

    def warned(self) -> list[Waiting]:
        return [self.entries[uid] for group in self.warn for uid in group.uids]


def sender_key(address: str) -> str:
    """The sender as groups compare it: ASCII letters in lower case, as SQLite's lower() does
    (storage.lifecycle.waiting_entries reads whole groups by it)."""
    return address.encode("utf-8", "surrogateescape").lower().decode("utf-8", "surrogateescape")


def plan(entries: Iterable[Waiting], now: float, warn_before: float) -> Plan:
    """What expires at `now` and which entries are to be warned of (warn_before seconds ahead; 0:
    no warnings)."""
    groups: dict[tuple[int, str, str], list[Waiting]] = {}
    for e in entries:
        if e.retention_days <= 0:
            continue
        study = f"set:{e.set_id}" if e.set_id else f"mail:{e.queue_id}"
        groups.setdefault((e.site_id, study, sender_key(e.mail_from)), []).append(e)
    result = Plan()
    warnings: dict[int, WarningGroup] = {}
    for members in groups.values():
        first = members[0]
        expires_at = max(e.delivered_at for e in members) + first.retention_days * DAY
        if expires_at <= now:
            result.expire.append(
                ExpiryGroup(
                    first.site_id,
                    first.site,
                    first.mail_from,
                    first.set_id,
                    [e.uid for e in members],
                    first.retention_days,
                )
            )
            result.entries.update((e.uid, e) for e in members)
        elif warn_before > 0 and expires_at - warn_before <= now:
            unwarned = [e for e in members if e.warned_at is None and e.mail_from]  # hub notices (<>): none
            if not unwarned:
                continue
            group = warnings.setdefault(first.site_id, WarningGroup(first.site_id, first.site, first.site_address, []))
            for e in unwarned:
                group.uids.append(e.uid)
                group.expires_at[e.uid] = expires_at
                result.entries[e.uid] = e
    result.warn = list(warnings.values())
    result.expire = _merge_unstudied(result.expire)
    return result


def _merge_unstudied(groups: list[ExpiryGroup]) -> list[ExpiryGroup]:
    """The groups with the expiring mails without a study of one sender in one mailbox merged, in
    groups of at most MAX_UNSTUDIED mails."""
    merged: list[ExpiryGroup] = []
    open_groups: dict[tuple[int, str], ExpiryGroup] = {}
    for group in groups:
        if group.set_id:
            merged.append(group)
            continue
        key = (group.site_id, sender_key(group.sender))
        into = open_groups.get(key)
        if into is None or len(into.uids) + len(group.uids) > MAX_UNSTUDIED:
            open_groups[key] = group
            merged.append(group)
        else:
            into.uids.extend(group.uids)
    return merged
