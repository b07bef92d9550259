"""The colocated baseline: one thread per instance runs both phases on the same devices.

Prefill first, as in Orca and vLLM: whenever slots are free and requests wait, a prefill batch
runs before the next decode step, and every running request waits for it (the interference
DistServe removes). With ``chunked_prefill: C`` a prompt is prefilled C tokens per iteration,
written straight into its slot's cache, with a decode step between chunks, so a long prompt
delays running requests by at most one chunk at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import jax
import numpy as np

from jds.engine.decode import DecodeBatch
from jds.engine.kv_pool import KVPool
from jds.engine.prefill import POLL_SECONDS, prefill_batch, score_prompts
from jds.engine.programs import BatchPages, Pipeline, PrefillProgram, empty_rows, set_row
from jds.engine.sequence import Sequence
from jds.engine.waiting import WaitingQueue
from jds.scheduling import policy

log = logging.getLogger(__name__)

REUSE_CHUNK = 256  # positions per prompt chunk after a cached prefix, where prefill is not chunked anyway


@dataclasses.dataclass
class _Chunking:
    """A prompt being prefilled chunk by chunk into its slot."""

    seq: Sequence
    slot: int
    done: int = 0  # prompt tokens already in the cache


class ColocatedWorker:
    def __init__(
        self,
        name: str,
        program: PrefillProgram,
        pipeline: Pipeline,
        pool: KVPool,
        waiting: WaitingQueue,
        chunk: int | None,
        stop: threading.Event,
    ):
        """``chunk``: ``chunked_prefill`` (None: whole prompts, batched)."""
        self.name = name
        self.program = program
        self.pipeline = pipeline
        self.pool = pool
        self.batch = DecodeBatch(pipeline, pool, waiting.put_front)
        self.chunked_prefill = chunk
        # The prompt chunk shape: chunked prefill's, or the rest of a prompt whose prefix is cached.
        self.chunk = chunk or (REUSE_CHUNK if pool.pages.caching else None)
        self._waiting = waiting
        self._stop = stop
        self._chunking: _Chunking | None = None
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)

    @property
    def max_seq_len(self) -> int:
        return self.pipeline.max_seq_len

    def _accepts(self, seq: Sequence) -> bool:
        return seq.prompt_len + seq.limit <= self.max_seq_len

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._iterate()
            except Exception as exc:  # never let the thread die with requests waiting on it
                log.exception("%s failed", self.name)
                self._recover(f"{self.name} failed: {exc}")

    def _iterate(self) -> None:
        chunking = self._chunking is not None
        if not self.batch.busy and not chunking:
            self._waiting.wait(POLL_SECONDS)  # idle: until a request comes
        if policy.colocated_prefills(self.pool.free, len(self._waiting), chunking):
            self._decode(self.batch.drain)  # the round in flight is read first: its tokens are not held behind the prefill
            self._admit() if self.chunked_prefill is None else self._prefill_chunk()
        self.batch.reap_aborted()
        if self.batch.busy:
            self._decode(self.batch.step)

    def _decode(self, work: Callable[[], None]) -> None:
        """Step or drain the decode batch; if a fault replaced the cache, a prompt being chunked starts over."""
        resets = self.batch.resets
        work()
        if self.batch.resets != resets and self._chunking is not None:
            self._chunking.done = 0  # the chunks written so far went with the cache

    def _recover(self, error: str) -> None:
        """A fault that may have consumed the cache: every request in it goes back to prefill once."""
        if self._chunking is not None:
            c, self._chunking = self._chunking, None
            self.pool.release(c.slot)
            self.batch.retry_or_fail(c.seq, error)
        self.batch.recover(error)

    def _reserve(self, seq: Sequence) -> tuple[int, int]:
        """A slot and pages for ``seq`` (admitted by the pool's own count, and only this thread
        takes from it), reusing its cached prefix unless it asks about its prompt's tokens (then
        every one is computed): (slot, positions reused)."""
        final = seq.prompt_len + seq.limit
        if seq.request.params.prompt_logprobs is not None:
            return self.pool.try_reserve(seq.context_len, final), 0
        return self.pool.reserve_reusing(seq.context_ids, final)

    def _admit(self) -> None:
        """Prefill what the pool admits: prompts with a cached prefix one by one, the rest of each
        in chunks over the cached pages; the others in one batch."""
        seqs = self._waiting.take(self.program.batches, self._accepts, admits=self.pool.admits)
        misses: list[tuple[Sequence, int]] = []
        for seq in seqs:
            seq.timings.route.append(self.name)
            slot, reused = self._reserve(seq)
            if reused:
                self._start_chunking(seq, slot, reused)
                while self._chunking is not None:
                    self._next_chunk()
            else:
                misses.append((seq, slot))
        if not misses:
            return
        slots = {id(seq): slot for seq, slot in misses}
        for going, kv in prefill_batch(self.program, [seq for seq, _ in misses]):
            self._insert([(row, seq, slots.pop(id(seq))) for row, seq in going], kv)
        for slot in slots.values():  # requests that ended at their first token (or failed) hold none
            self.pool.release(slot)

    def _insert(self, going: list[tuple[int, Sequence, int]], kv: BatchPages) -> None:
        """Write the batch's pages where its going rows' tables say, in one call (the rest of the
        batch's pages, padding, are dropped)."""
        ids = np.full(kv.pages, self.pool.no_page, np.int32)
        for row, seq, slot in going:
            n = policy.pages_for(seq.context_len, self.pool.page_size)
            ids[row * kv.per_row : row * kv.per_row + n] = self.pool.held_pages(slot, n)
        try:
            self.pipeline.insert([[kv.pieces]], ids)
        except Exception as exc:
            log.exception("KV insert failed")
            for _, seq, slot in going:
                self.pool.release(slot)
                self.batch.retry_or_fail(seq, f"KV insert failed: {exc}")
            if not self.pipeline.intact:  # it ran, and took the cache it donates with it
                self._recover(f"KV insert failed: {exc}")
            return
        for _, seq, slot in going:
            self.pool.register(slot, seq.context_ids)
            self.batch.join(seq, slot)

    def _prefill_chunk(self) -> None:
        """Advance the prompt being chunked by one chunk, taking a new one when none is."""
        if self._chunking is None:
            seqs = self._waiting.take(self.program.batches, self._accepts, 1, admits=self.pool.admits)
            if not seqs:
                return
            seqs[0].timings.route.append(self.name)
            self._start_chunking(seqs[0], *self._reserve(seqs[0]))
            if self._chunking is None:
                return
        self._next_chunk()

    def _start_chunking(self, seq: Sequence, slot: int, done: int) -> None:
        """Begin prefilling ``seq`` chunk by chunk into ``slot``, from position ``done`` (its cached prefix)."""
        if seq.timings.prefill_start is None:  # not a request prefilled again after a device fault
            seq.timings.prefill_start = time.perf_counter()
        if not seq.tokens:  # a request's first prefill (not one after a preemption or fault) is what its usage reports
            seq.timings.cached_tokens = min(done, seq.prompt_len)
        if not score_prompts(self.program, [seq]) or seq.limit == 0:
            if seq.limit == 0 and not seq.done:  # max_tokens 0: the prompt (its log-probabilities) was all it asked about
                seq.publish("length")
            self.pool.release(slot)
            return
        self._chunking = _Chunking(seq, slot, done)

    def _next_chunk(self) -> None:
        c = self._chunking
        seq = c.seq
        if seq.aborted.is_set():
            self._end_chunking("abort")
            return
        prompt = seq.context_ids
        real = min(self.chunk, len(prompt) - c.done)
        tokens = np.zeros((1, self.chunk), np.int32)
        tokens[0, :real] = prompt[c.done : c.done + real]
        rows = empty_rows(1)
        tables = self.pool.step_tables(c.slot, 1, policy.bucket(self.pipeline.contexts, c.done))
        pages = self.pool.write_pages(c.slot, c.done + np.arange(self.chunk), len(prompt))[None, :]
        try:
            set_row(rows, 0, seq)
            out = self.pipeline.forward(
                tokens, np.array([c.done], np.int32), c.slot, np.array([real - 1], np.int32), rows, np.zeros(1, np.int32), tables, pages
            )  # fmt: skip
            c.done += real
            if c.done < len(prompt):
                return
            drawn = jax.device_get(out)
        except Exception as exc:
            log.exception("chunked prefill of %s failed", seq.request_id)
            if self.pipeline.intact:  # it failed before it ran: this request's own input broke it
                self._end_chunking("error", f"chunked prefill failed: {exc}")
            else:
                self._recover(f"chunked prefill failed: {exc}")
            return
        self._chunking = None
        self.pool.register(c.slot, prompt)
        resumed = bool(seq.tokens)  # prefilled again after a device fault: its newest token is known
        reason = None if resumed else seq.add_drawn(drawn, 0)
        if not resumed:
            seq.publish(reason)
        if reason is None:
            self.batch.join(seq, c.slot)
        else:
            self.pool.release(c.slot)

    def _end_chunking(self, reason: str, error: str | None = None) -> None:
        c = self._chunking
        self._chunking = None
        c.seq.publish(reason, error)
        self.pool.release(c.slot)
