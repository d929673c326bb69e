# Password guessing defence shared by SMTP, POP3 and IMAP (one per hub process), as Dovecot's auth
# penalty and Postfix's anvil: pure bookkeeping with the clock passed in; relay/logins.py does the
# waiting, the checking, the metrics and the log lines.
#  - Failed logins slow their client address down, across all its connections and protocols: a
#    penalty delay that doubles with each recent failure (capped) and decays with time; attempts
#    from a penalised address take turns (one per delay), so parallel connections do not help and
#    reconnecting resets nothing. An attempt that would wait too long for its turn is refused.
#  - Too many failures for one account from one address block that (account, address) pair for a
#    while, even when the password then offered is right. Failures from other addresses never
#    lock a site out: there is no account-wide lock.
# Client addresses are keyed as the host (IPv4) or its /64 (IPv6: one subscriber's network).
# Must never: do I/O, read a clock, or grow without bound (entries are capped and pruned).
import ipaddress
from dataclasses import dataclass

ACCOUNT_CHARS = 256  # account names are kept (and compared) at most this long


@dataclass(frozen=True)
class GuardSettings:
    failure_delay: float = 0.5  # seconds of penalty after one recent failure; doubles per failure
    max_delay: float = 15.0  # penalty cap (Dovecot's is 15 s)
    half_life: float = 600.0  # the failure score of an address halves in this time
    max_failures: int = 10  # failures for one account from one address that block the pair
    failure_window: float = 3600.0  # a pair's failures are forgotten after this long without one
    block_time: float = 900.0  # seconds a pair stays blocked
    max_wait: float = 30.0  # an attempt that would wait longer for its turn is refused at once
    max_entries: int = 100_000  # addresses, and pairs, remembered at most (oldest dropped beyond)
    log_lines_per_minute: int = 10  # failure log lines per address and minute, then a count
    log_lines_per_minute_total: int = 300  # and from all addresses together (a flood from many)


@dataclass(slots=True)
class _Address:
    score: float = 0.0  # recent failures, decaying with half_life
    at: float = 0.0  # when score was last updated
    next_slot: float = 0.0  # earliest start of the next attempt from this address
    failures: int = 0  # failures since first seen (for the operator's listing)
    log_window: float = -1e18  # start of the current minute of log lines
    logged: int = 0
    suppressed: int = 0


@dataclass(slots=True)
class _Pair:
    failures: int = 0
    last: float = 0.0
    blocked_until: float = 0.0


@dataclass(frozen=True)
class Admission:
    """Before checking a password: go after `wait` seconds, or not at all (blocked / too busy)."""

    wait: float = 0.0
    blocked_until: float | None = None  # the pair is blocked until then (no check, temporary failure)
    too_busy: bool = False  # the address's queue of attempts is too long (temporary failure)

    @property
    def go(self) -> bool:
        return self.blocked_until is None and not self.too_busy


@dataclass(frozen=True)
class Failure:
    delay: float  # seconds to wait before answering (and the address's next turn)
    address_failures: float  # the address's recent failure score
    pair_failures: int  # failures for this account from this address in the window
    blocked_now: bool  # this failure blocked the pair
    blocked_until: float | None = None


def client_key(ip: str) -> str:
    """The key of a client address: the address (IPv4, or IPv4 mapped into IPv6), an IPv6 /64, or
    the text as given when it is no IP address (a Unix socket)."""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip[:64]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def account_key(account: str) -> str:
    return account[:ACCOUNT_CHARS].casefold()


class LoginGuard:
    def __init__(self, settings: GuardSettings = GuardSettings()) -> None:
        self.settings = settings
        self._addresses: dict[str, _Address] = {}
        self._pairs: dict[tuple[str, str], _Pair] = {}
        self._log_window = -1e18  # start of the current minute of log lines from all addresses
        self._logged = 0
        self._suppressed = 0  # lines over the all-address budget (not counted per address)

    # ---- one login attempt ---------------------------------------------------------------------

    def admit(self, address: str, account: str, now: float) -> Admission:
        """Whether and when to check this attempt (call before checking the password)."""
        pair = self._pairs.get((address, account_key(account)))
        if pair is not None and pair.blocked_until > now:
            return Admission(blocked_until=pair.blocked_until)
        state = self._addresses.get(address)
        if state is None:
            return Admission()
        delay = self._delay(state, now)
        start = max(now, state.next_slot)
        if start - now > self.settings.max_wait:
            return Admission(wait=start - now, too_busy=True)
        state.next_slot = start + delay
        return Admission(wait=start - now)

    def failed(self, address: str, account: str, now: float) -> Failure:
        """A wrong password (or unknown account): raise the address's penalty, count the pair."""
        s = self.settings
        state = self._touch_address(address, now)
        state.score = self._score(state, now) + 1.0
        state.at = now
        state.failures += 1
        delay = self._delay(state, now)
        state.next_slot = max(state.next_slot, now + delay)
        key = (address, account_key(account))
        pair = self._pairs.pop(key, None) or _Pair()
        self._pairs[key] = pair  # most recently used last (eviction drops the oldest)
        if now - pair.last > s.failure_window:
            pair.failures = 0
        pair.failures += 1
        pair.last = now
        blocked_now = pair.failures >= s.max_failures and pair.blocked_until <= now
        if blocked_now:
            pair.blocked_until = now + s.block_time
        self._bound(self._pairs, now)
        return Failure(
            delay, state.score, pair.failures, blocked_now, pair.blocked_until if pair.blocked_until > now else None
        )

    def succeeded(self, address: str, account: str) -> None:
        """A right password: the pair's failures are forgotten (the address's penalty decays alone,
        so that one known account cannot be used to wipe it)."""
        self._pairs.pop((address, account_key(account)), None)

    def log_line(self, address: str, now: float) -> tuple[bool, int, int]:
        """Whether to log this failure of `address`; how many of its failures went unlogged in its
        previous minute, and how many of all addresses beyond their common budget in the previous
        minute (each to be said once)."""
        state = self._touch_address(address, now)
        suppressed = suppressed_total = 0
        if now - state.log_window >= 60.0:
            suppressed, state.suppressed = state.suppressed, 0
            state.log_window, state.logged = now, 0
        if now - self._log_window >= 60.0:
            suppressed_total, self._suppressed = self._suppressed, 0
            self._log_window, self._logged = now, 0
        if state.logged >= self.settings.log_lines_per_minute:
            state.suppressed += 1
            return False, suppressed, suppressed_total
        if self._logged >= self.settings.log_lines_per_minute_total:
            self._suppressed += 1
            return False, suppressed, suppressed_total
        state.logged += 1
        self._logged += 1
        return True, suppressed, suppressed_total

    # ---- the operator's view ---------------------------------------------------------------------

    def listing(self, now: float) -> list[dict]:
        """Addresses with a penalty or a blocked pair now: address, delay (s), score, failures, and
        blocks [{account, seconds_left, failures}] sorted by address."""
        blocks: dict[str, list[dict]] = {}
        for (address, account), pair in self._pairs.items():
            if pair.blocked_until > now:
                blocks.setdefault(address, []).append(
                    {"account": account, "seconds_left": round(pair.blocked_until - now, 1), "failures": pair.failures}
                )
        rows = []
        for address in sorted(set(blocks) | set(self._addresses)):
            state = self._addresses.get(address)
            delay = self._delay(state, now) if state is not None else 0.0
            if delay <= 0 and address not in blocks:
                continue
            rows.append(
                {
                    "address": address,
                    "delay": round(delay, 2),
                    "score": round(self._score(state, now), 2) if state else 0.0,
                    "failures": state.failures if state else 0,
                    "blocks": sorted(blocks.get(address, []), key=lambda b: b["account"]),
                }
            )
        return rows

    def unblock(self, address: str, account: str | None = None) -> int:
        """Lift the blocks of `address` (all its pairs, and its penalty) or only its pair with
        `account`; returns how many entries were removed."""
        if account is not None:
            return 1 if self._pairs.pop((address, account_key(account)), None) is not None else 0
        removed = 1 if self._addresses.pop(address, None) is not None else 0
        for key in [k for k in self._pairs if k[0] == address]:
            del self._pairs[key]
            removed += 1
        return removed

    # ---- internals ---------------------------------------------------------------------------------

    def _score(self, state: _Address, now: float) -> float:
        return state.score * 0.5 ** (max(0.0, now - state.at) / self.settings.half_life)

    def _delay(self, state: _Address, now: float) -> float:
        score = self._score(state, now)
        if score < 0.5:
            return 0.0
        return min(self.settings.max_delay, self.settings.failure_delay * 2.0 ** (score - 1.0))

    def _touch_address(self, address: str, now: float) -> _Address:
        state = self._addresses.pop(address, None)
        if state is None:
            state = _Address(at=now)
        self._addresses[address] = state  # most recently used last
        self._bound(self._addresses, now)
        return state

    def _bound(self, table: dict, now: float) -> None:
        """Past max_entries: drop what no longer matters, then the least recently used, blocked
        pairs last (never the entry just used, which is the last)."""
        cap = self.settings.max_entries
        if len(table) <= cap:
            return
        older = list(table.items())[:-1]
        for key, value in older:
            if not self._matters(value, now):
                del table[key]
        excess = len(table) - max(1, cap * 9 // 10)
        keys = list(table)[:-1]
        blocked = {k for k in keys if isinstance(table[k], _Pair) and table[k].blocked_until > now}
        for key in ([k for k in keys if k not in blocked] + [k for k in keys if k in blocked])[: max(0, excess)]:
            del table[key]

    def _matters(self, value, now: float) -> bool:
        if isinstance(value, _Pair):
            return value.blocked_until > now or now - value.last <= self.settings.failure_window
        return self._score(value, now) >= 0.05 or value.next_slot > now or now - value.log_window < 60.0


__all__ = ["Admission", "Failure", "GuardSettings", "LoginGuard", "account_key", "client_key"]
