"""The prefill side of a disaggregated placement: one prefill thread and one transfer thread per instance.

The prefill thread takes FCFS batches from the shared waiting queue, runs them, publishes each
request's first token (its TTFT), and puts the batch's KV on a small bounded queue. With prefix
caching the instance keeps a pool of pages: prompts are written there, reusing the cached pages of
their prefix, and each request's pages are taken out of it for the queue. The transfer
thread routes each request to the decode instance with the most room (``policy.decode_room``), reserves a slot and pages, moves
the pages its prompt fills with ``device_put`` and blocks until they have landed, then hands them to
that instance's inbox. A full transfer queue stalls prefill: KV waiting for decode room stays bounded.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from jds.engine.decode import DecodeWorker, Delivery, retry_or_fail
from jds.engine.first_tokens import prefill_batch
from jds.engine.kv_pool import KVPool
from jds.engine.programs import Pipeline, PrefillProgram, TakenPages
from jds.engine.prompt_pages import PromptWriter
from jds.engine.sequence import Sequence
from jds.engine.waiting import WaitingQueue
from jds.scheduling import policy
from jds.transfer.handoff import PageSource, send_pages, take_from_pool

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05


def _any_prompt(seq: Sequence) -> bool:
    return True  # prefill buckets reach the longest decode instance, so every valid prompt fits


class DecodeRouter:
    """Chooses the decode instance for a prefilled request: the one with the most room."""

    def __init__(self, decoders: list[DecodeWorker], cond: threading.Condition, stop: threading.Event):
        self.decoders = decoders
        self._cond = cond
        self._stop = stop

    def reserve(self, seq: Sequence) -> tuple[DecodeWorker, int] | None:
        """A slot, with the pages of ``seq``'s context, on the instance with the most room among
        those long enough and large enough for it; None if that one cannot admit it now."""
        need = seq.prompt_len + seq.limit
        with self._cond:
            fits = [d for d in self.decoders if d.max_seq_len >= need and d.pool.holds(need)]
            best = policy.most_room([d.pool.room for d in fits])
            if best is None:
                return None
            slot = fits[best].pool.try_reserve(seq.context_len, need)
            return None if slot is None else (fits[best], slot)

    def wait(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait(timeout)

    def send(self, kv: PageSource, going: list[tuple[int, Sequence]]) -> None:
        """Reserve a slot for each request and move its KV there.

        Requests already holding a reservation are shipped before waiting for more room, so a
        batch larger than an instance's free slots can never hold them hostage.
        """
        groups: dict[DecodeWorker, list[tuple[int, Sequence, int]]] = {}
        for row, seq in going:
            while True:
                if seq.aborted.is_set() or self._stop.is_set():
                    seq.publish("abort")
                    break
                got = self.reserve(seq)
                if got is not None:
                    decoder, slot = got
                    groups.setdefault(decoder, []).append((row, seq, slot))
                    break
                self._ship(kv, groups)
                groups = {}
                self.wait(POLL_SECONDS)
        self._ship(kv, groups)

    def _ship(self, kv: PageSource, groups: dict[DecodeWorker, list[tuple[int, Sequence, int]]]) -> None:
        for decoder, rows in groups.items():
            counts = [policy.pages_for(seq.context_len, decoder.pool.page_size) for _, seq, _ in rows]
            try:
                handoff = send_pages(kv, [(row, n) for (row, _, _), n in zip(rows, counts)], decoder.targets)
            except Exception as exc:
                log.exception("KV transfer to %s failed", decoder.name)
                for _, seq, slot in rows:
                    decoder.pool.release(slot)
                    decoder.batch.retry_or_fail(seq, f"KV transfer failed: {exc}")
                continue
            for (_, seq, _), n in zip(rows, counts):
                seq.timings.transfer_seconds += handoff.seconds
                seq.timings.transfer_bytes += handoff.bytes * n // sum(counts)  # its own pages'
                seq.timings.route.append(decoder.name)
            decoder.inbox.put(Delivery(handoff.parts, [(seq, slot, n) for (_, seq, slot), n in zip(rows, counts)]))


Ship = Callable[[PageSource, list[tuple[int, Sequence]]], None]  # where a prefilled batch's KV goes


class PrefillWorker:
    """One prefill instance: its program, its prefill thread and its transfer thread.

    ``ship`` is the transfer thread's job: ``DecodeRouter.send`` in one process, an offer for a
    decode process to pull when roles run as processes.

    With a pool (``pipeline`` and ``pool``: prefix caching), prompts are written into its pages,
    reusing the cached pages of their prefix (``PromptWriter``), and each request's pages are
    taken out of it right after (``TakenPages``), so the pool holds between batches only what its
    prefix cache keeps. Without one, the batch's KV goes on as the program returned it.
    """

    def __init__(
        self, name: str, program: PrefillProgram, waiting: WaitingQueue, ship: Ship, stop: threading.Event,
        pipeline: Pipeline | None = None, pool: KVPool | None = None,
    ):  # fmt: skip
        self.name = name
        self.program = program
        self.pool = pool
        self.prompts = None if pool is None else PromptWriter(program, pipeline, pool, None, self._fail, self._recover)
        self._written: list[tuple[Sequence, int]] = []  # prompts of the batch in hand written into the pool: (sequence, slot)
        self._waiting = waiting
        self._ship_batch = ship
        self._stop = stop
        self._pending: queue.Queue = queue.Queue(maxsize=policy.PENDING_BATCHES)
        self.threads = [
            threading.Thread(target=self._prefill_loop, name=f"{name}", daemon=True),
            threading.Thread(target=self._transfer_loop, name=f"{name}-transfer", daemon=True),
        ]

    # Each loop iteration is its own method call, so the KV it handled is released on return.
    def _prefill_loop(self) -> None:
        while not self._stop.is_set():
            self._prefill_once()

    def _prefill_once(self) -> None:
        admits = None if self.pool is None else self.pool.admits
        seqs = self._waiting.take(self.program.batches, _any_prompt, timeout=POLL_SECONDS, admits=admits)
        if not seqs:
            return
        for s in seqs:
            s.timings.route.append(self.name)
        if self.prompts is None:
            for going, kv in prefill_batch(self.program, seqs):
                self._put_pending((kv, going))
            return
        try:
            self.prompts.admit(seqs, lambda seq, slot: self._written.append((seq, slot)))
        except Exception as exc:  # never let the thread die with requests waiting on it
            log.exception("%s failed", self.name)
            error = f"{self.name} failed: {exc}"
            handled = {id(seq) for seq in self._recover(error)}
            self.pool.release_all()
            for seq in seqs:
                if id(seq) not in handled and not seq.done:
                    self._fail(seq, error)
            return
        written, self._written = self._written, []
        if written:
            self._put_pending(self._take(written))

    def _take(self, written: list[tuple[Sequence, int]]) -> tuple[TakenPages, list[tuple[int, Sequence]]]:
        """Each written request's pages, taken out of the pool (whose slot it then leaves)."""
        rows, going = {}, []
        cache = self.prompts.pipeline.stages[0].cache
        for row, (seq, slot) in enumerate(written):
            try:
                n = policy.pages_for(seq.context_len, self.pool.page_size)
                rows[row] = take_from_pool(cache, self.pool.held_pages(slot, n), self.program.starts)
                going.append((row, seq))
            except Exception as exc:
                log.exception("taking the KV of %s failed", seq.request_id)
                self._fail(seq, f"taking its KV failed: {exc}")
            finally:
                self.pool.release(slot)
        return TakenPages(rows), going

    def _fail(self, seq: Sequence, error: str) -> None:
        retry_or_fail(seq, error, self._waiting.put_front)

    def _recover(self, error: str) -> list[Sequence]:
        """After a fault that may have consumed the pool's cache: the prompts written into it and
        not yet taken out, and the one being written, are prefilled again (or fail), cached pages
        are forgotten and the cache is made anew. Returns the requests it sent back."""
        lost = [seq for seq, _ in self._written] + ([self.prompts.chunking.seq] if self.prompts.chunking else [])
        self.prompts.abandon(error)
        for seq, slot in self._written:
            self.pool.release(slot)
            self._fail(seq, error)
        self._written = []
        self.pool.drop_cache()
        try:
            self.prompts.pipeline.reset()
        except Exception:  # the device may still be failing: the next batch tries again
            log.exception("a fresh cache could not be made")
        return lost

    def _put_pending(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._pending.put(item, timeout=POLL_SECONDS)
                return
            except queue.Full:
                continue
        for _, seq in item[1]:
            seq.publish("abort")

    def _transfer_loop(self) -> None:
        while not self._stop.is_set():
            self._transfer_once()

    def _transfer_once(self) -> None:
        try:
            kv, going = self._pending.get(timeout=POLL_SECONDS)
        except queue.Empty:
            return
        self._ship_batch(kv, going)
