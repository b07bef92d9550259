"""Decode slots of one instance, shared between the threads that reserve and release them.

A slot is reserved when a prefilled request is routed (before its KV moves), so KV never lands
where there is no room, and released by the decode loop when the request ends. All pools of an
engine share one condition, so a router waiting for room wakes when any instance frees a slot.
Which slot is handed out is the scheduling policy's (``LowestFirst``).
"""

from __future__ import annotations

import threading

from jds.scheduling.policy import LowestFirst


class SlotPool:
    """``LowestFirst`` slots behind the engine's condition."""

    def __init__(self, slots: int, cond: threading.Condition):
        self.size = slots
        self._free = LowestFirst(slots)
        self._cond = cond

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def in_use(self) -> int:
        return self.size - len(self._free)

    def try_reserve(self) -> int | None:
        with self._cond:
            return self._free.take()

    def release(self, slot: int) -> None:
        with self._cond:
            self._free.give_back(slot)
            self._cond.notify_all()
