"""The slots and KV pages of one decode (or colocated) instance, shared between the threads that
reserve and release them.

A slot is a row of the decode step; pages hold the KV. A request reserves a slot and the pages of
its context when it is routed (before its KV moves), so KV never lands where there is no room;
the decode loop grows it a page at a time as it generates and releases both when it ends. Each
slot's block table lives here, on the host: the programs receive the rows a step reads. All pools
of an engine share one condition, so a router waiting for room wakes when any instance frees some.
Which slot and which pages are handed out, and who is admitted, is the scheduling policy's.
"""

from __future__ import annotations

import threading

import numpy as np

from jds.scheduling import policy
from jds.scheduling.pages import PageAllocator
from jds.scheduling.policy import LowestFirst


class KVPool:
    """``LowestFirst`` slots, a ``PageAllocator``'s pages and the slots' block tables, behind the
    engine's condition."""

    def __init__(self, slots: int, pages: int, page_size: int, max_seq_len: int, cond: threading.Condition):
        self.size = slots
        self.page_size = page_size
        self.no_page = pages  # the table entry of a page not held: reads are masked, writes dropped
        self._free = LowestFirst(slots)
        self._pages = PageAllocator(pages)
        self._held: list[list[int]] = [[] for _ in range(slots)]
        self.tables = np.full((slots, policy.pages_for(max_seq_len, page_size)), pages, np.int32)
        self._cond = cond

    @property
    def free(self) -> int:
        """Free slots."""
        return len(self._free)

    @property
    def in_use(self) -> int:
        return self.size - len(self._free)

    @property
    def pages_free(self) -> int:
        return len(self._pages)

    @property
    def pages_used(self) -> int:
        return self._pages.used

    @property
    def pages_total(self) -> int:
        return self._pages.total

    def admits(self, context_lens: list[int]) -> int:
        """How many of these waiting requests (in queue order) this instance admits now."""
        needs = [policy.admission_pages(n, self.page_size) for n in context_lens]
        with self._cond:
            return policy.admits(needs, self.free, self.pages_free, self.pages_total)

    def try_reserve(self, context_len: int) -> int | None:
        """A slot holding the pages of ``context_len`` positions and the next token's, if admission
        allows (``policy.admits``); None otherwise."""
        need = policy.admission_pages(context_len, self.page_size)
        with self._cond:
            if not policy.admits([need], self.free, self.pages_free, self.pages_total):
                return None
            slot = self._free.take()
            self._grow(slot, need)
            return slot

    def grow(self, slot: int, tokens: int) -> bool:
        """Give ``slot`` the pages of ``tokens`` positions, if it lacks some; False if too few are free."""
        with self._cond:
            return self._grow(slot, policy.pages_for(tokens, self.page_size))

    def _grow(self, slot: int, pages: int) -> bool:
        held = self._held[slot]
        if len(held) >= pages:
            return True
        got = self._pages.take(pages - len(held))
        if got is None:
            return False
        self.tables[slot, len(held) : pages] = got
        held.extend(got)
        return True

    def release(self, slot: int) -> None:
        """Free ``slot`` and let go of its pages."""
        with self._cond:
            self._pages.give_back(self._held[slot])
            self._held[slot] = []
            self.tables[slot] = self.no_page
            self._free.give_back(slot)
            self._cond.notify_all()

    def step_tables(self, lo: int, rows: int, context: int) -> np.ndarray:
        """The block tables a step of rows ``lo .. lo + rows`` reads over ``context`` positions."""
        with self._cond:
            return self.tables[lo : lo + rows, : policy.pages_for(context, self.page_size)].copy()

    def write_pages(self, slot: int, positions: np.ndarray, length: int | None = None) -> np.ndarray:
        """The page each of ``positions`` of ``slot`` is written to: ``no_page`` (dropped) past the
        pages it holds, or at and past ``length``."""
        with self._cond:
            table = self.tables[slot]
            index = positions // self.page_size
            pages = table[np.minimum(index, len(table) - 1)]
            keep = index < len(self._held[slot])
            if length is not None:
                keep &= positions < length
            return np.where(keep, pages, self.no_page).astype(np.int32)
