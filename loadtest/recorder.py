# What happened during a run, as plain records with times relative to the run's start: mails
# submitted/accepted/rejected, deferrals, mails downloaded, server backlog readings. Shared by the
# drivers (one event loop, no locks needed). Must never do I/O or judge the run (checks.py does).
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class Sent:
    message_id: str
    sender: str
    receiver: str
    size: int
    submit_s: float  # first attempt began
    accepted_s: float | None = None
    attempts: int = 0
    outcome: str = "pending"  # pending, accepted, rejected, gave-up
    reply: str = ""


@dataclass
class Received:
    message_id: str
    receiver: str
    at_s: float  # download finished (RETR/FETCH complete)
    size: int
    body_sha256: str
    path: str  # where the raw mail was saved for the deep check


@dataclass
class Recorder:
    t0: float = field(default_factory=time.monotonic)
    sent: dict = field(default_factory=dict)  # message_id -> Sent
    received: list = field(default_factory=list)  # [Received]
    deferrals: list = field(default_factory=list)  # [(t, site, reply)]
    backlog: dict = field(default_factory=lambda: defaultdict(list))  # receiver -> [(t, count, bytes)]
    errors: list = field(default_factory=list)  # [(t, who, text)]
    accepted_count: int = 0
    accepted_bytes: int = 0
    received_count: int = 0
    received_bytes: int = 0
    pending_by_receiver: dict = field(default_factory=lambda: defaultdict(int))
    downloaded_ids: set = field(default_factory=set)
    smtp_sessions: int = 0
    smtp_tls_sessions: int = 0

    def now(self) -> float:
        return time.monotonic() - self.t0

    def submit(self, message_id: str, sender: str, receiver: str, size: int) -> Sent:
        record = self.sent.get(message_id)
        if record is None:
            record = self.sent[message_id] = Sent(message_id, sender, receiver, size, self.now())
        record.attempts += 1
        return record

    def accepted(self, record: Sent, reply: str) -> None:
        record.accepted_s, record.outcome, record.reply = self.now(), "accepted", reply
        self.accepted_count += 1
        self.accepted_bytes += record.size
        self.pending_by_receiver[record.receiver] += 1

    def failed(self, record: Sent, outcome: str, reply: str) -> None:
        record.outcome, record.reply = outcome, reply

    def deferral(self, site: str, reply: str) -> None:
        self.deferrals.append((self.now(), site, reply))

    def error(self, who: str, text: str) -> None:
        self.errors.append((self.now(), who, text[:300]))

    def download(self, item: Received) -> None:
        self.received.append(item)
        self.received_count += 1
        self.received_bytes += item.size
        sent = self.sent.get(item.message_id)
        first = item.message_id not in self.downloaded_ids
        self.downloaded_ids.add(item.message_id)
        if first and sent is not None and sent.outcome == "accepted" and sent.receiver == item.receiver:
            self.pending_by_receiver[item.receiver] -= 1

    def server_backlog(self, receiver: str, count: int, nbytes: int) -> None:
        self.backlog[receiver].append((round(self.now(), 3), count, nbytes))
