"""The FCFS queue of requests waiting for prefill, shared by every instance that prefills.

Instances pull from it when they have room, so a request goes to whichever instance is free
first: the least-loaded one, without a central guess about load.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from jds.engine.sequence import Sequence


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

    def take(
        self,
        fits: Callable[[list[int]], bool],
        accepts: Callable[[Sequence], bool],
        max_requests: int,
        timeout: float,
    ) -> list[Sequence]:
        """The longest FCFS prefix that ``fits`` one batch (lengths to prefill), of sequences this instance ``accepts``.

        Waits up to ``timeout`` seconds for a first request. Never skips the head of the queue:
        a request that does not fit here waits for an instance where it does.
        """
        with self._cond:
            if not self._items and timeout > 0:
                self._cond.wait(timeout)
            batch: list[Sequence] = []
            while self._items and len(batch) < max_requests:
                head = self._items[0]
                if not accepts(head) or not fits([s.context_len for s in batch] + [head.context_len]):
                    break
                batch.append(self._items.popleft())
            return batch
