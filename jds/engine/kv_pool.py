"""The slots and KV pages of one decode (or colocated) instance, shared between the threads that
reserve and release them.

A slot is a row of the decode step; pages hold the KV. A request reserves a slot and the pages of
its context when it is routed (before its KV moves), so KV never lands where there is no room;
the decode loop grows it a page at a time as it generates and releases both when it ends. With
prefix caching (an instance that prefills what it decodes), the full pages of a request's known
tokens are registered once their KV is written, and a new request shares the cached pages of its
longest cached prefix and computes only the rest. Each
slot's block table lives here, on the host: the programs receive the rows a step reads. All pools
of an engine share one condition, so a router waiting for room wakes when any instance frees some.
Which slot and which pages are handed out, and who is admitted, is the scheduling policy's.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from jds.scheduling import policy
from jds.scheduling.pages import PageAllocator, page_keys
from jds.scheduling.policy import LowestFirst


class KVPool:
    """``LowestFirst`` slots, a ``PageAllocator``'s pages and the slots' block tables, behind the
    engine's condition."""

    def __init__(
        self, slots: int, pages: int, page_size: int, max_seq_len: int, cond: threading.Condition, prefix_caching: bool = False
    ):
        self.size = slots
        self.page_size = page_size
        self.no_page = pages  # the table entry of a page not held: reads are masked, writes dropped
        self._free = LowestFirst(slots)
        self.pages = PageAllocator(pages, cache=prefix_caching)  # its counts may be read; it changes only through this pool
        self.prefix_queried = 0  # prompt positions looked up in the prefix cache
        self.prefix_hits = 0  # of those, positions found cached
        self.committed = 0  # pages the running requests would hold at their longest (routing's measure)
        self._held: list[list[int]] = [[] for _ in range(slots)]
        self._commits = [0] * slots
        self.tables = np.full((slots, policy.pages_for(max_seq_len, page_size)), pages, np.int32)
        self._cond = cond

    @property
    def free(self) -> int:
        """Free slots."""
        return len(self._free)

    @property
    def in_use(self) -> int:
        return self.size - len(self._free)

    def holds(self, positions: int) -> bool:
        """Whether a request of ``positions`` (its prompt and max_tokens) fits here with the pool
        to itself. One that does not would, once it outgrew the pool, preempt itself for ever."""
        return positions <= self.pages.total * self.page_size

    def admits(self, context_lens: list[int]) -> int:
        """How many of these waiting requests (in queue order) this instance admits now."""
        needs = [policy.admission_pages(n, self.page_size) for n in context_lens]
        with self._cond:
            return policy.admits(needs, self.free, len(self.pages), self.pages.total)

    @property
    def room(self) -> tuple[bool, int]:
        """How much room routing sees here (``policy.decode_room``)."""
        with self._cond:
            return policy.decode_room(self.free, self.pages.total, self.committed)

    def try_reserve(self, context_len: int, final_len: int | None = None) -> int | None:
        """A slot holding the pages of ``context_len`` positions and the next token's, if admission
        allows (``policy.admits``); None otherwise. ``final_len``: the longest the request may
        grow (its prompt and ``max_tokens``; default the next token), what it commits."""
        got = self._reserve(context_len, (), final_len)
        return None if got is None else got[0]

    def reserve_reusing(self, context: Sequence[int], final_len: int | None = None) -> tuple[int, int] | None:
        """``try_reserve`` for a request whose ``context`` (token ids) may begin with cached pages:
        those of its longest cached run of full pages (all but its last token at most: one is
        computed, for the logits) are shared. (slot, positions reused), or None."""
        reusable = page_keys(context[: len(context) - 1], self.page_size) if self.pages.caching else []
        return self._reserve(len(context), reusable, final_len)

    def _reserve(self, context_len: int, reusable: list[bytes], final_len: int | None) -> tuple[int, int] | None:
        need = policy.admission_pages(context_len, self.page_size)
        with self._cond:
            if not policy.admits([need], self.free, len(self.pages), self.pages.total):
                return None
            slot = self._free.take()
            cached = self.pages.lookup(reusable)
            self.pages.share(cached)
            self._held[slot] = list(cached)
            self.tables[slot, : len(cached)] = cached
            if not self._grow(slot, need):  # evicting cached pages the admission counted did not give enough
                self._release(slot)
                return None
            self.prefix_queried += context_len if reusable else 0
            self.prefix_hits += len(cached) * self.page_size
            self._commits[slot] = max(need, policy.pages_for(final_len or 0, self.page_size))
            self.committed += self._commits[slot]
            return slot, len(cached) * self.page_size

    def register(self, slot: int, tokens: Sequence[int]) -> None:
        """Cache ``slot``'s full pages of ``tokens`` (its first tokens, whose KV is written), where
        prefix caching is on."""
        if self.pages.caching:
            with self._cond:
                keys = page_keys(tokens, self.page_size)
                self.pages.register(keys, self._held[slot][: len(keys)])

    def drop_cache(self) -> None:
        """Forget every cached page (held ones stay with their requests)."""
        with self._cond:
            self.pages.drop_cache()
            self._cond.notify_all()

    def grow(self, slot: int, tokens: int) -> bool:
        """Give ``slot`` the pages of ``tokens`` positions, if it lacks some; False if too few are free."""
        with self._cond:
            return self._grow(slot, policy.pages_for(tokens, self.page_size))

    def _grow(self, slot: int, pages: int) -> bool:
        held = self._held[slot]
        if len(held) >= pages:
            return True
        got = self.pages.take(pages - len(held))
        if got is None:
            return False
        self.tables[slot, len(held) : pages] = got
        held.extend(got)
        return True

    def release(self, slot: int) -> None:
        """Free ``slot`` and let go of its pages."""
        with self._cond:
            self._release(slot)
            self._cond.notify_all()

    def release_all(self) -> None:
        """Free every slot in use (an instance whose slots are only ever held within one call of
        its thread, after that call failed)."""
        with self._cond:
            for slot in range(self.size):
                if self._held[slot] or self._commits[slot]:
                    self._release(slot)
            self._cond.notify_all()

    def _release(self, slot: int) -> None:
        self.pages.give_back(self._held[slot])
        self.committed -= self._commits[slot]
        self._commits[slot] = 0
        self._held[slot] = []
        self.tables[slot] = self.no_page
        self._free.give_back(slot)

    def step_tables(self, lo: int, rows: int, context: int) -> np.ndarray:
        """The block tables a step of rows ``lo .. lo + rows`` reads over ``context`` positions."""
        with self._cond:
            return self.tables[lo : lo + rows, : policy.pages_for(context, self.page_size)].copy()

    def step_pages(self, lo: int, rows: int, context: int, members: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A decode step's block tables (``step_tables``) and the page each row writes its token
        to, ``[rows, 1]``: the page of ``positions[i]`` for the ``members`` rows (which hold it:
        ``grow`` ran first), none for the others. One lock and no loop per row."""
        pages = np.full((rows, 1), self.no_page, np.int32)
        with self._cond:
            pages[members, 0] = self.tables[lo + members, positions[members] // self.page_size]
            return self.step_tables(lo, rows, context), pages

    def held_pages(self, slot: int, n: int) -> np.ndarray:
        """The first ``n`` pages of ``slot``'s table (it holds them: they were reserved with it)."""
        with self._cond:
            return self.tables[slot, :n].copy()

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
