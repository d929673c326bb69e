# The background scrub: reads every stored mail, one after the other in queue ID order, at
# storage.scrub_rate bytes a second, and checks it against the SHA-256 recorded at ingest; a mail
# whose bytes differ (or are missing or cut short) is marked damaged (Storage.mark_damaged:
# quarantine copy, `damaged` row, refused to POP3/IMAP from then on). Where a pass has got to is
# kept in <data_dir>/scrub.json, so a restart goes on from there; a pass over the whole store is
# logged with its counts. With the blobs on object storage it checks the node's cached copies
# (a copy that differs is dropped: the next reader downloads the object and checks it). Reads in
# a thread of its own, so it never takes a worker that serves or stores mail. Must never change a
# blob file.
import asyncio
import concurrent.futures
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import verify
from .errors import StorageError

if TYPE_CHECKING:
    from .store import Storage

log = logging.getLogger("mailhub.storage")
STATE_NAME = "scrub.json"
BATCH = 100  # mails listed at a time
IDLE_SECONDS = 60.0  # wait after a pass over an empty store


class Scrub:
    def __init__(self, storage: "Storage", rate: float, on_verified: Callable[[int], None] | None = None):
        self.storage = storage
        self.on_verified = on_verified  # called with the octets of each mail checked (metrics)
        self.rate = rate
        self.state_path = Path(storage.data_dir) / STATE_NAME
        self.verified_bytes = 0  # since the start (metrics)
        self.verified_mails = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mailhub-scrub")
        self._stop = threading.Event()

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def run(self) -> None:
        """Scrub for ever (until cancelled); an error is logged and the scrub goes on a minute later.
        May run again after a cancellation (a cluster's leader scrubs: mailhub/leadership.py)."""
        self._stop.clear()  # set when the last run ended: a read would stop at once, unverified
        try:
            while True:
                try:
                    await self._run()
                except (StorageError, sqlite3.Error) as exc:  # the index unreachable (PostgreSQL down): one line
                    log.error("scrub failed; trying again in %.0f s: %s", IDLE_SECONDS, exc)
                    await asyncio.sleep(IDLE_SECONDS)
                except Exception:
                    log.exception("scrub failed; trying again in %.0f s", IDLE_SECONDS)
                    await asyncio.sleep(IDLE_SECONDS)
        finally:
            self._stop.set()

    async def _run(self) -> None:
        state = self._load()
        pacer = verify.Pacer(self.rate)
        loop = asyncio.get_running_loop()
        while True:
            rows = await self.storage.messages_after(state["after"], BATCH)
            if not rows:
                seconds = time.time() - state["started"]
                log.info(
                    "scrub pass done: %d mail(s), %d bytes verified, %d damaged, in %.0f s",
                    state["mails"],
                    state["bytes"],
                    state["damaged"],
                    seconds,
                )
                state = {"after": "", "started": time.time(), "mails": 0, "bytes": 0, "damaged": 0}
                await loop.run_in_executor(self._pool, self._save, state)
                if seconds < IDLE_SECONDS:
                    await asyncio.sleep(IDLE_SECONDS)
                continue
            for queue_id, blob, offset, size, sha256 in rows:
                if queue_id not in self.storage.damaged:
                    problem = await loop.run_in_executor(
                        self._pool,
                        verify.content_problem,
                        self.storage.blob_dir / blob,
                        offset,
                        size,
                        sha256,
                        pacer,
                        self._stop,
                    )
                    if problem is not None and self.storage.objects is not None:
                        self.storage.objects.scrubbed(blob, problem)  # the cached copy only
                        problem = None
                    # a mail freed meanwhile may be gone or punched out of its pack: no damage
                    if problem is not None and await self.storage.messages_after(queue_id, 0, exact=True):
                        state["damaged"] += await self.storage.mark_damaged(queue_id, problem, "scrub")
                    self.verified_bytes += size
                    if self.on_verified is not None:
                        self.on_verified(size)
                    self.verified_mails += 1
                    state["bytes"] += size
                state["mails"] += 1
                state["after"] = queue_id
            await loop.run_in_executor(self._pool, self._save, state)

    def _load(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_path.read_text())
            if isinstance(state.get("after"), str):
                return {
                    "after": state["after"],
                    "started": float(state.get("started", time.time())),
                    "mails": int(state.get("mails", 0)),
                    "bytes": int(state.get("bytes", 0)),
                    "damaged": int(state.get("damaged", 0)),
                }
        except (OSError, ValueError, TypeError, AttributeError):
            pass
        return {"after": "", "started": time.time(), "mails": 0, "bytes": 0, "damaged": 0}

    def _save(self, state: dict[str, Any]) -> None:
        try:
            temporary = self.state_path.with_name(STATE_NAME + ".tmp")
            temporary.write_text(json.dumps(state))
            os.replace(temporary, self.state_path)  # no fsync: a lost state only begins a pass again
        except OSError as exc:  # a full disk: the pass goes on, a restart begins it again
            log.debug("scrub state not saved: %s", os.strerror(exc.errno) if exc.errno else exc)
