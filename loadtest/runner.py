# Runs a profile's corpus against a target: schedules each study's sender task at its planned time,
# runs one receiver per receiving site, samples progress for the timeline and the live line, and
# drains until every accepted mail was downloaded or drain_timeout_s passed. Must never judge
# integrity (checks.py) nor start or stop servers (spawn.py, cli.py).
from __future__ import annotations

import asyncio
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

from . import arrivals, pop3_driver, smtp_driver
from .pacing import Pacer
from .profile import Profile
from .recorder import Recorder

SAMPLE_S = 0.5


class Unsupported(RuntimeError):
    """The target cannot serve what the profile asks (e.g. IMAP IDLE without an IMAP port)."""


@dataclass
class Target:
    label: str
    smtp: tuple[str, int]
    pop3: tuple[str, int] | None = None
    imap: tuple[str, int] | None = None
    accounts: dict = field(default_factory=dict)  # site -> {"login", "password"}
    imap_note: str = "the target has no IMAP port (--imap HOST:PORT)"


class _ReceiverArgs(TypedDict):
    """What the POP3 and the IMAP receive_loop both take."""

    login: str
    password: str
    site: str
    downlink: Pacer
    uplink: Pacer
    recorder: Recorder
    save_dir: Path
    stop: asyncio.Event


def _account(target: Target, manifest: dict, site: str) -> tuple[str, str]:
    acc = target.accounts.get(site, {})
    return acc.get("login", site), acc.get("password", manifest["sites"][site]["password"])


def check_supported(profile: Profile, target: Target) -> None:
    for site in profile.receivers:
        if site.protocol == "pop3" and target.pop3 is None:
            raise Unsupported(f"site {site.name} polls over POP3 but the target has no POP3 port")
        if site.protocol == "imap-idle" and target.imap is None:
            raise Unsupported(f"site {site.name} uses IMAP IDLE: not supported: {target.imap_note}")


class Progress:
    def __init__(self, rec: Recorder, total_mails: int, enabled: bool) -> None:
        self.rec, self.total, self.enabled = rec, total_mails, enabled
        self.timeline: list[dict] = []
        self._last = (0.0, 0, 0)
        self._tty = sys.stderr.isatty()
        self._count = 0

    def sample(self, phase: str) -> None:
        rec, now = self.rec, self.rec.now()
        self.timeline.append(
            {
                "t": round(now, 3),
                "accepted": rec.accepted_count,
                "received": rec.received_count,
                "accepted_bytes": rec.accepted_bytes,
                "received_bytes": rec.received_bytes,
                "deferrals": len(rec.deferrals),
                "backlog": {k: v for k, v in rec.pending_by_receiver.items() if v},
            }
        )
        self._count += 1
        # on a terminal one live line; in a log file one line every 5 s
        if self.enabled and (self._tty or self._count % 10 == 1 or phase == "done"):
            t, acc_b, rcv_b = self._last
            dt = max(now - t, 1e-6)
            self._last = (now, rec.accepted_bytes, rec.received_bytes)
            backlog = sum(v for v in rec.pending_by_receiver.values() if v > 0)
            lead, end = ("\r", "") if self._tty else ("", "\n")
            sys.stderr.write(
                f"{lead}[{phase:>5}] {now:6.1f}s  accepted {rec.accepted_count}/{self.total}  "
                f"downloaded {rec.received_count}  backlog {backlog}  deferrals {len(rec.deferrals)}  "
                f"in {(rec.accepted_bytes - acc_b) / dt / 1e6:6.1f} MB/s  "
                f"out {(rec.received_bytes - rcv_b) / dt / 1e6:6.1f} MB/s  errors {len(rec.errors)} " + end
            )
            sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled and self._tty:
            sys.stderr.write("\n")


async def run(
    profile: Profile,
    manifest: dict,
    corpus: Path,
    target: Target,
    save_dir: Path,
    drain_timeout_s: float | None = None,
    progress: bool = True,
    speed: float = 1.0,
) -> tuple[Recorder, list[dict], dict]:
    check_supported(profile, target)
    rec = Recorder()
    loop = asyncio.get_running_loop()
    start = loop.time()
    stop_send, stop_recv = asyncio.Event(), asyncio.Event()
    uplinks = {s.name: Pacer.mbit(s.uplink_mbit_s) for s in profile.sites}
    downlinks = {s.name: Pacer.mbit(s.downlink_mbit_s) for s in profile.sites}
    slots = {s.name: asyncio.Semaphore(s.connections) for s in profile.sites}
    rng = random.Random(profile.seed + 17)
    total = manifest["mails"]
    prog = Progress(rec, total, progress)

    receivers = []
    for site in profile.receivers:
        login, password = _account(target, manifest, site.name)
        common = _ReceiverArgs(
            login=login,
            password=password,
            site=site.name,
            downlink=downlinks[site.name],
            uplink=uplinks[site.name],
            recorder=rec,
            save_dir=save_dir,
            stop=stop_recv,
        )
        if site.protocol == "pop3":
            assert target.pop3 is not None, "check_supported() saw to it"
            coro = pop3_driver.receive_loop(
                host=target.pop3[0],
                port=target.pop3[1],
                interval=site.poll_interval_s,
                first_poll=arrivals.poll_phase(profile, site.name),
                **common,
            )
        else:
            from . import imap_driver

            assert target.imap is not None, "check_supported() saw to it"
            coro = imap_driver.receive_loop(host=target.imap[0], port=target.imap[1], **common)
        receivers.append(asyncio.create_task(coro))

    async def one_study(study: dict) -> None:
        await asyncio.sleep(max(0.0, start + study["at_s"] / speed - loop.time()))
        sender = study["sender"]
        login, password = _account(target, manifest, sender)
        async with slots[sender]:
            await smtp_driver.send_study(
                study=study,
                corpus=corpus,
                host=target.smtp[0],
                port=target.smtp[1],
                login=login,
                password=password,
                sender_address=manifest["sites"][sender]["address"],
                receiver_address=manifest["sites"][study["receiver"]]["address"],
                smtp_cfg=profile.smtp,
                uplink=uplinks[sender],
                downlink=downlinks[sender],
                recorder=rec,
                rng=random.Random(rng.random()),
                stop=stop_send,
            )

    async def sampler() -> None:
        while True:
            prog.sample(phase)
            await asyncio.sleep(SAMPLE_S)

    phase = "send"
    sampling = asyncio.create_task(sampler())
    senders = [asyncio.create_task(one_study(s)) for s in manifest["studies"]]
    outcome: dict[str, float | bool | None] = {"send_end_s": None, "drain_end_s": None, "drained": False}
    try:
        results = await asyncio.gather(*senders, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                rec.error("sender", f"study task crashed: {r!r}")
        outcome["send_end_s"] = rec.now()
        phase = "drain"
        deadline = time.monotonic() + (profile.drain_timeout_s if drain_timeout_s is None else drain_timeout_s)
        accepted = {m for m, s in rec.sent.items() if s.outcome == "accepted"}
        while time.monotonic() < deadline:
            if accepted <= rec.downloaded_ids:
                outcome["drained"] = True
                break
            await asyncio.sleep(0.1)
        outcome["drain_end_s"] = rec.now()
    finally:
        stop_send.set()
        stop_recv.set()
        for task in senders:
            task.cancel()
        await asyncio.gather(*receivers, return_exceptions=True)
        prog.sample("done")
        sampling.cancel()
        prog.finish()
    return rec, prog.timeline, outcome
