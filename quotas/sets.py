# Which study sets (X-TELEMEDICINE-SETID/-SETPART/-SETTOTAL) each sender has started but not
# finished towards each receiver, so admission can let a started study finish first.
# Pure in-memory state with the clock passed in; must never do I/O. Parts are counted once each;
# a set not added to for `expiry` seconds is forgotten (an abandoned study must not hold a bonus).
from collections.abc import Hashable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SetPart:
    set_id: str
    part: int  # 1-based
    total: int

    @classmethod
    def from_headers(cls, set_id: str | None, part: str | int | None, total: str | int | None) -> "SetPart | None":
        """A SetPart from header values, or None when absent or malformed."""
        try:
            p, t = int(part), int(total)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None
        if not set_id or not 1 <= p <= t:
            return None
        return cls(set_id.strip(), p, t)


class OpenSets:
    def __init__(self, expiry: float = 24 * 3600.0):
        self.expiry = expiry
        # (sender, receiver) -> set_id -> (parts seen, total, last admitted at); asked per mail,
        # so one pair's sets are found without looking at the others'
        self._sets: dict[tuple[Hashable, Hashable], dict[str, tuple[frozenset[int], int, float]]] = {}

    def admitted(self, now: float, sender: Hashable, receiver: Hashable, part: SetPart) -> None:
        """Record that a part was accepted for delivery; a complete set is dropped."""
        pair = self._sets.setdefault((sender, receiver), {})
        seen, _, _ = pair.get(part.set_id, (frozenset(), part.total, now))
        seen = seen | {part.part}
        if len(seen) >= part.total:
            pair.pop(part.set_id, None)
            if not pair:
                del self._sets[(sender, receiver)]
        else:
            pair[part.set_id] = (seen, part.total, now)

    def is_open(self, now: float, sender: Hashable, receiver: Hashable, set_id: str) -> bool:
        entry = self._sets.get((sender, receiver), {}).get(set_id)
        return entry is not None and now - entry[2] <= self.expiry

    def open_for(self, now: float, sender: Hashable, receiver: Hashable) -> list[str]:
        """Set ids the sender has started and not finished towards the receiver."""
        return [
            set_id for set_id, entry in self._sets.get((sender, receiver), {}).items() if now - entry[2] <= self.expiry
        ]

    def expire(self, now: float) -> None:
        for key, pair in list(self._sets.items()):
            for set_id in [s for s, entry in pair.items() if now - entry[2] > self.expiry]:
                del pair[set_id]
            if not pair:
                del self._sets[key]
