# Quota warnings as Dovecot's quota_warning: at configured fill levels of a site's mailbox quota
# (e.g. 80 and 95 %) the site and the operator are told once when a level is crossed, and again only
# after the mailbox fell clearly below that level (LEAVE_MARGIN points: a gateway that fetches while
# mail comes in keeps its mailbox hovering at a level, and must not set off a notice each time). The
# fill is the larger of the byte and the message fraction. Pure: the caller passes the usage, the
# limits and the levels it recorded; never does I/O.
from collections.abc import Iterable
from dataclasses import dataclass

LEAVE_MARGIN = 5.0  # percentage points below a level the fill must fall for the level to be left


@dataclass(frozen=True, slots=True)
class Crossing:
    percent: float  # the fill now
    crossed: tuple[int, ...]  # levels reached now that were not recorded: to notify (the highest)
    left: tuple[int, ...]  # recorded levels the fill is below now: to forget


def fill_percent(
    held_bytes: int, held_messages: int, bytes_limit: int | None, messages_limit: int | None
) -> float | None:
    """How full the mailbox is in percent of its tighter quota, or None without quotas."""
    fractions = []
    if bytes_limit:
        fractions.append(held_bytes / bytes_limit)
    if messages_limit:
        fractions.append(held_messages / messages_limit)
    return 100.0 * max(fractions) if fractions else None


def check(levels: Iterable[int], recorded: set[int], percent: float | None) -> Crossing | None:
    """What changed for a site at `percent` full, given the levels it is recorded at; None if nothing."""
    if percent is None:
        return Crossing(0.0, (), tuple(sorted(recorded))) if recorded else None
    wanted = set(levels)
    crossed = tuple(sorted(level for level in wanted if percent >= level and level not in recorded))
    left = tuple(sorted(level for level in recorded if percent < _leave_below(level) or level not in wanted))
    if not crossed and not left:
        return None
    return Crossing(percent, crossed, left)


def _leave_below(level: int) -> float:
    """The fill under which a recorded level counts as left (never more than half the level below)."""
    return level - min(LEAVE_MARGIN, level / 2)
