# Which study sets (X-TELEMEDICINE-SETID/-SETPART/-SETTOTAL) each sender has started but not
# finished towards each receiver, so admission can let a started study finish first.
# Pure in-memory state with the clock passed in; must never do I/O. Parts are counted once each;
# a set not added to for `expiry` seconds is forgotten (an abandoned study must not hold a bonus).
from dataclasses import dataclass
from typing import Hashable


@dataclass(frozen=True, slots=True)
class SetPart:
    set_id: str
    part: int       # 1-based
    total: int

    @classmethod
    def from_headers(cls, set_id: str | None, part: str | int | None,
                     total: str | int | None) -> "SetPart | None":
        """A SetPart from header values, or None when absent or malformed."""
        try:
            p, t = int(part), int(total)   # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None
        if not set_id or not 1 <= p <= t:
            return None
        return cls(set_id.strip(), p, t)


class OpenSets:
    def __init__(self, expiry: float = 24 * 3600.0):
        self.expiry = expiry
        # (sender, receiver, set_id) -> (parts seen, total, last admitted at)
        self._sets: dict[tuple[Hashable, Hashable, str], tuple[frozenset[int], int, float]] = {}

    def admitted(self, now: float, sender: Hashable, receiver: Hashable, part: SetPart) -> None:
        """Record that a part was accepted for delivery; a complete set is dropped."""
        key = (sender, receiver, part.set_id)
        seen, _, _ = self._sets.get(key, (frozenset(), part.total, now))
        seen = seen | {part.part}
        if len(seen) >= part.total:
            self._sets.pop(key, None)
        else:
            self._sets[key] = (seen, part.total, now)

    def is_open(self, now: float, sender: Hashable, receiver: Hashable, set_id: str) -> bool:
        entry = self._sets.get((sender, receiver, set_id))
        return entry is not None and now - entry[2] <= self.expiry

    def open_for(self, now: float, sender: Hashable, receiver: Hashable) -> list[str]:
        """Set ids the sender has started and not finished towards the receiver."""
        return [k[2] for k, v in self._sets.items()
                if k[0] == sender and k[1] == receiver and now - v[2] <= self.expiry]

    def expire(self, now: float) -> None:
        for key in [k for k, v in self._sets.items() if now - v[2] > self.expiry]:
            del self._sets[key]
