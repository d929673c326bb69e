# The server's running account of what each site holds and moves, for the quota and drain-time
# decisions: mailbox usage and backlog per (receiver, sender) loaded from the index at start, then
# kept by the changes storage reports after each of its transactions (so it matches the index),
# plus what the index cannot know yet (downloads in sessions still open, sizes reserved by
# transactions in flight); this UTC day's and month's volumes; cumulative download counters.
# Pure in-memory state; the caller passes figures and times. Never does I/O.
import time
from collections import defaultdict
from typing import Hashable

from .limits import SiteUsage

NO_SITE = 0     # sender key of mail from outside (a peer network): no site, no submitted quota


def _periods(now: float, _cache: dict = {}) -> tuple[str, str]:
    """UTC day and month keys of `now` (cached per second: asked several times per mail)."""
    second = int(now)
    found = _cache.get(second)
    if found is None:
        t = time.gmtime(second)
        found = time.strftime("%Y-%m-%d", t), time.strftime("%Y-%m", t)
        _cache.clear()
        _cache[second] = found
    return found


class Ledger:
    def __init__(self) -> None:
        self._held: dict[int, tuple[int, int]] = {}           # receiver -> (bytes, messages)
        self._waiting: dict[int, dict[int, int]] = {}         # receiver -> sender -> bytes
        self._volumes: dict[tuple[int, str], list[int]] = defaultdict(lambda: [0, 0])  # submitted, received
        self._reserved: dict[Hashable, list[tuple[int, int, int]]] = {}      # token -> (recv, sender, bytes)
        self._reserved_for: dict[int, dict[int, list[int]]] = {}   # their sums: recv -> sender -> [bytes, count]
        self._live_fetched: dict[int, dict[int, tuple[int, int]]] = {}     # recv -> uid -> (sender, bytes)
        self._downloaded: dict[int, int] = {}                 # site -> cumulative bytes sent to it
        self._last_poll: dict[int, float] = {}
        self._day = ""

    # ---- the index at start ------------------------------------------------------------------

    def load(self, usage, volumes, downloads) -> None:
        """The index figures at start: usage rows (receiver, sender, held_bytes, held_messages,
        waiting_bytes, waiting_messages), volumes {(site, period): (submitted, received)} and
        download counters {site: (bytes, last_poll_at)}."""
        held: dict[int, list[int]] = defaultdict(lambda: [0, 0])
        waiting: dict[int, dict[int, int]] = defaultdict(dict)
        for receiver, sender, held_bytes, held_messages, waiting_bytes, _ in usage:
            held[receiver][0] += held_bytes
            held[receiver][1] += held_messages
            if waiting_bytes > 0:
                waiting[receiver][sender] = waiting_bytes
        self._held = {site: (b, m) for site, (b, m) in held.items()}
        self._waiting = dict(waiting)
        self._volumes = defaultdict(lambda: [0, 0], {key: list(v) for key, v in volumes.items()})
        for site, (octets, last_poll) in downloads.items():
            self._downloaded[site] = octets
            self._last_poll[site] = last_poll

    # ---- what happened since (reported by storage after each transaction) -------------------

    def committed(self, sender: int | None, receivers: list[int], size: int, at: float) -> None:
        """A message was committed into the receivers' mailboxes (any path: SMTP, bounces...)."""
        sender = NO_SITE if sender is None else sender
        day, month = _periods(at)
        if day != self._day:   # forget earlier periods
            self._day = day
            self._volumes = defaultdict(lambda: [0, 0], {k: v for k, v in self._volumes.items()
                                                         if k[1] in (day, month)})
        if sender != NO_SITE:
            self._volumes[(sender, day)][0] += size
            self._volumes[(sender, month)][0] += size
        for receiver in receivers:
            held_bytes, held_messages = self._held.get(receiver, (0, 0))
            self._held[receiver] = (held_bytes + size, held_messages + 1)
            self._add_waiting(receiver, sender, size)
            self._volumes[(receiver, day)][1] += size
            self._volumes[(receiver, month)][1] += size

    def fetched_committed(self, receiver: int, uid: int, sender: int | None, size: int) -> None:
        """The index now marks a mailbox entry as downloaded."""
        self._forget_fetched(receiver, uid)
        self._add_waiting(receiver, NO_SITE if sender is None else sender, -size)

    def removed(self, receiver: int, uid: int, sender: int | None, size: int, was_waiting: bool) -> None:
        """A mailbox entry was deleted."""
        self._forget_fetched(receiver, uid)
        held_bytes, held_messages = self._held.get(receiver, (0, 0))
        self._held[receiver] = (max(held_bytes - size, 0), max(held_messages - 1, 0))
        if was_waiting:
            self._add_waiting(receiver, NO_SITE if sender is None else sender, -size)

    def _add_waiting(self, receiver: int, sender: int, size: int) -> None:
        by_sender = self._waiting.setdefault(receiver, {})
        by_sender[sender] = max(by_sender.get(sender, 0) + size, 0)

    def fetched(self, receiver: int, uid: int, sender: int | None, size: int) -> None:
        """A session downloaded an entry for the first time; the index learns it at session end.
        Until then it no longer counts as waiting."""
        self._live_fetched.setdefault(receiver, {})[uid] = (NO_SITE if sender is None else sender, size)

    def _forget_fetched(self, receiver: int, uid: int) -> None:
        entries = self._live_fetched.get(receiver)
        if entries is not None:
            entries.pop(uid, None)
            if not entries:
                del self._live_fetched[receiver]

    def reserve(self, token: Hashable, receiver: int, sender: int, size: int) -> None:
        """Count a declared size against the receiver until `release(token)` (transaction end)."""
        self._reserved.setdefault(token, []).append((receiver, sender, size))
        total = self._reserved_for.setdefault(receiver, {}).setdefault(sender, [0, 0])
        total[0] += size
        total[1] += 1

    def release(self, token: Hashable) -> None:
        for receiver, sender, size in self._reserved.pop(token, ()):
            by_sender = self._reserved_for[receiver]
            total = by_sender[sender]
            total[0] -= size
            total[1] -= 1
            if not total[1]:
                del by_sender[sender]
                if not by_sender:
                    del self._reserved_for[receiver]

    def note_poll(self, site: int, now: float) -> None:
        self._last_poll[site] = max(now, self._last_poll.get(site, 0.0))

    def note_download(self, site: int, size: int, now: float) -> None:
        self._downloaded[site] = self._downloaded.get(site, 0) + size
        self.note_poll(site, now)

    # ---- questions ---------------------------------------------------------------------------

    def waiting(self, receiver: int) -> dict[int, int]:
        """Bytes waiting for the receiver per sender: not yet downloaded, plus reservations."""
        result = dict(self._waiting.get(receiver, {}))
        for sender, (size, _count) in self._reserved_for.get(receiver, {}).items():
            result[sender] = result.get(sender, 0) + size
        for sender, size in self._live_fetched.get(receiver, {}).values():
            result[sender] = result.get(sender, 0) - size
        return {sender: b for sender, b in result.items() if b > 0}

    def usage(self, site: int, now: float, excluding: Hashable = None) -> SiteUsage:
        """The site's usage, counting the reservations of transactions in flight (but not those of
        `excluding`, the transaction asking)."""
        day, month = _periods(now)
        held_bytes, held_messages = self._held.get(site, (0, 0))
        reserved_bytes = reserved_count = 0
        for size, count in self._reserved_for.get(site, {}).values():
            reserved_bytes += size
            reserved_count += count
        for recv, _, size in self._reserved.get(excluding, ()):   # the asking transaction's own
            if recv == site:
                reserved_bytes -= size
                reserved_count -= 1
        today, this_month = self._volumes.get((site, day), (0, 0)), self._volumes.get((site, month), (0, 0))
        return SiteUsage(mailbox_bytes=held_bytes + reserved_bytes, mailbox_messages=held_messages + reserved_count,
                         submitted_today=today[0], submitted_month=this_month[0],
                         received_today=today[1], received_month=this_month[1])

    def downloaded(self, site: int) -> int:
        return self._downloaded.get(site, 0)

    def last_poll(self, site: int) -> float | None:
        return self._last_poll.get(site)

    def receivers(self) -> set[int]:
        """Sites with mail held or downloads counted."""
        return set(self._held) | set(self._downloaded)
