# The throttle in the running hub: builds the quota policy (quotas.Throttle) from the config and
# keeps it fed: usage figures from the index at start and from storage's change reports after,
# a drain-rate reading of every site each `throttle.interval` seconds, and every few seconds the
# live state per site written to the index for `mailhub site show`. Decisions stay in quotas/.
import asyncio
import logging
import sqlite3
import time

from quotas import AdmissionConfig, DrainConfig, PacingConfig, SiteLimits, Throttle, ThrottleSettings
from storage import SiteCache, Storage, StorageError, StorageFull

from . import metrics
from .config import Config

log = logging.getLogger("mailhub.throttle")
_STATE_EVERY = 5.0  # seconds between writes of the live state to the index


def settings_from_config(cfg: Config) -> ThrottleSettings:
    q, t = cfg.quotas, cfg.throttle
    defaults = SiteLimits(
        mailbox_bytes=q.mailbox_bytes or None,
        mailbox_messages=q.mailbox_messages or None,
        max_message_size=q.max_message_size or None,
        submitted_per_day=q.submitted_per_day or None,
        submitted_per_month=q.submitted_per_month or None,
        received_per_day=q.received_per_day or None,
        received_per_month=q.received_per_month or None,
        max_drain_time=q.max_drain_time,
        downlink_prior=float(q.downlink),
    )
    return ThrottleSettings(
        defaults=defaults,
        admission=AdmissionConfig(
            floor_bytes=t.floor_bytes,
            set_overshoot=t.set_overshoot,
            min_retry=t.min_retry,
            offline_retry=t.offline_retry,
        ),
        drain=DrainConfig(window=t.drain_window, tau=t.drain_tau, grace=t.offline_grace),
        pacing=PacingConfig(enabled=t.pacing, engage_at=t.pacing_engage_at, min_rate=float(t.pacing_min_rate)),
        drain_admission=t.drain_admission,
    )


class RemoteActivity:
    """Other nodes' live downloads and logins (their cluster link's payloads), told to this node's
    ledger as they come, so its drain rates count every node's fetches (issue 27)."""

    def __init__(self, ledger):
        self.ledger = ledger

    def committed(self, *_args) -> None:
        pass  # the ledger is a listener of its own

    def fetched_committed(self, *_args) -> None:
        pass

    def removed(self, *_args) -> None:
        pass

    def remote_downloaded(self, site: int, size: int) -> None:
        self.ledger.note_download(site, size, time.monotonic())

    def remote_polled(self, site: int) -> None:
        self.ledger.note_poll(site, time.monotonic())

    def remote_reserved(self, node: str, rows: list, submitting: list, counted: int | None = None) -> None:
        """Another node's reservations of mails in flight (its whole set, as it last told it, with
        its last group commit counted then)."""
        self.ledger.node_reserved(node, rows, submitting, time.monotonic(), counted)

    def remote_committed(self, node: str, seq: int, rows: list) -> None:
        """Another node's group commit (its mails counted already): their reservations end."""
        self.ledger.node_committed(node, seq, rows, time.monotonic())


class SharedLedger:
    """What the POP3 and IMAP sessions tell the ledger (logins, bytes sent), also told to the other
    nodes through the cluster link; everything else is the ledger's."""

    def __init__(self, ledger, link):
        self._ledger = ledger
        self._link = link

    def note_poll(self, site: int, now: float) -> None:
        self._ledger.note_poll(site, now)
        self._link.note_poll(site)

    def note_download(self, site: int, size: int, now: float) -> None:
        self._ledger.note_download(site, size, now)
        self._link.note_download(site, size)

    def __getattr__(self, name: str):
        return getattr(self._ledger, name)


class ThrottleFeeder:
    """Loads a Throttle's ledger from storage, keeps it told of storage's changes, and takes a
    drain-rate reading of every site each interval."""

    def __init__(self, throttle: Throttle, storage: Storage, sites: SiteCache, interval: float):
        self.throttle = throttle
        self.storage = storage
        self.sites = sites
        self.interval = interval
        self.remote_kept = 5.0  # seconds other nodes' reservations count without news (the cluster link's)

    async def start(self) -> None:
        """Before any listener opens: the index figures, then every change as it is committed."""
        wall = time.time()
        snapshot = await self.storage.usage_snapshot(wall)
        self.throttle.ledger.load(snapshot.usage, snapshot.volumes, snapshot.downloads, time.monotonic(), wall)
        self.storage.add_listener(self.throttle.ledger)

    async def resync(self) -> None:
        """Read the usage figures from the index again (other nodes' reports may have been missed)."""
        snapshot = await self.storage.usage_snapshot(time.time())
        self.throttle.ledger.resync(snapshot.usage, snapshot.volumes)

    async def run(self) -> None:
        saved_at = float("-inf")
        full_logged = False  # one line per full-disk episode, not one per attempt
        while True:
            await asyncio.sleep(self.interval)
            try:
                now, wall = time.monotonic(), time.time()  # rates on the first, UTC periods on the second
                for node in self.throttle.ledger.forget_remote(now - self.remote_kept):
                    log.warning(
                        "reservations in flight of node %s forgotten: no news for %.0f s", node, self.remote_kept
                    )
                sites = self.sites.all_sites()
                self.throttle.observe(sites, now)
                metrics.THROTTLE.states = [(s.name, self.throttle.state(s, now, wall)) for s in sites]
                if now - saved_at >= _STATE_EVERY:
                    saved_at = now
                    states = {s.id: state for s, (_, state) in zip(sites, metrics.THROTTLE.states)}
                    await self.storage.save_throttle_states(states, wall)
                    full_logged = False
            except (
                StorageFull
            ) as exc:  # the states are saved again once there is room; the full disk is logged elsewhere
                if not full_logged:
                    log.warning("throttle states not saved: %s (retried every %.0f s)", exc, _STATE_EVERY)
                full_logged = True
            except (StorageError, sqlite3.Error) as exc:  # the index unreachable (PostgreSQL down): one line
                log.error("throttle update failed (tried again in %.0f s): %s", self.interval, exc)
            except Exception:
                log.exception("throttle update failed")
