# Logins of all protocols of the hub process go through here: ask the login guard (penalty turn,
# blocked pair), wait for the turn, check the password (storage.SiteCache, off the loop in its
# bounded pool), tell the guard the outcome, hold a failure's reply back by the penalty, count and
# log. The protocols only word the outcome. Must never: log a password, check a password of a
# blocked pair, or wait without bound (the guard caps the wait; the pool's queue is capped).
import asyncio
import logging
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass

from relay import metrics
from relay.login_guard import GuardSettings, LoginGuard, client_key
from relay.mailbox_session import printable
from storage import LoginBusy, Site, SiteCache

log = logging.getLogger("mailhub.auth")


@dataclass(frozen=True)
class LoginOutcome:
    site: Site | None = None
    temporary: str | None = None  # why the attempt was refused without a check (say "try later")

    @property
    def ok(self) -> bool:
        return self.site is not None


BLOCKED = "too many failed logins for this account from your address; try again later"
BUSY = "too many logins at once; try again shortly"


def guard_settings(cfg) -> GuardSettings:
    auth = cfg.auth
    return GuardSettings(
        failure_delay=auth.failure_delay,
        max_delay=auth.max_failure_delay,
        half_life=auth.penalty_half_life,
        max_failures=auth.max_failures,
        failure_window=auth.failure_window,
        block_time=auth.block_time,
        max_wait=auth.max_penalty_wait,
    )


class Logins:
    def __init__(self, sites: SiteCache, guard: LoginGuard, clock: Callable[[], float] = time.monotonic):
        self.sites = sites
        self.guard = guard
        self.clock = clock

    @classmethod
    def from_config(cls, cfg, sites: SiteCache) -> "Logins":
        return cls(sites, LoginGuard(guard_settings(cfg)))

    async def login(self, protocol: str, peer: str, user: str, password: str) -> LoginOutcome:
        address = client_key(peer)
        admission = self.guard.admit(address, user, self.clock())
        if admission.blocked_until is not None:
            metrics.login_refused(protocol, "blocked")
            self._log(
                address,
                "%s: login as %r from %s refused unchecked: blocked for %.0f s more",
                protocol,
                printable(user),
                peer,
                admission.blocked_until - self.clock(),
                fields=_login_fields(protocol, user, peer, "blocked"),
            )
            return LoginOutcome(temporary=BLOCKED)
        if admission.too_busy:
            metrics.login_refused(protocol, "queue")
            self._log(
                address,
                "%s: login as %r from %s refused unchecked: its address's turn is %.0f s away",
                protocol,
                printable(user),
                peer,
                admission.wait,
                fields=_login_fields(protocol, user, peer, "busy"),
            )
            return LoginOutcome(temporary=BUSY)
        if admission.wait > 0:
            metrics.login_penalty(protocol, admission.wait)
            await asyncio.sleep(admission.wait)
        try:
            site = await self.sites.authenticate(user, password)
        except LoginBusy as exc:
            metrics.login_refused(protocol, "busy")
            self._log(
                address,
                "%s: login as %r from %s refused unchecked: %s",
                protocol,
                printable(user),
                peer,
                exc,
                fields=_login_fields(protocol, user, peer, "busy"),
            )
            return LoginOutcome(temporary=BUSY)
        if site is not None:
            self.guard.succeeded(address, user)
            return LoginOutcome(site)
        failure = self.guard.failed(address, user, self.clock())
        metrics.login_failure(protocol)
        if failure.blocked_now:
            metrics.login_block()
            log.warning(
                "%s: failed login as %r from %s, %d for this account from this address: pair blocked"
                " for %.0f s (lift it with: mailhub auth unblock %s --site %s)",
                protocol,
                printable(user),
                peer,
                failure.pair_failures,
                self.guard.settings.block_time,
                address,
                shlex.quote(printable(user)),
                extra=_login_fields(protocol, user, peer, "blocked"),
            )
        else:
            self._log(
                address,
                "%s: failed login as %r from %s (%d for this account from this address; its next attempt waits %.1f s)",
                protocol,
                printable(user),
                peer,
                failure.pair_failures,
                failure.delay,
                fields=_login_fields(protocol, user, peer, "failed"),
            )
        if failure.delay > 0:
            metrics.login_penalty(protocol, failure.delay)
            await asyncio.sleep(failure.delay)
        return LoginOutcome()

    def _log(self, address: str, message: str, *args, fields: dict | None = None) -> None:
        """One line per event, at most log_lines_per_minute per address and
        log_lines_per_minute_total from all addresses; then a count."""
        logged, suppressed, suppressed_total = self.guard.log_line(address, self.clock())
        if suppressed:
            log.warning("%d more login failures or refusals from %s were not logged", suppressed, address)
        if suppressed_total:
            log.warning(
                "%d more login failures or refusals (from all addresses, over %d lines a minute) were not logged",
                suppressed_total,
                self.guard.settings.log_lines_per_minute_total,
            )
        if logged:
            log.info(message, *args, extra=fields)


def _login_fields(protocol: str, user: str, peer: str, outcome: str) -> dict:
    """The JSON log fields of a login line (mailhub/logsetup.py FIELDS)."""
    return {"event": "login.refused", "protocol": protocol, "user": printable(user), "client": peer, "outcome": outcome}


__all__ = ["BLOCKED", "BUSY", "LoginOutcome", "Logins", "guard_settings"]
