# The server's running account of what each site holds and moves, for the quota and drain-time
# decisions: mailbox usage and backlog per (receiver, sender) loaded from the index at start, then
# kept by the changes storage reports after each of its transactions (so it matches the index),
# plus what the index cannot know yet (downloads in sessions still open, sizes reserved by
# transactions in flight); volumes per UTC day and month; cumulative download counters. With several
# nodes, also the other nodes' reservations in flight, as each last told them (their snapshots,
# forgotten once too old: a node that died leaves nothing behind for long). A node's snapshot and
# its commits travel apart (its cluster link, its index writer's transactions), so a snapshot taken
# before one of its commits may come after it: each names the node's last group commit it had
# counted, and the mails of a commit heard since are taken out of it (never counted twice).
# Pure in-memory state; the caller passes figures and times. Never does I/O.
#
# Two clocks (see docs/integrity.md): a mail's arrival time and the UTC day and month it counts
# for are wall-clock facts (the index's triggers count by the same arrival time, so both agree);
# poll times, which only ever serve to measure durations, are on the caller's monotonic clock.
# Volumes are kept for every period of the last VOLUME_WINDOW_DAYS days (and their months), not
# only the current ones: a wall clock stepped back across midnight (NTP, a VM resumed) finds the
# earlier day's counts still there, and stepped forward again finds today's, so no count is
# dropped or counted twice whichever way the clock moves.
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping

from .limits import SiteUsage

NO_SITE = 0  # sender key of mail from outside (a peer network): no site, no submitted quota
VOLUME_WINDOW_DAYS = 40  # days of volume periods kept (a wall-clock step within it loses nothing)
MAX_NODES = 64  # other nodes whose reservations in flight are counted at once
MAX_ENDED = 1000  # another node's commits kept per node to take out of an older snapshot of its


def volume_window(wall: float) -> tuple[str, str]:
    """The oldest UTC day and month key kept at wall time `wall` (the index loads the same)."""
    return _periods(wall - VOLUME_WINDOW_DAYS * 86400)


_PERIODS_CACHE: dict[int, tuple[str, str]] = {}  # the last second asked: its day and month keys


def _periods(now: float) -> tuple[str, str]:
    """UTC day and month keys of `now` (cached per second: asked several times per mail)."""
    second = int(now)
    found = _PERIODS_CACHE.get(second)
    if found is None:
        t = time.gmtime(second)
        found = time.strftime("%Y-%m-%d", t), time.strftime("%Y-%m", t)
        _PERIODS_CACHE.clear()
        _PERIODS_CACHE[second] = found
    return found


class Ledger:
    def __init__(self) -> None:
        self._held: dict[int, tuple[int, int]] = {}  # receiver -> (bytes, messages)
        self._waiting: dict[int, dict[int, int]] = {}  # receiver -> sender -> bytes
        self._volumes: dict[tuple[int, str], list[int]] = defaultdict(lambda: [0, 0])  # submitted, received
        self._reserved: dict[Hashable, list[tuple[int, int, int]]] = {}  # token -> (recv, sender, bytes)
        self._reserved_for: dict[int, dict[int, list[int]]] = {}  # their sums: recv -> sender -> [bytes, count]
        self._submitting: dict[int, dict[Hashable, int]] = {}  # sender -> token -> bytes reserved
        self._live_fetched: dict[int, dict[int, tuple[int, int]]] = {}  # recv -> uid -> (sender, bytes)
        self._downloaded: dict[int, int] = {}  # site -> cumulative bytes sent to it
        self._last_poll: dict[int, float] = {}  # site -> monotonic time of its latest poll
        self._latest_day = ""  # the latest UTC day a commit counted for
        # other nodes' reservations in flight: node -> (monotonic time told, rows, submitting), and
        # their sums over every node (receiver -> sender -> [bytes, count]; sender -> bytes)
        self._remote: dict[str, tuple[float, list[tuple[int, int, int, int]], list[tuple[int, int]], int | None]] = {}
        # other nodes' commits heard, newest last: node -> [(group commit, monotonic time heard,
        # sender, receivers, stored size)], kept until a snapshot of the node counts them
        self._ended: dict[str, list[tuple[int, float, int, list[int], int]]] = {}
        self._remote_for: dict[int, dict[int, list[int]]] = {}
        self._remote_submitting: dict[int, int] = {}
        self.on_reserved: Callable[[], None] | None = None  # called when this node's reservations change

    # ---- the index at start ------------------------------------------------------------------

    def load(
        self,
        usage: Iterable[tuple[int, int, int, int, int, int]],
        volumes: Mapping[tuple[int, str], tuple[int, int]],
        downloads: Mapping[int, tuple[int, float]],
        now: float = 0.0,
        wall: float = 0.0,
    ) -> None:
        """The index figures at start: usage rows (receiver, sender, held_bytes, held_messages,
        waiting_bytes, waiting_messages), volumes {(site, period): (submitted, received)} of the
        periods since volume_window(wall), and download counters {site: (bytes, last_poll_at)}
        with Unix poll times, put on the monotonic clock by `now` (monotonic) and `wall` (Unix),
        read together."""
        self.resync(usage, volumes)
        for site, (octets, last_poll) in downloads.items():
            self._downloaded[site] = octets
            self._last_poll[site] = now - max(wall - last_poll, 0.0)  # its age, as the wall clock tells

    def resync(
        self,
        usage: Iterable[tuple[int, int, int, int, int, int]],
        volumes: Mapping[tuple[int, str], tuple[int, int]],
    ) -> None:
        """The index's usage rows and volumes again (as `load` reads them), after reports may have
        been missed (several nodes: a cluster link that was down); reservations, live fetches,
        download counters and polls stay."""
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

    # ---- what happened since (reported by storage after each transaction) -------------------

    def committed(self, sender: int | None, receivers: list[int], size: int, at: float) -> None:
        """A message was committed into the receivers' mailboxes (any path: SMTP, bounces...)."""
        sender = NO_SITE if sender is None else sender
        day, month = _periods(at)
        if day > self._latest_day:  # a new day: forget periods older than the window
            self._latest_day = day
            oldest_day, oldest_month = volume_window(at)
            self._volumes = defaultdict(
                lambda: [0, 0],
                {
                    k: v
                    for k, v in self._volumes.items()
                    if k[1] >= (oldest_day if len(k[1]) == len(oldest_day) else oldest_month)
                },
            )
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
        """Count a mail of `size` bytes against the receiver's mailbox (bytes and one message) and
        received volumes, and once against the sender's submitted volumes, until `release(token)`."""
        self._reserved.setdefault(token, []).append((receiver, sender, size))
        total = self._reserved_for.setdefault(receiver, {}).setdefault(sender, [0, 0])
        total[0] += size
        total[1] += 1
        if sender != NO_SITE:  # one mail to several receivers is submitted once
            by_token = self._submitting.setdefault(sender, {})
            by_token[token] = max(by_token.get(token, 0), size)
        if self.on_reserved is not None:
            self.on_reserved()

    def release(self, token: Hashable) -> None:
        held = self._reserved.pop(token, ())
        for receiver, sender, size in held:
            by_sender = self._reserved_for[receiver]
            total = by_sender[sender]
            total[0] -= size
            total[1] -= 1
            if not total[1]:
                del by_sender[sender]
                if not by_sender:
                    del self._reserved_for[receiver]
            by_token = self._submitting.get(sender)
            if by_token is not None and by_token.pop(token, None) is not None and not by_token:
                del self._submitting[sender]
        if held and self.on_reserved is not None:
            self.on_reserved()

    def reserved(self) -> int:
        """Reservations held (transactions in flight): 0 when the hub is idle."""
        return len(self._reserved)

    # ---- other nodes' reservations (several nodes: what each told last) -----------------------

    def reservations(self) -> tuple[list[tuple[int, int, int, int]], list[tuple[int, int]]]:
        """This node's reservations in flight, as the other nodes are told them: rows (receiver,
        sender, bytes, mails) and the senders' submitted bytes (sender, bytes)."""
        rows = [
            (receiver, sender, size, count)
            for receiver, by_sender in self._reserved_for.items()
            for sender, (size, count) in by_sender.items()
        ]
        return rows, [(sender, sum(by_token.values())) for sender, by_token in self._submitting.items()]

    def node_reserved(
        self,
        node: str,
        rows: list[tuple[int, int, int, int]],
        submitting: list[tuple[int, int]],
        now: float,
        counted: int | None = None,
    ) -> None:
        """Another node's reservations in flight, as it last told them (in place of what it told
        before) at monotonic time `now`; `counted`: its last group commit whose mails it had
        counted then (the mails of its later commits heard here are not counted in it again)."""
        ended = self._ended.get(node)
        if ended and counted is not None:
            ended[:] = [e for e in ended if e[0] > counted]  # counted in this snapshot: no longer needed
            if not ended:
                del self._ended[node]
        if rows or submitting:
            if node not in self._remote and len(self._remote) >= MAX_NODES:
                return  # (payloads are not trusted: a flood of made-up node names stays bounded)
            self._remote[node] = (now, rows, submitting, counted)
        elif self._remote.pop(node, None) is None:
            return
        self._sum_remote()

    def node_committed(
        self, node: str, seq: int, mails: list[tuple[int | None, list[int], int, float]], now: float
    ) -> None:
        """Another node's group commit `seq` (its committed rows: sender, receivers, size, time),
        heard at monotonic time `now` after the ledger counted its mails: the reservations of these
        mails end here, in the snapshot of that node counted now and in any older one still to come."""
        if not mails or (node not in self._ended and len(self._ended) >= MAX_NODES):
            return
        ended = self._ended.setdefault(node, [])
        for sender, receivers, size, _at in mails:
            ended.append((seq, now, NO_SITE if sender is None else sender, receivers, size))
        del ended[:-MAX_ENDED]
        if node in self._remote:
            self._sum_remote()

    def forget_remote(self, before: float) -> list[str]:
        """Forget the reservations of nodes that told nothing since monotonic time `before` (a node
        with mail in flight tells them again every second or so): the nodes forgotten. Commits of
        other nodes heard before then are forgotten too (a snapshot older than them came by now)."""
        gone = [node for node, (told, _, _, _) in self._remote.items() if told < before]
        for node in gone:
            del self._remote[node]
        for node, ended in list(self._ended.items()):
            ended[:] = [e for e in ended if e[1] >= before]
            if not ended:
                del self._ended[node]
        if gone:
            self._sum_remote()
        return gone

    def _sum_remote(self) -> None:
        total: dict[int, dict[int, list[int]]] = {}
        submitting: dict[int, int] = {}
        for node, (_, rows, sent, counted) in self._remote.items():
            for receiver, sender, size, count in rows:
                pair = total.setdefault(receiver, {}).setdefault(sender, [0, 0])
                pair[0] += size
                pair[1] += count
            for sender, size in sent:
                submitting[sender] = submitting.get(sender, 0) + size
            if counted is None:
                continue
            for seq, _, sender, receivers, size in self._ended.get(node, ()):
                if seq <= counted:
                    continue
                for receiver in receivers:  # (a snapshot taken before RCPT may lack it: never below 0)
                    reserved = total.get(receiver, {}).get(sender)
                    if reserved is not None:
                        reserved[0] = max(reserved[0] - size, 0)
                        reserved[1] = max(reserved[1] - 1, 0)
                if sender in submitting:
                    submitting[sender] = max(submitting[sender] - size, 0)
        for by_sender in total.values():
            for sender in [s for s, (size, count) in by_sender.items() if not count]:
                del by_sender[sender]
        self._remote_for = {receiver: by_sender for receiver, by_sender in total.items() if by_sender}
        self._remote_submitting = {sender: size for sender, size in submitting.items() if size}

    def note_poll(self, site: int, now: float) -> None:
        """The site logged in at monotonic time `now`."""
        self._last_poll[site] = max(now, self._last_poll.get(site, now))

    def note_download(self, site: int, size: int, now: float) -> None:
        """`size` bytes were sent to the site (at monotonic time `now`)."""
        self._downloaded[site] = self._downloaded.get(site, 0) + size
        self.note_poll(site, now)

    # ---- questions ---------------------------------------------------------------------------

    def waiting(self, receiver: int) -> dict[int, int]:
        """Bytes waiting for the receiver per sender: not yet downloaded, plus reservations (every
        node's)."""
        result = dict(self._waiting.get(receiver, {}))
        for reserved in (self._reserved_for, self._remote_for):
            for sender, (size, _count) in reserved.get(receiver, {}).items():
                result[sender] = result.get(sender, 0) + size
        for sender, size in self._live_fetched.get(receiver, {}).values():
            result[sender] = result.get(sender, 0) - size
        return {sender: b for sender, b in result.items() if b > 0}

    def held(self, site: int) -> tuple[int, int]:
        """(bytes, messages) the site's mailbox holds as committed (no transactions in flight)."""
        return self._held.get(site, (0, 0))

    def mailbox(self, site: int, excluding: Hashable = None, other_nodes: bool = True) -> tuple[int, int]:
        """(bytes, messages) the site's mailbox holds, counting the reservations of transactions
        in flight, other nodes' too unless `other_nodes` is false (but not those of `excluding`,
        the transaction asking)."""
        held_bytes, held_messages = self._held.get(site, (0, 0))
        for reserved in (self._reserved_for, self._remote_for) if other_nodes else (self._reserved_for,):
            for size, count in reserved.get(site, {}).values():
                held_bytes += size
                held_messages += count
        for recv, _, size in self._reserved.get(excluding, ()):  # the asking transaction's own
            if recv == site:
                held_bytes -= size
                held_messages -= 1
        return held_bytes, held_messages

    def usage(self, site: int, wall: float, excluding: Hashable = None, other_nodes: bool = True) -> SiteUsage:
        """The site's usage: its mailbox (see `mailbox`) and its volumes of the UTC day and month
        of Unix time `wall`, both counting the reservations of transactions in flight, other
        nodes' too unless `other_nodes` is false (but not those of `excluding`): a mail in flight
        counts for the period it is in flight in."""
        day, month = _periods(wall)
        held_bytes, held_messages = self.mailbox(site, excluding, other_nodes)
        received = sum(size for size, _ in self._reserved_for.get(site, {}).values())
        if other_nodes:
            received += sum(size for size, _ in self._remote_for.get(site, {}).values())
        received -= sum(size for recv, _, size in self._reserved.get(excluding, ()) if recv == site)
        submitting = self._submitting.get(site)
        submitted = self._remote_submitting.get(site, 0) if other_nodes else 0
        if submitting:
            submitted += sum(submitting.values()) - submitting.get(excluding, 0)
        today, this_month = self._volumes.get((site, day), (0, 0)), self._volumes.get((site, month), (0, 0))
        return SiteUsage(
            mailbox_bytes=held_bytes,
            mailbox_messages=held_messages,
            submitted_today=today[0] + submitted,
            submitted_month=this_month[0] + submitted,
            received_today=today[1] + received,
            received_month=this_month[1] + received,
        )

    def downloaded(self, site: int) -> int:
        return self._downloaded.get(site, 0)

    def last_poll(self, site: int) -> float | None:
        return self._last_poll.get(site)

    def receivers(self) -> set[int]:
        """Sites with mail held or downloads counted."""
        return set(self._held) | set(self._downloaded)
