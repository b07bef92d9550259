"""Decode slots: which are free, and the routing of a request to the least-loaded decode instance.

A slot is reserved when a prefilled request is routed (before its KV moves), so KV never lands
where there is no room, and released by the decode loop when the request ends. All pools of an
engine share one condition, so a router waiting for room wakes when any instance frees a slot.
"""

from __future__ import annotations

import heapq
import threading


class SlotPool:
    """Free slots of one decode instance, handed out lowest first: a decode step computes the rows
    up to the highest slot in use, so keeping the busy slots low keeps light-load steps small."""

    def __init__(self, slots: int, cond: threading.Condition):
        self.size = slots
        self._free = list(range(slots))  # a heap
        self._cond = cond

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def in_use(self) -> int:
        return self.size - len(self._free)

    def try_reserve(self) -> int | None:
        with self._cond:
            return heapq.heappop(self._free) if self._free else None

    def release(self, slot: int) -> None:
        with self._cond:
            if slot in self._free:
                raise RuntimeError(f"slot {slot} released twice")
            heapq.heappush(self._free, slot)
            self._cond.notify_all()
