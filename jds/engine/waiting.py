"""The FCFS queue of requests waiting for prefill, shared by every instance that prefills.

Instances pull from it when they have room, so a request goes to whichever instance is free
first: the least-loaded one, without a central guess about load.
"""

from __future__ import annotations

import collections
import itertools
import threading
from collections.abc import Callable

from jds.engine.sequence import Sequence
from jds.scheduling.policy import PrefillBatches


class WaitingQueue:
    def __init__(self) -> None:
        self._items: collections.deque[Sequence] = collections.deque()
        self._cond = threading.Condition()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, seq: Sequence) -> None:
        with self._cond:
            self._items.append(seq)
            self._cond.notify_all()

    def put_front(self, seq: Sequence) -> None:
        """Queue ``seq`` ahead of every other: a running request whose KV a device fault lost."""
        with self._cond:
            self._items.appendleft(seq)
            self._cond.notify_all()

    def remove(self, seq: Sequence) -> bool:
        """Take ``seq`` out if it is still waiting (an abort); whether it was."""
        with self._cond:
            try:
                self._items.remove(seq)
            except ValueError:
                return False
            return True

    def wake(self) -> None:
        """Let blocked ``take`` calls return (on shutdown)."""
        with self._cond:
            self._cond.notify_all()

    def wait(self, timeout: float) -> None:
        """Until a request waits, or ``timeout`` seconds."""
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)

    def take(
        self,
        batches: PrefillBatches,
        accepts: Callable[[Sequence], bool],
        limit: int | None = None,
        timeout: float = 0.0,
        admits: Callable[[list[int]], int] | None = None,
    ) -> list[Sequence]:
        """The next prefill call's requests (``PrefillBatches.take``), among the head requests this
        instance ``accepts``: a request it cannot serve waits for an instance that can. ``admits``
        (an instance that decodes what it prefills: ``KVPool.admits``) says how many of those,
        from their context lengths, its KV room takes now.

        Waits up to ``timeout`` seconds for a first request.
        """
        with self._cond:
            if not self._items and timeout > 0:
                self._cond.wait(timeout)
            limit = batches.max_batch if limit is None else limit
            served = [s.context_len for s in itertools.islice(itertools.takewhile(accepts, self._items), limit)]
            if admits is not None:
                limit = min(limit, admits(served))
            n = batches.take(served, limit)
            return [self._items.popleft() for _ in range(n)]
