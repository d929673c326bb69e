# Expiry planning (issue 25): which unfetched mailbox entries expire now and which sites are to be
# warned, from the waiting entries (storage.lifecycle.waiting_entries) and a time. The parts of one
# study (X-TELEMEDICINE-SETID) from one sender in one mailbox expire together, when the newest of
# them is past the site's retention (never a part before its own time), so that the sender gets one
# notice per study, not one per mail. A mail without a study is a group of its own. A warning goes
# `warn_before` seconds before a group expires, once per entry, never for mail from the null sender
# (the hub's own notices, bounces: they expire silently). Pure: no I/O, the time is passed in.
from collections.abc import Iterable
from dataclasses import dataclass, field

from storage.lifecycle import ExpiryGroup, Waiting, WarningGroup

DAY = 86400.0


@dataclass
class Plan:
    expire: list[ExpiryGroup] = field(default_factory=list)
    warn: list[WarningGroup] = field(default_factory=list)
    entries: dict[int, Waiting] = field(default_factory=dict)  # uid -> entry, of both lists

    def expiring(self) -> list[Waiting]:
        return [self.entries[uid] for group in self.expire for uid in group.uids]

    def warned(self) -> list[Waiting]:
        return [self.entries[uid] for group in self.warn for uid in group.uids]


def plan(entries: Iterable[Waiting], now: float, warn_before: float) -> Plan:
    """What expires at `now` and which entries are to be warned of (warn_before seconds ahead; 0:
    no warnings)."""
    groups: dict[tuple[int, str, str], list[Waiting]] = {}
    for e in entries:
        if e.retention_days <= 0:
            continue
        study = f"set:{e.set_id}" if e.set_id else f"mail:{e.queue_id}"
        groups.setdefault((e.site_id, study, e.mail_from.lower()), []).append(e)
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
    return result
