# The hub process: open storage (with start-up recovery), start the listeners, run until SIGTERM or
# SIGINT, then shut down gracefully (stop listening, let transactions in flight finish within
# shutdown_timeout, never acknowledge a partial message).
import asyncio
import logging
import signal
import ssl
import time

from directory import DirectoryMailer, HubKeySource, KeyRing, clean_leftovers
from quotas import Throttle
from relay.imap_server import ImapContext
from relay.logins import Logins
from relay.outbound_queue import OutboundQueue
from relay.pop3_server import Pop3Context
from relay.smtp_server import HubSMTP, SmtpContext
from relay.file_sender import FileSender
from storage import SiteCache, Storage
from storage.scrub import Scrub

from .auth_control import register_auth_commands
from .control import ControlError, ControlServer
from .hub_key_http import HubKeyRoutes
from .loop_monitor import LoopMonitor
from storage.metrics import MEMORY_BUDGET, SCRUB_BYTES, damaged_mail

from .metrics import MetricsServer
from .throttling import ThrottleFeeder, settings_from_config

log = logging.getLogger("mailhub.server")
_HOUSEKEEPING_SECONDS = 60
_PRUNE_EVERY = 60    # housekeeping rounds (an hour) between two prunings of the tracking events


def tls_context(cfg) -> ssl.SSLContext | None:
    if cfg.tls.cert_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cfg.tls.cert_file, cfg.tls.key_file)
    return context


async def _listen(name: str, factory, address, ssl_context=None) -> asyncio.base_events.Server:
    host, port = address
    server = await asyncio.get_running_loop().create_server(factory, host, port, backlog=1024,
                                                            reuse_address=True, ssl=ssl_context)
    for sock in server.sockets:
        bound = sock.getsockname()
        log.info("%s listening on %s:%d", name, bound[0], bound[1])
    return server


async def serve(cfg) -> None:
    storage = Storage(cfg.data_dir, release_freed_after=cfg.storage.release_freed_after,
                      reserve_bytes=cfg.storage.reserve_bytes, memory_budget=cfg.smtp.memory_budget,
                      min_free_bytes=cfg.storage.min_free_bytes)
    MEMORY_BUDGET.budget = storage.memory_budget
    storage.on_damaged = damaged_mail
    await storage.open()
    sites = SiteCache(cfg.data_dir, cfg.auth.hash_threads, cfg.auth.max_queued_checks)
    keyring = KeyRing(cfg.data_dir)
    try:
        await _run(cfg, storage, sites, keyring)
    finally:
        await storage.close()
        sites.close()
        keyring.close()
    log.info("stopped")


async def _run(cfg, storage: Storage, sites: SiteCache, keyring: KeyRing) -> None:
    monitor = LoopMonitor(cfg.log.stall_threshold)
    monitor.start()
    try:
        await _serve_listeners(cfg, storage, sites, keyring)
    finally:
        monitor.stop()


async def _serve_listeners(cfg, storage: Storage, sites: SiteCache, keyring: KeyRing) -> None:
    tls = tls_context(cfg)
    throttle = Throttle(settings_from_config(cfg))
    feeder = ThrottleFeeder(throttle, storage, sites, cfg.throttle.interval)
    await feeder.start()
    hub_keys = await asyncio.get_running_loop().run_in_executor(None, _hub_keys, cfg)
    directory = DirectoryMailer(cfg, storage, hub_keys)
    logins = Logins.from_config(cfg, sites)   # one login guard for every protocol
    smtp = SmtpContext(cfg, storage, sites, tls, throttle, directory, keyring, logins=logins)
    pop3 = Pop3Context(cfg, storage, sites, tls, throttle, logins=logins)
    imap = ImapContext(cfg, storage, sites, tls, throttle, pop3.locks, logins=logins)
    # The commands `mailhub` sends to the running hub (mailhub/control.py); each part registers its own.
    control = ControlServer(cfg.data_dir)
    control.register("hub-key-announce", directory.announce_now)
    register_auth_commands(control, logins)
    control.register("storage-damaged", lambda request: _mark_damaged(storage, request))
    servers = []
    named: dict[str, asyncio.base_events.Server] = {}
    metrics = MetricsServer(cfg.data_dir, cfg.metrics.health_min_free_bytes,
                            lambda: [name for name, server in named.items() if not server.is_serving()],
                            lambda: len(smtp.connections), lambda: len(pop3.sessions), lambda: len(imap.sessions),
                            HubKeyRoutes(hub_keys, cfg.directory.address, cfg.domain))
    try:
        named["smtp"] = await _listen("smtp", lambda: HubSMTP(smtp), cfg.smtp.listen)
        if cfg.pop3.listen:
            named["pop3"] = await _listen("pop3", pop3.factory(), cfg.pop3.listen)
        if cfg.pop3.pop3s_listen:
            named["pop3s"] = await _listen("pop3s", pop3.factory(implicit_tls=True), cfg.pop3.pop3s_listen, tls)
        if cfg.imap.listen:
            named["imap"] = await _listen("imap", imap.factory(), cfg.imap.listen)
        if cfg.imap.imaps_listen:
            named["imaps"] = await _listen("imaps", imap.factory(implicit_tls=True), cfg.imap.imaps_listen, tls)
        servers.extend(named.values())
        if cfg.metrics.listen:
            host, port = cfg.metrics.listen
            server = await asyncio.start_server(metrics.handle, host, port, reuse_address=True)
            for sock in server.sockets:
                bound = sock.getsockname()
                log.info("metrics listening on %s:%d", bound[0], bound[1])
            servers.append(server)
    except BaseException:
        for server in servers or named.values():
            server.close()
        metrics.close()
        raise
    if not sites.all_sites():
        log.warning("no sites yet; add one with: mailhub site add NAME --address NAME@%s --password-stdin",
                    cfg.domain[0])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    housekeeping = asyncio.create_task(_housekeeping(storage, cfg.events.retention_days * 86400))
    feeding = asyncio.create_task(feeder.run())
    directory_updates = directory.start_updates()
    scrub = _start_scrub(storage, cfg.storage.scrub_rate)
    relay = _start_relay(cfg, storage, sites)
    control_started = await _start_control(control)
    log.info("hub ready (data in %s, domains %s)", cfg.data_dir, ", ".join(cfg.domain))
    await stop.wait()

    log.info("shutting down: no new connections, up to %.0fs for transactions in flight",
             cfg.shutdown_timeout)
    for server in servers:
        server.close()
    if control_started:
        await control.close()
    await asyncio.gather(smtp.drain(cfg.shutdown_timeout), pop3.drain(cfg.shutdown_timeout),
                         imap.drain(cfg.shutdown_timeout))
    housekeeping.cancel()
    feeding.cancel()
    directory_updates.cancel()
    if scrub is not None:
        scrub[0].cancel()
        scrub[1].close()
    if relay is not None:
        await _stop_relay(*relay)
    metrics.close()


async def _mark_damaged(storage: Storage, request: dict) -> dict:
    """Control command storage-damaged {"mails": [[queue ID, reason], ...]} (`mailhub storage verify`):
    mark them damaged (quarantine copy, refused to POP3/IMAP); answers how many were new."""
    mails = request.get("mails")
    if not isinstance(mails, list) or not all(
            isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m) for m in mails):
        raise ControlError('"mails" is a list of [queue ID, reason] pairs')
    marked = 0
    for queue_id, reason in mails[:10000]:
        marked += await storage.mark_damaged(queue_id, reason[:300], "verify")
    return {"marked": marked}


def _start_scrub(storage: Storage, rate: int):
    """The background scrub (storage/scrub.py) at `rate` bytes a second; None when it is off (0)."""
    if rate <= 0:
        return None
    scrub = Scrub(storage, rate, on_verified=SCRUB_BYTES.inc)
    return asyncio.create_task(scrub.run()), scrub


async def _start_control(control: ControlServer) -> bool:
    """Open the control socket the CLI asks (mailhub/control.py). Without it the hub still serves
    mail; the CLI then says that it cannot reach the hub."""
    try:
        await control.start()
    except OSError as exc:
        log.error("control socket %s unavailable (%s); commands that ask the running hub will fail",
                  control.path, exc)
        return False
    return True


def _hub_keys(cfg) -> HubKeySource:
    """The hub's signing keys (the first made now if there is none), after removing what a cut-off
    rotation left."""
    clean_leftovers(cfg.data_dir)
    source = HubKeySource(cfg.data_dir, [f"{cfg.directory.address}@{domain}" for domain in cfg.domain],
                          cfg.directory.hub_key_grace_days * 86400)
    keys = source.get()
    log.info("directory signing key %s", keys.fingerprint)
    if keys.in_grace():
        log.info("previous directory signing key %s co-signs until %s", keys.previous_fingerprint,
                 keys.rotation()["previous_signs_until"])
    return source


def _start_relay(cfg, storage: Storage, sites: SiteCache):
    """The outbound relay's scheduler (reloads the durable queue; delivers until cancelled)."""
    if not cfg.relay.enabled:
        return None
    sender = FileSender(max_threads=cfg.relay.max_active)  # one send at a time per delivery
    queue = OutboundQueue(cfg, storage, sites, sender)
    storage.on_outbound = queue.wake
    return asyncio.create_task(queue.run()), sender


async def _stop_relay(task: asyncio.Task, sender: FileSender) -> None:
    """Deliveries in flight are cut off; their queue rows stay and are retried after the restart."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    sender.close()


async def _housekeeping(storage: Storage, retention_seconds: float) -> None:
    """Prune tracking events past their retention (at start, then hourly); free blobs of mailbox
    entries that other processes (the CLI) removed."""
    rounds = 0
    while True:
        try:
            if rounds % _PRUNE_EVERY == 0:
                pruned = await storage.prune_events(time.time() - retention_seconds)
                if pruned:
                    log.info("pruned %d tracking event(s) older than %.0f days", pruned, retention_seconds / 86400)
            if rounds:
                await storage.empty_trash()
                await storage.keep_reserve()
        except Exception:
            log.exception("housekeeping failed")
        rounds += 1
        await asyncio.sleep(_HOUSEKEEPING_SECONDS)
