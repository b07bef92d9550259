"""Prompts prefilled into an instance's own KV pages, reusing the cached pages of their prefix.

Both kinds of instance that prefill into a pool of pages use this: a colocated instance (which
then decodes from those pages) and, with prefix caching, a prefill instance (which then hands them
over). A prompt whose longest cached run of full pages is found reuses those pages and computes
only the rest, as chunks over them (``Pipeline.forward``); the others run as one prefill batch
whose KV is written over the pages reserved for them. Either way a prompt's full pages are then
registered in the pool's prefix cache.

One thread owns a ``PromptWriter`` (the instance's): the pool it shares, the pipeline and the
chunk in progress are only touched from there.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import jax
import numpy as np

from jds.engine.first_tokens import prefill_batch, score_prompts
from jds.engine.kv_pool import KVPool
from jds.engine.programs import BatchPages, Pipeline, PrefillProgram, empty_rows, set_row
from jds.engine.sequence import Sequence
from jds.scheduling import policy

log = logging.getLogger(__name__)

REUSE_CHUNK = 256  # positions per prompt chunk after a cached prefix, where prefill is not chunked anyway

Written = Callable[[Sequence, int], None]  # a prompt's KV is in its slot's pages, its first token published: (sequence, slot)


@dataclasses.dataclass
class Chunking:
    """A prompt being prefilled chunk by chunk into its slot."""

    seq: Sequence
    slot: int
    done: int = 0  # prompt tokens already in the cache


class PromptWriter:
    """An instance's prompts, written into its pool's pages (see the module's docstring).

    ``fail``: what becomes of a request whose KV was lost and that holds no slot (prefilled again
    once, or failed). ``recover``: what the instance does after a fault that may have consumed its
    cache (it abandons the chunk in progress with ``abandon``).
    """

    def __init__(
        self,
        program: PrefillProgram,
        pipeline: Pipeline,
        pool: KVPool,
        chunk: int | None,
        fail: Callable[[Sequence, str], None],
        recover: Callable[[str], None],
    ):
        self.program = program
        self.pipeline = pipeline
        self.pool = pool
        self.chunk = chunk or (REUSE_CHUNK if pool.pages.caching else None)  # the shape of a prompt chunk
        self.chunking: Chunking | None = None
        self._fail = fail
        self._recover = recover

    def reserve(self, seq: Sequence) -> tuple[int, int]:
        """A slot and pages for ``seq`` (admitted by the pool's own count, and only this thread
        takes from it), reusing its cached prefix unless it asks about its prompt's tokens (then
        every one is computed): (slot, positions reused)."""
        final = seq.prompt_len + seq.limit
        if seq.request.params.prompt_logprobs is not None:
            return self.pool.try_reserve(seq.context_len, final), 0
        return self.pool.reserve_reusing(seq.context_ids, final)

    def admit(self, seqs: list[Sequence], written: Written) -> None:
        """Prefill ``seqs`` (admitted by the pool): prompts with a cached prefix one by one, the
        rest of each in chunks over the cached pages; the others in one batch."""
        misses: list[tuple[Sequence, int]] = []
        for seq in seqs:
            slot, reused = self.reserve(seq)
            if reused:
                self.start(seq, slot, reused)
                while self.chunking is not None:
                    self.next_chunk(written)
            else:
                misses.append((seq, slot))
        if not misses:
            return
        slots = {id(seq): slot for seq, slot in misses}
        for going, kv in prefill_batch(self.program, [seq for seq, _ in misses]):
            self._insert([(row, seq, slots.pop(id(seq))) for row, seq in going], kv, written)
        for slot in slots.values():  # requests that ended at their first token (or failed) hold none
            self.pool.release(slot)

    def _insert(self, going: list[tuple[int, Sequence, int]], kv: BatchPages, written: Written) -> None:
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
                self._fail(seq, f"KV insert failed: {exc}")
            if not self.pipeline.intact:  # it ran, and took the cache it donates with it
                self._recover(f"KV insert failed: {exc}")
            return
        for _, seq, slot in going:
            self.pool.register(slot, seq.context_ids)
            written(seq, slot)

    def start(self, seq: Sequence, slot: int, done: int) -> None:
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
        self.chunking = Chunking(seq, slot, done)

    def next_chunk(self, written: Written) -> None:
        """Run the next chunk of the prompt in progress; after its last, publish its first token
        and hand it to ``written``."""
        c = self.chunking
        seq = c.seq
        if seq.aborted.is_set():
            self._end("abort")
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
                self._end("error", f"chunked prefill failed: {exc}")
            else:
                self._recover(f"chunked prefill failed: {exc}")
            return
        self.chunking = None
        self.pool.register(c.slot, prompt)
        resumed = bool(seq.tokens)  # prefilled again after a device fault: its newest token is known
        reason = None if resumed else seq.add_drawn(drawn, 0)
        if not resumed:
            seq.publish(reason)
        if reason is None:
            written(seq, c.slot)
        else:
            self.pool.release(c.slot)

    def _end(self, reason: str, error: str | None = None) -> None:
        c, self.chunking = self.chunking, None
        c.seq.publish(reason, error)
        self.pool.release(c.slot)

    def abandon(self, error: str) -> None:
        """Give up the chunk in progress (its pages went with the cache): its request is prefilled
        again once, or fails."""
        if self.chunking is not None:
            c, self.chunking = self.chunking, None
            self.pool.release(c.slot)
            self._fail(c.seq, error)
