"""Decode slots: which are free, and the routing of a request to the least-loaded decode instance.

A slot is reserved when a prefilled request is routed (before its KV moves), so KV never lands
where there is no room, and released by the decode loop when the request ends. All pools of an
engine share one condition, so a router waiting for room wakes when any instance frees a slot.
"""

from __future__ import annotations

import threading


class SlotPool:
    def __init__(self, slots: int, cond: threading.Condition):
        self.size = slots
        self._free = list(range(slots - 1, -1, -1))  # pop() hands out the lowest index first
        self._cond = cond

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def in_use(self) -> int:
        return self.size - len(self._free)

    def try_reserve(self) -> int | None:
        with self._cond:
            return self._free.pop() if self._free else None

    def release(self, slot: int) -> None:
        with self._cond:
            if slot in self._free:
                raise RuntimeError(f"slot {slot} released twice")
            self._free.append(slot)
            self._cond.notify_all()
