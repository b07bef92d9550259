"""KV pages of one instance: which are free, and how many holders each has (no JAX, no threads).

A page is held by every sequence whose block table lists it, and returns to the free list when its
last holder lets it go. The engine keeps one allocator per instance behind its pool's lock
(``jds.engine.kv_pool``); the planner's simulator keeps one per simulated instance, so both
admit, grow and preempt by the same counts.
"""

from __future__ import annotations


class PageAllocator:
    """Page ids ``0 .. pages - 1``, handed out lowest first, with a holder count each."""

    def __init__(self, pages: int):
        self.total = pages
        self._free = list(range(pages - 1, -1, -1))  # a stack: the lowest on top
        self._holders = [0] * pages

    def __len__(self) -> int:
        """Free pages."""
        return len(self._free)

    @property
    def used(self) -> int:
        return self.total - len(self._free)

    def take(self, n: int) -> list[int] | None:
        """``n`` free pages, each now held once; None (and nothing taken) if fewer are free."""
        if n > len(self._free):
            return None
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._holders[p] = 1
        return pages

    def give_back(self, pages: list[int]) -> None:
        """Let each of ``pages`` go once; a page no one holds any more is free again."""
        for p in pages:
            if self._holders[p] == 0:
                raise RuntimeError(f"page {p} released while free")
            self._holders[p] -= 1
            if self._holders[p] == 0:
                self._free.append(p)
