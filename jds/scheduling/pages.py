"""KV pages of one instance: which are free, how many holders each has, and which full pages are
kept for reuse by the prompts that follow (no JAX, no threads).

A page is held by every sequence whose block table lists it. With prefix caching, a full page of
known tokens is also registered under a key that names every token up to its end (``page_keys``,
vLLM's scheme: a chain of hashes, so a page is found only behind the same whole prefix). When its
last holder lets a registered page go, it stays cached, evictable: a new prompt starting with the
same tokens shares it instead of computing it again, and when free pages run short the least
recently used cached page is evicted. The engine keeps one allocator per instance behind its
pool's lock (``jds.engine.kv_pool``).
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence

import numpy as np


def page_keys(tokens: Sequence[int], page_size: int) -> list[bytes]:
    """The key of each full page of ``tokens``: a digest of the page's tokens and the key before it."""
    keys, key = [], b""
    ids = np.asarray(tokens, np.int64)
    for end in range(page_size, len(ids) + 1, page_size):
        key = hashlib.sha256(key + ids[end - page_size : end].tobytes()).digest()
        keys.append(key)
    return keys


class PageAllocator:
    """Page ids ``0 .. pages - 1``, handed out lowest first, with a holder count each, and (with
    ``cache``) the registered full pages."""

    def __init__(self, pages: int, cache: bool = False):
        self.total = pages
        self.caching = cache
        self._free = list(range(pages - 1, -1, -1))  # a stack: the lowest on top
        self._holders = [0] * pages
        self._by_key: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, unheld: oldest first

    def __len__(self) -> int:
        """Pages that can be taken: free, or cached and held by no one."""
        return len(self._free) + len(self._evictable)

    @property
    def used(self) -> int:
        """Pages held or cached."""
        return self.total - len(self._free)

    @property
    def cached(self) -> int:
        """Registered pages (held or not)."""
        return len(self._by_key)

    def take(self, n: int) -> list[int] | None:
        """``n`` pages, each now held once, evicting the least recently used cached pages when too
        few are free; None (and nothing taken) if fewer can be taken."""
        if n > len(self):
            return None
        while len(self._free) < n:
            page, _ = self._evictable.popitem(last=False)
            del self._by_key[self._key_of.pop(page)]
            self._free.append(page)
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._holders[p] = 1
        return pages

    def give_back(self, pages: Sequence[int]) -> None:
        """Let each of ``pages`` go once; a page no one holds any more is free again, or, if
        registered, cached until evicted."""
        for p in pages:
            if self._holders[p] == 0:
                raise RuntimeError(f"page {p} released while free")
            self._holders[p] -= 1
            if self._holders[p] == 0:
                if p in self._key_of:
                    self._evictable[p] = None
                else:
                    self._free.append(p)

    def lookup(self, keys: Sequence[bytes]) -> list[int]:
        """The cached pages of the longest run of ``keys`` from the first (nothing is taken)."""
        pages = []
        for key in keys:
            page = self._by_key.get(key)
            if page is None:
                break
            pages.append(page)
        return pages

    def share(self, pages: Sequence[int]) -> None:
        """Hold each of these cached pages once more (a prompt reusing them)."""
        for p in pages:
            self._evictable.pop(p, None)
            self._holders[p] += 1

    def register(self, keys: Sequence[bytes], pages: Sequence[int]) -> None:
        """Cache each held page under its key (a key already cached keeps its page)."""
        if not self.caching:
            return
        for key, page in zip(keys, pages):
            if key not in self._by_key and page not in self._key_of:
                self._by_key[key], self._key_of[page] = page, key

    def drop_cache(self) -> None:
        """Forget every registered page; the unheld ones are free."""
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._by_key.clear()
        self._key_of.clear()


class PrefixIndex:
    """A router's guess at which full pages one instance's prefix cache holds: the keys of the
    prompts it sent there, the ``capacity`` most recently sent kept (the instance evicts its least
    recently used pages too). A guess: the instance may have evicted sooner, or restarted."""

    def __init__(self) -> None:
        self._keys: collections.OrderedDict[bytes, None] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def matched(self, keys: Sequence[bytes]) -> int:
        """How many of ``keys``, from the first, were sent there."""
        n = 0
        for key in keys:
            if key not in self._keys:
                break
            n += 1
        return n

    def add(self, keys: Sequence[bytes], capacity: int) -> None:
        """``keys`` were sent there just now; keep at most ``capacity`` keys."""
        for key in keys:
            self._keys[key] = None
            self._keys.move_to_end(key)
        while len(self._keys) > capacity:
            self._keys.popitem(last=False)

    def clear(self) -> None:
        self._keys.clear()
