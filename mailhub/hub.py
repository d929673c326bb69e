# The hub in one object: `async with Hub(cfg) as hub:` opens storage (with start-up recovery), starts
# every listener (SMTP, POP3/POP3S, IMAP/IMAPS, metrics/HTTP, the control socket) and the background
# tasks (housekeeping, throttle feeder, directory updates, liveness, scrub, outbound relay, loop monitor), and
# on leaving shuts all of it down gracefully: stop listening, give transactions in flight up to
# shutdown_timeout, stop the tasks, close storage. `mailhub serve` (mailhub/server.py) and the test
# fixture (tests/conftest.py) both run it; ports given as 0 are bound by the system (`hub.ports`).
# `reload()` (SIGHUP, the control command "reload") reads the configuration and the certificate
# again and hands what can change live to the running parts (mailhub/reload.py); open sessions go on.
# Must never: acknowledge a partial message on the way down, or leave a task, thread, child
# process or socket of its own behind after `stop()` (also when `start()` fails half way); let a
# configuration that fails to load replace the running one.
import asyncio
import logging
import os
import signal
import socket
import sqlite3
import ssl
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from directory import DirectoryMailer, HubKeySource, KeyRing, clean_leftovers
from quotas import Throttle
from relay.file_sender import FileSender
from relay.imap.server import ImapContext
from relay.lifecycle import Lifecycle
from relay.logins import Logins, guard_settings
from relay.mailbox_locks import ClusterMailboxLocks, MailboxLocks
from relay.outbound.queue import OutboundQueue
from relay.pop3.server import Pop3Context
from relay.proxy_gate import ProxyGates
from relay.sessions import SessionRegistry
from relay.smtp.context import SmtpContext
from relay.smtp.server import HubSMTP
from storage import SiteCache, Storage, StorageError, StorageFull
from storage.metrics import (
    MEMORY_BUDGET,
    OBJECT_DOWNLOADS,
    OBJECT_EVICTIONS,
    OBJECT_UPLOAD_FAILURES,
    SCRUB_BYTES,
    damaged_mail,
)
from storage.object_blobs import ObjectBlobs
from storage.s3 import S3Client, S3Location
from storage.scrub import Scrub

from . import handover, metrics
from . import reload as reloading
from .auth_control import register_auth_commands
from .certificates import read_certificate
from .check import unknown_variables
from .config import Config, ConfigError, load
from .control import ControlError, ControlServer
from .hub_key_http import HubKeyRoutes
from .leadership import LeaderTasks, always
from .liveness import LivenessMonitor
from .loop_monitor import LoopMonitor
from .mailbox_ops import register_mailbox_commands
from .metrics import MetricsServer
from .sessions_control import register_session_commands
from .throttling import RemoteActivity, SharedLedger, ThrottleFeeder, settings_from_config

if TYPE_CHECKING:
    from storage.postgres.cluster import ClusterLink

log = logging.getLogger("mailhub.server")
_HOUSEKEEPING_SECONDS = 60
_PRUNE_EVERY = 60  # housekeeping rounds (an hour) between two prunings of the tracking events
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def tls_context(cfg: Config) -> ssl.SSLContext | None:
    if cfg.tls.cert_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cfg.tls.cert_file, cfg.tls.key_file)
    return context


class ReloadRefused(Exception):
    """The new configuration or certificate did not load; the running one stays (one line)."""


class Hub:
    """One running hub on the current event loop. `ports` maps listener names (smtp, pop3, pop3s,
    imap, imaps, metrics) to the ports actually bound. With `handle_signals` (the main thread of
    `mailhub serve` only), SIGTERM and SIGINT ask it to stop: `await hub.stopped()` returns then,
    and SIGHUP reloads the configuration. A reload reads the file the configuration came from and
    `environ` (default: the process's environment)."""

    def __init__(
        self,
        cfg: Config,
        handle_signals: bool = False,
        environ: Mapping[str, str] | None = None,
        inherited: dict[str, list[socket.socket]] | None = None,
        cluster_url: str | None = None,
    ):
        self.cfg = cfg
        # several nodes on one PostgreSQL index (issue 27): the URL the cluster link connects to
        # (default: storage.index when it is a postgresql:// URL); None or "": one hub, no link
        self._cluster_url = cluster_url if cluster_url is not None else _cluster_url(cfg)
        self.cluster: ClusterLink | None = None  # while it runs
        self._leader_tasks = LeaderTasks()
        self._environ = environ
        self._inherited = inherited or {}  # listening sockets a graceful restart passed on (mailhub/handover.py)
        self._restarting = False
        self.kept: list[tuple[str, int]] = []  # (listener name, fd) kept open for the next hub (restart)
        self._reload_lock = asyncio.Lock()
        self._reloads: set[asyncio.Task] = set()  # reloads SIGHUP started (kept from the collector)
        self._tls: reloading.LiveTls | None = None
        self._throttle: Throttle | None = None
        self._feeder: ThrottleFeeder | None = None
        self._logins: Logins | None = None
        self._directory: DirectoryMailer | None = None
        self._liveness: LivenessMonitor | None = None
        self.ports: dict[str, int] = {}
        self._handle_signals = handle_signals
        self._stop_requested = asyncio.Event()
        self.storage: Storage | None = None
        self._sites: SiteCache | None = None
        self._keyring: KeyRing | None = None
        self._monitor: LoopMonitor | None = None
        self._listeners: dict[str, asyncio.base_events.Server] = {}
        self._contexts: list = []  # the SMTP, POP3 and IMAP contexts (drained at stop)
        self._metrics: MetricsServer | None = None
        self._control: ControlServer | None = None  # while its socket is open
        # behind a TCP balancer: the PROXY header readers of the listeners (relay/proxy_gate.py)
        self._gates = ProxyGates(cfg.proxy.trusted_balancers, cfg.proxy.header_timeout)
        self.lifecycle: Lifecycle | None = None
        self._tasks: list[asyncio.Task] = []  # background tasks, cancelled and awaited at stop
        self._closers: list = []  # called after the tasks ended (scrub, relay sender)
        self._signals_installed = False
        self._started = False

    @property
    def data_dir(self) -> Path:
        return Path(self.cfg.data_dir)

    async def __aenter__(self) -> "Hub":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def request_stop(self) -> None:
        """Ask `stopped()` to return (what SIGTERM does to `mailhub serve`)."""
        self._stop_requested.set()

    async def stopped(self) -> None:
        """Wait until a stop is requested (signal or `request_stop`)."""
        await self._stop_requested.wait()

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("this hub was started already")
        self._started = True
        try:
            await self._start()
        except BaseException:
            await self._shutdown()
            raise

    async def _start(self) -> None:
        cfg = self.cfg
        storage = Storage(
            cfg.data_dir,
            release_freed_after=cfg.storage.release_freed_after,
            reserve_bytes=cfg.storage.reserve_bytes,
            memory_budget=cfg.smtp.memory_budget,
            min_free_bytes=cfg.storage.min_free_bytes,
            blobs=cfg.storage.shared_folder,
            node=cfg.node.resolved_name,
            index_url=cfg.storage.index,
            objects=_object_blobs(cfg, os.environ if self._environ is None else self._environ),
        )
        MEMORY_BUDGET.budget = storage.memory_budget
        storage.on_damaged = damaged_mail
        await storage.open()
        self.storage = storage
        is_leader = always
        if self._cluster_url:
            from storage.postgres.cluster import ClusterLink  # needs psycopg: only when clustered

            self.cluster = link = ClusterLink(self._cluster_url, storage.node)
            await link.start()
            link.on_leader = self._leader_tasks.set_leader
            is_leader = link.is_leader
            metrics.CLUSTER.link = link  # its state on /metrics, and /healthz says 503 while it is down
        index = storage.index  # SQLite in data_dir, or PostgreSQL (storage.index): what every reader opens
        self._sites = sites = SiteCache(cfg.data_dir, cfg.auth.hash_threads, cfg.auth.max_queued_checks, index.connect)
        self._keyring = keyring = KeyRing(cfg.data_dir, index.connect)
        self._monitor = LoopMonitor(cfg.log.stall_threshold)
        self._monitor.start()

        tls = tls_context(cfg)
        if tls is not None:
            self._tls = reloading.LiveTls(tls)
        self._throttle = throttle = Throttle(settings_from_config(cfg))
        self._feeder = feeder = ThrottleFeeder(throttle, storage, sites, cfg.throttle.interval)
        await feeder.start()
        hub_keys = await asyncio.get_running_loop().run_in_executor(None, _hub_keys, cfg)
        self._directory = directory = DirectoryMailer(cfg, storage, hub_keys)
        self._logins = logins = Logins.from_config(cfg, sites)  # one login guard for every protocol
        smtp = SmtpContext(cfg, storage, sites, tls, throttle, directory, keyring, logins=logins)
        locks = MailboxLocks() if self.cluster is None else ClusterMailboxLocks(self.cluster, lambda s: s.abort())
        pop3 = Pop3Context(cfg, storage, sites, tls, throttle, logins=logins, locks=locks)
        imap = ImapContext(cfg, storage, sites, tls, throttle, pop3.locks, logins=logins)
        self._contexts = [smtp, pop3, imap]
        # expiry, quota warnings, notices, receipts (relay/lifecycle.py); tests move its clock
        self.lifecycle = lifecycle = Lifecycle(cfg, storage, sites, throttle)
        lifecycle.is_leader = is_leader
        if self.cluster is not None:  # other nodes' changes reach this node's listeners too
            self.cluster.listeners = [*storage.listeners, RemoteActivity(throttle.ledger)]
            shared = SharedLedger(throttle.ledger, self.cluster)  # the Ledger surface the sessions use
            pop3.ledger = imap.ledger = shared  # type: ignore[assignment]
            self.cluster.on_missed = lambda _: self._catch_up(imap)
            # this node's reservations of mails in flight count on the others' ledgers too
            self.cluster.reservations = throttle.ledger.reservations
            self.cluster.counted = lambda: storage.counted_seq  # (a snapshot older than a commit is told)
            throttle.ledger.on_reserved = self.cluster.note_reservations
            feeder.remote_kept = self.cluster.reservations_kept
        smtp.on_stored = lifecycle.mail_stored
        # The commands `mailhub` sends to the running hub (mailhub/control.py); each part registers its own.
        control = ControlServer(cfg.data_dir)
        control.register("hub-key-announce", directory.announce_now)
        register_auth_commands(control, logins)
        registry = SessionRegistry([smtp.connections, pop3.sessions, imap.sessions])
        register_session_commands(control, registry, node=storage.node if self.cluster is not None else "")
        if self.cluster is not None:  # `mailhub sessions --all` and `--kick` ask every node through PostgreSQL
            self.cluster.answers["sessions"] = lambda _: [info.as_dict() for info in registry.listing()]
            self.cluster.answers["sessions.kick"] = lambda site: [info.as_dict() for info in registry.kick(site)]
        control.register("storage-damaged", lambda request: _mark_damaged(storage, request))
        register_mailbox_commands(control, storage, cfg)
        control.register("reload", self._reload_command)
        control.register("restart", self._restart_command)
        control.register("mailbox.expire", lifecycle.control_expire)
        named = self._listeners
        self._metrics = MetricsServer(
            cfg.data_dir,
            cfg.metrics.health_min_free_bytes,
            lambda: [name for name, server in named.items() if name != "metrics" and not server.is_serving()],
            lambda: len(smtp.connections),
            lambda: len(pop3.sessions),
            lambda: len(imap.sessions),
            HubKeyRoutes(hub_keys, cfg.directory.address, cfg.domain),
            stale_after=cfg.liveness.stale_after,
            cert_file=cfg.tls.cert_file,
            node=cfg.metrics.node,
            index=index,
        )

        await self._listen("smtp", lambda: HubSMTP(smtp), cfg.smtp.listen)
        if cfg.pop3.listen:
            await self._listen("pop3", pop3.factory(), cfg.pop3.listen)
        if cfg.pop3.pop3s_listen:
            await self._listen("pop3s", pop3.factory(implicit_tls=True), cfg.pop3.pop3s_listen, tls)
        if cfg.imap.listen:
            await self._listen("imap", imap.factory(), cfg.imap.listen)
        if cfg.imap.imaps_listen:
            await self._listen("imaps", imap.factory(implicit_tls=True), cfg.imap.imaps_listen, tls)
        if self._gates.trusted:
            log.info("behind a balancer: PROXY headers read from %s", ", ".join(map(str, self._gates.trusted)))
        if cfg.metrics.listen:
            host, port = cfg.metrics.listen
            sock = self._adopt("metrics", host, port)
            if sock is not None:
                server = await asyncio.start_server(self._metrics.handle, sock=sock)
            else:
                server = await asyncio.start_server(self._metrics.handle, host, port, reuse_address=True)
            self._record("metrics", server, kept=sock is not None)
        for name, sockets in self._inherited.items():  # listeners the new configuration no longer has
            for sock in sockets:
                log.info("%s listener %s:%d closed (no longer configured)", name, *sock.getsockname()[:2])
                sock.close()
        self._inherited = {}
        if not sites.all_sites():
            log.warning(
                "no sites yet; add one with: mailhub site add NAME --address NAME@%s --password-stdin", cfg.domain[0]
            )
        for finding in unknown_variables(os.environ if self._environ is None else self._environ):
            log.warning("%s", finding.text)  # a misspelt setting is otherwise silently not applied
        if self._handle_signals:
            loop = asyncio.get_running_loop()
            for signum in _STOP_SIGNALS:
                loop.add_signal_handler(signum, self._stop_requested.set)
            loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)
            loop.add_signal_handler(signal.SIGUSR2, self._restart_on_signal)
            self._signals_installed = True
        retention = (cfg.events.retention_days * 86400, cfg.events.audit_retention_days * 86400)
        self._tasks.append(asyncio.create_task(_housekeeping(storage, *retention, is_leader)))
        self._tasks.append(asyncio.create_task(feeder.run()))
        # periodic work done once in a cluster (mailhub/leadership.py): a loop that only the leader
        # runs (the scrub), and rounds the leader alone does (directory updates, lifecycle,
        # liveness, pruning: is_leader)
        directory.is_leader = is_leader
        self._tasks.append(await directory.start_updates())
        self._tasks.append(asyncio.create_task(lifecycle.run()))
        self._closers.append(lifecycle.close)
        self._liveness = LivenessMonitor(cfg, storage, sites)
        self._liveness.is_leader = is_leader
        self._tasks.append(asyncio.create_task(self._liveness.run()))
        if cfg.storage.scrub_rate > 0:  # the background scrub (storage/scrub.py); 0 turns it off
            scrub = Scrub(storage, cfg.storage.scrub_rate, on_verified=SCRUB_BYTES.inc)
            self._leader_tasks.add("scrub", lambda: asyncio.create_task(scrub.run()))
            self._closers.append(scrub.close)
        self._leader_tasks.set_leader(self.cluster is None or self.cluster.is_leader())
        if cfg.relay.enabled:  # the outbound relay's scheduler (reloads the durable queue)
            sender = FileSender(max_threads=cfg.relay.max_active)  # one send at a time per delivery
            queue = OutboundQueue(cfg, storage, sites, sender, node=storage.node)
            storage.on_outbound = queue.wake
            self._tasks.append(asyncio.create_task(queue.run()))
            self._closers.append(sender.close)
        self._control = control if await _start_control(control) else None
        log.info("hub ready (data in %s, domains %s)", cfg.data_dir, ", ".join(cfg.domain))

    def _catch_up(self, imap: ImapContext) -> None:
        """Other nodes' changes may have been missed (the cluster link was down, or dropped rows):
        every IMAP session looks at its mailbox again, the ledger reads the index's figures again."""
        log.info("cluster link: other nodes' changes may have been missed; reading them from the index")
        imap.mailboxes_changed(list(imap.by_site))
        if self._feeder is not None:
            task = asyncio.ensure_future(self._resync(self._feeder))
            self._reloads.add(task)
            task.add_done_callback(self._reloads.discard)

    @staticmethod
    async def _resync(feeder: ThrottleFeeder) -> None:
        try:
            await feeder.resync()
        except Exception as exc:
            log.warning("usage figures not read again after the cluster link's gap: %s", exc)

    def _reload_on_signal(self) -> None:
        task = asyncio.ensure_future(self._reload_logged())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def _reload_logged(self) -> None:
        try:
            await self.reload()
        except ReloadRefused:
            pass  # reload() logged why

    async def _reload_command(self, _request: dict) -> dict:
        try:
            return await self.reload()
        except ReloadRefused as exc:
            raise ControlError(f"reload refused, the hub keeps its running configuration: {exc}") from None

    async def reload(self) -> dict:
        """Read the configuration (its file and the environment) and the certificate again and
        take over what can change live; open sessions go on. Returns what changed live, what
        needs a restart and the certificate now served. Raises ReloadRefused (after one log line)
        when the configuration or the certificate does not load: then nothing changes."""
        async with self._reload_lock:
            if self.storage is None:
                raise ReloadRefused("the hub is not running")
            loop = asyncio.get_running_loop()
            path = self.cfg.config_file
            try:
                new = await loop.run_in_executor(None, lambda: load(path, self._environ))
            except ConfigError as exc:
                self._refuse(str(exc))
            plan = reloading.plan(self.cfg, new)
            cfg = plan.effective
            tls = None
            if self._tls is not None:
                try:
                    tls = await loop.run_in_executor(None, tls_context, cfg)
                except (ssl.SSLError, OSError) as exc:
                    self._refuse(f"tls.cert_file: cannot load {cfg.tls.cert_file} with {cfg.tls.key_file}: {exc}")
            self._apply(cfg, tls)
            certificate = await loop.run_in_executor(None, _certificate_text, cfg) if tls else None
            log.info(
                "configuration reloaded from %s: %s%s%s",
                path or "the environment",
                f"changed {', '.join(plan.changed)}" if plan.changed else "no live setting changed",
                f"; serving certificate {certificate}" if certificate else "",
                f"; not changed, needs a restart (systemctl restart mailhub): {', '.join(plan.restart)}"
                if plan.restart
                else "",
            )
            return {"changed": list(plan.changed), "restart_needed": list(plan.restart), "certificate": certificate}

    def _refuse(self, reason: str, what: str = "reload refused, the running configuration stays") -> NoReturn:
        log.error("%s: %s", what, reason)
        raise ReloadRefused(reason)

    def _apply(self, cfg: Config, tls: ssl.SSLContext | None) -> None:
        """Hand a checked configuration (and its freshly loaded TLS context) to the running parts."""
        self.cfg = cfg
        for context in self._contexts:
            context.reconfigure(cfg)
        if self._tls is not None and tls is not None:
            self._tls.replace(tls)
        if self._throttle is not None:
            self._throttle.reconfigure(settings_from_config(cfg))
        if self._feeder is not None:
            self._feeder.interval = cfg.throttle.interval
        if self._logins is not None:
            self._logins.guard.settings = guard_settings(cfg)
        if self._directory is not None:
            self._directory.cfg = cfg
        if self.lifecycle is not None:
            self.lifecycle.reconfigure(cfg)
        if self._liveness is not None:
            self._liveness.cfg = cfg
        if self._metrics is not None:
            self._metrics.min_free_bytes = cfg.metrics.health_min_free_bytes
            self._metrics.node = cfg.metrics.node
            self._metrics.liveness.stale_after = cfg.liveness.stale_after
        logging.getLogger("mailhub").setLevel(cfg.log.level.upper())

    def _restart_on_signal(self) -> None:
        task = asyncio.ensure_future(self._restart_logged())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def _restart_logged(self) -> None:
        try:
            await self.restart()
        except ReloadRefused:
            pass  # restart() logged why

    async def _restart_command(self, _request: dict) -> dict:
        try:
            return await self.restart()
        except ReloadRefused as exc:
            raise ControlError(f"restart refused, the hub keeps running: {exc}") from None

    async def restart(self) -> dict:
        """Graceful restart (SIGUSR2, `mailhub restart`) for what a reload cannot change: once the
        new configuration and certificate load, stop as for SIGTERM but keep the listening
        sockets open, for `mailhub serve` to hand them to the hub it starts in this process's
        place (mailhub/handover.py). Connections that arrive meanwhile wait in the listen backlog.
        ReloadRefused (one log line) when the configuration does not load."""
        async with self._reload_lock:
            refused = "restart refused, the hub keeps running"
            if not self._handle_signals:
                self._refuse("a graceful restart needs the hub to run as `mailhub serve`", refused)
            if self._restarting:
                return {"pid": os.getpid(), "shutdown_timeout": self.cfg.shutdown_timeout}
            loop = asyncio.get_running_loop()
            path = self.cfg.config_file
            try:
                new = await loop.run_in_executor(None, lambda: load(path, self._environ))
            except ConfigError as exc:
                self._refuse(str(exc), refused)
            try:
                await loop.run_in_executor(None, tls_context, new)
            except (ssl.SSLError, OSError) as exc:
                self._refuse(f"tls.cert_file: cannot load {new.tls.cert_file} with {new.tls.key_file}: {exc}", refused)
            self._restarting = True
            log.info(
                "restarting: the listening sockets stay open (new connections wait), transactions in flight "
                "get up to %.0fs, then a new hub takes over",
                self.cfg.shutdown_timeout,
            )
            loop.call_later(0.2, self._stop_requested.set)  # the control answer goes out first
            return {"pid": os.getpid(), "shutdown_timeout": self.cfg.shutdown_timeout}

    def _adopt(self, name: str, host: str, port: int) -> socket.socket | None:
        """The listening socket a graceful restart passed on for this listener, if it is bound
        where the configuration says; inherited sockets of the name that are not, closed."""
        candidates = self._inherited.pop(name, [])
        if len(candidates) == 1 and handover.matches(candidates[0], host, port):
            return candidates[0]
        for sock in candidates:  # moved elsewhere, or several (a name with more addresses): bound anew
            sock.close()
        return None

    async def _listen(self, name: str, factory, address, ssl_context=None) -> None:
        host, port = address
        if self._gates.trusted:  # the PROXY header comes first, before any TLS handshake
            factory, ssl_context = self._gates.factory(name, factory, ssl_context), None
        loop = asyncio.get_running_loop()
        sock = self._adopt(name, host, port)
        if sock is not None:
            server = await loop.create_server(factory, sock=sock, backlog=1024, ssl=ssl_context)
        else:
            server = await loop.create_server(factory, host, port, backlog=1024, reuse_address=True, ssl=ssl_context)
        self._record(name, server, kept=sock is not None)

    def _record(self, name: str, server: asyncio.base_events.Server, kept: bool = False) -> None:
        self._listeners[name] = server
        for sock in server.sockets:
            bound = sock.getsockname()
            self.ports.setdefault(name, bound[1])
            log.info("%s listening on %s:%d%s", name, bound[0], bound[1], " (kept over the restart)" if kept else "")

    def _close_listeners(self, listeners: list[tuple[str, asyncio.base_events.Server]]) -> None:
        for name, server in listeners:
            if self._restarting:  # still listening through these; the kernel queues new connections
                self.kept += [(name, fd) for fd in handover.keep(server.sockets)]
            server.close()

    async def stop(self) -> None:
        """Graceful shutdown (idempotent): no new connections, up to shutdown_timeout for the
        transactions in flight, then every task stopped and storage closed."""
        if not self._started:
            return
        log.info("shutting down: no new connections, up to %.0fs for transactions in flight", self.cfg.shutdown_timeout)
        await self._shutdown()
        log.info("stopped")

    async def _shutdown(self) -> None:
        """Undo whatever `_start` got to, in the reverse order; safe to call twice."""
        if self._signals_installed:
            loop = asyncio.get_running_loop()
            for signum in _STOP_SIGNALS:
                loop.remove_signal_handler(signum)
            for signum in (signal.SIGHUP, signal.SIGUSR2):
                loop.remove_signal_handler(signum)
                signal.signal(signum, signal.SIG_IGN)  # a reload or restart asked during the shutdown must not kill it
            self._signals_installed = False
        for task in list(self._reloads):
            task.cancel()
        if self._metrics is not None:  # /healthz says 503 while the sessions drain: a balancer takes this node out
            self._metrics.draining = "restarting" if self._restarting else "shutting down"
        listeners, self._listeners = list(self._listeners.items()), {}
        health = [(name, server) for name, server in listeners if name == "metrics"]
        self._close_listeners([(name, server) for name, server in listeners if name != "metrics"])
        self._gates.close_pending()
        for sockets in self._inherited.values():  # a start that failed before adopting them
            for sock in sockets:
                sock.close()
        self._inherited = {}
        control, self._control = self._control, None
        if control is not None:
            await control.close()
        contexts, self._contexts = self._contexts, []
        await asyncio.gather(*(context.drain(self.cfg.shutdown_timeout) for context in contexts))
        self._close_listeners(health)
        await self._leader_tasks.stop()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        # Relay deliveries in flight are cut off; their queue rows stay and are retried after a restart.
        await asyncio.gather(*tasks, return_exceptions=True)
        closers, self._closers = self._closers, []
        for close in closers:
            close()
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._monitor is not None:
            self._monitor.stop()
            self._monitor = None
        if self.storage is not None:
            await self.storage.close()
            self.storage = None
        cluster, self.cluster = self.cluster, None
        if cluster is not None:  # after the sessions: the mailbox locks go with its connection
            if metrics.CLUSTER.link is cluster:
                metrics.CLUSTER.link = None
            await cluster.close()
        if self._sites is not None:
            self._sites.close()
            self._sites = None
        if self._keyring is not None:
            self._keyring.close()
            self._keyring = None


def _certificate_text(cfg: Config) -> str | None:
    """The served certificate in a few words (subject, end of validity, fingerprint)."""
    try:
        return read_certificate(cfg.tls.cert_file).text() if cfg.tls.cert_file else None
    except ValueError as exc:  # loaded by OpenSSL a moment ago: only a file changed since
        return str(exc)


async def _mark_damaged(storage: Storage, request: dict) -> dict:
    """Control command storage-damaged {"mails": [[queue ID, reason], ...]} (`mailhub storage verify`):
    mark them damaged (quarantine copy, refused to POP3/IMAP); answers how many were new."""
    mails = request.get("mails")
    if not isinstance(mails, list) or not all(
        isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m) for m in mails
    ):
        raise ControlError('"mails" is a list of [queue ID, reason] pairs')
    marked = 0
    for queue_id, reason in mails[:10000]:
        marked += await storage.mark_damaged(queue_id, reason[:300], "verify")
    return {"marked": marked}


async def _start_control(control: ControlServer) -> bool:
    """Open the control socket the CLI asks (mailhub/control.py). Without it the hub still serves
    mail; the CLI then says that it cannot reach the hub."""
    try:
        await control.start()
    except OSError as exc:
        log.error("control socket %s unavailable (%s); commands that ask the running hub will fail", control.path, exc)
        return False
    return True


def _hub_keys(cfg: Config) -> HubKeySource:
    """The hub's signing keys (the first made now if there is none), after removing what a cut-off
    rotation left."""
    clean_leftovers(cfg.data_dir)
    source = HubKeySource(
        cfg.data_dir,
        [f"{cfg.directory.address}@{domain}" for domain in cfg.domain],
        cfg.directory.hub_key_grace_days * 86400,
    )
    keys = source.get()
    log.info("directory signing key %s", keys.fingerprint)
    rotation = keys.rotation()
    if rotation is not None and keys.in_grace():
        log.info(
            "previous directory signing key %s co-signs until %s",
            rotation["previous_fingerprint"],
            rotation["previous_signs_until"],
        )
    return source


def _cluster_url(cfg: Config) -> str:
    """storage.index when it is a PostgreSQL URL (several nodes may share it), else ""."""
    index = cfg.storage.index
    return index if index.startswith(("postgresql://", "postgres://")) else ""


async def _housekeeping(
    storage: Storage, retention_seconds: float, audit_retention_seconds: float, is_leader: Callable[[], bool] = always
) -> None:
    """Prune tracking events and audit records past their retention (at start, then hourly; in a
    cluster, the leader only); free blobs of mailbox entries that other processes (the CLI) removed."""
    rounds = 0
    while True:
        try:
            if rounds % _PRUNE_EVERY == 0 and is_leader():
                pruned = await storage.prune_events(time.time() - retention_seconds)
                if pruned:
                    log.info("pruned %d tracking event(s) older than %.0f days", pruned, retention_seconds / 86400)
                pruned = await storage.prune_audit(time.time() - audit_retention_seconds)
                if pruned:
                    log.info("pruned %d audit record(s) older than %.0f days", pruned, audit_retention_seconds / 86400)
            if rounds:
                await storage.empty_trash()
                await storage.keep_reserve()
        except StorageFull as exc:  # a full disk is not a bug: one line, the next round tries again
            log.warning("housekeeping skipped: %s", exc)
        except (StorageError, sqlite3.Error) as exc:  # the index unreachable (PostgreSQL down): one line
            log.error("housekeeping failed (tried again next round): %s", exc)
        except Exception:
            log.exception("housekeeping failed")
        rounds += 1
        await asyncio.sleep(_HOUSEKEEPING_SECONDS)


def _object_blobs(cfg: Config, environ: Mapping[str, str]) -> ObjectBlobs | None:
    """The object store of storage.blobs = "s3://BUCKET/PREFIX" ([s3] for where and who), or None."""
    url = cfg.storage.object_store
    if not url:
        return None
    from .storage_cli import S3SetupError, s3_settings

    try:
        settings = s3_settings(cfg, environ)
        location = S3Location.parse(url)
    except (S3SetupError, ValueError) as exc:
        raise StorageError(f"storage.blobs = {url!r}: {exc}") from None
    data_dir = Path(cfg.data_dir).absolute()
    objects = ObjectBlobs(
        S3Client(settings),
        location,
        data_dir / "blobs",
        data_dir / "spool",
        cache_bytes=cfg.storage.cache_bytes,
        delete_orphans=cfg.storage.delete_orphan_objects,
    )
    objects.on_download, objects.on_evict = OBJECT_DOWNLOADS.inc, OBJECT_EVICTIONS.inc
    objects.on_upload_failed = OBJECT_UPLOAD_FAILURES.inc
    return objects
