"""When paged states leave the GPU and which ones: pure decisions, no CUDA.

Pressure on a device exists when either limit the user set is crossed:
    budget     paged state bytes resident on the device > budget
    threshold  free device memory < threshold * total device memory
The deficit is the number of bytes that must leave the device to end the
pressure; the headroom is how many bytes may come back without starting it
again (never more than the memory that is actually free). Restoring only what
fits the headroom is the hysteresis: a state comes back only when there is
room for it with the limits still met.

"Coldest" means least recently used: each state carries the tick of the last
optimizer step that updated its parameter (states of frozen parameters, or of
parameters that got no gradient lately, keep an old tick and leave first).
Ties, i.e. states updated in the same step, which is the common case, are
broken by update order, earliest first. Among states that every step needs,
the choice does not change the cost: an evicted state is updated in place in
host memory, so each evicted byte crosses the bus twice per step (read and
write) whichever state it belongs to. Restores go the other way: most
recently used first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """The user's pressure settings (None: that limit is off)."""

    budget: int | None = None
    threshold: float | None = None

    @property
    def active(self) -> bool:
        return self.budget is not None or self.threshold is not None


def check_budget(budget: int | None) -> int | None:
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ValueError(f"budget must be a non-negative number of bytes or None (no budget), got {budget!r}")
    return budget


def check_threshold(free_fraction: float | None) -> float | None:
    if free_fraction is None:
        return None
    if isinstance(free_fraction, bool) or not isinstance(free_fraction, (int, float)) or not 0.0 <= free_fraction < 1.0:
        raise ValueError(
            f"threshold must be a fraction of device memory in [0, 1) that should stay free, or None (off), got {free_fraction!r}"
        )
    return float(free_fraction)


def deficit(limits: Limits, resident: int, free: int, total: int) -> int:
    """Bytes of paged state that must leave the device now (0: no pressure)."""
    need = 0
    if limits.budget is not None:
        need = max(need, resident - limits.budget)
    if limits.threshold is not None:
        need = max(need, math.ceil(limits.threshold * total) - free)
    return need


def headroom(limits: Limits, resident: int, free: int, total: int) -> int:
    """Bytes of evicted state that may return without creating a deficit."""
    room = free
    if limits.budget is not None:
        room = min(room, limits.budget - resident)
    if limits.threshold is not None:
        room = min(room, free - math.ceil(limits.threshold * total))
    return max(room, 0)


@dataclass(frozen=True)
class Candidate:
    """One paged allocation as the policy sees it."""

    key: int  # the allocation's address
    nbytes: int
    last_use: int  # tick of the last step that updated it (0: never seen updated)
    order: int  # position in update order within that step


def coldest_first(candidates: Sequence[Candidate], need: int) -> list[Candidate]:
    """The least recently used resident allocations whose bytes cover `need`."""
    chosen: list[Candidate] = []
    moved = 0
    for candidate in sorted(candidates, key=lambda c: (c.last_use, c.order)):
        if moved >= need:
            break
        chosen.append(candidate)
        moved += candidate.nbytes
    return chosen


def hottest_that_fit(candidates: Sequence[Candidate], room: int) -> list[Candidate]:
    """The most recently used evicted allocations that fit in `room` bytes together."""
    chosen: list[Candidate] = []
    for candidate in sorted(candidates, key=lambda c: (-c.last_use, -c.order)):
        if candidate.nbytes <= room:
            chosen.append(candidate)
            room -= candidate.nbytes
    return chosen
