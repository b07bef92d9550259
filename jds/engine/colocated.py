"""The colocated baseline: one thread per instance runs both phases on the same devices.

Prefill first, as in Orca and vLLM: whenever slots are free and requests wait, a prefill batch
runs before the next decode step, and every running request waits for it (the interference
DistServe removes). With ``chunked_prefill: C`` a prompt is prefilled C tokens per iteration,
written straight into its slot's cache, with a decode step between chunks, so a long prompt
delays running requests by at most one chunk at a time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from jds.engine.decode import DecodeBatch
from jds.engine.kv_pool import KVPool
from jds.engine.prefill import POLL_SECONDS
from jds.engine.programs import Pipeline, PrefillProgram
from jds.engine.prompt_pages import PromptWriter, Written
from jds.engine.sequence import Sequence
from jds.engine.waiting import WaitingQueue
from jds.scheduling import policy

log = logging.getLogger(__name__)


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
        self.prompts = PromptWriter(program, pipeline, pool, chunk, self.batch.retry_or_fail, self._recover)
        self._waiting = waiting
        self._stop = stop
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)

    @property
    def max_seq_len(self) -> int:
        return self.pipeline.max_seq_len

    @property
    def chunk(self) -> int | None:
        """The prompt chunk shape: chunked prefill's, or the rest of a prompt whose prefix is cached."""
        return self.prompts.chunk

    def _accepts(self, seq: Sequence) -> bool:
        need = seq.prompt_len + seq.limit
        return need <= self.max_seq_len and self.pool.holds(need)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._iterate()
            except Exception as exc:  # never let the thread die with requests waiting on it
                log.exception("%s failed", self.name)
                self._recover(f"{self.name} failed: {exc}")

    def _iterate(self) -> None:
        chunking = self.prompts.chunking is not None
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
        if self.batch.resets != resets and self.prompts.chunking is not None:
            self.prompts.chunking.done = 0  # the chunks written so far went with the cache

    def _recover(self, error: str) -> None:
        """A fault that may have consumed the cache: every request in it goes back to prefill once."""
        self.prompts.abandon(error)
        self.batch.recover(error)

    def _take(self, most: int | None = None) -> list[Sequence]:
        seqs = self._waiting.take(self.program.batches, self._accepts, most, admits=self.pool.admits)
        for seq in seqs:
            seq.timings.route.append(self.name)
        return seqs

    def _admit(self) -> None:
        """Prefill what the pool admits, then decode it here."""
        seqs = self._take()
        self._guarded(seqs, lambda join: self.prompts.admit(seqs, join))

    def _prefill_chunk(self) -> None:
        """Advance the prompt being chunked by one chunk, taking a new one when none is."""
        seqs = [] if self.prompts.chunking is None else [self.prompts.chunking.seq]
        self._guarded(seqs, lambda join: self._next_chunk(seqs, join))

    def _next_chunk(self, seqs: list[Sequence], join: Written) -> None:
        """The chunk step of ``_prefill_chunk``; a prompt it takes is added to ``seqs``, so that
        ``_guarded`` knows it should this call fail."""
        if self.prompts.chunking is None:
            seqs += self._take(1)
            if not seqs:
                return
            self.prompts.start(seqs[0], *self.prompts.reserve(seqs[0]))
            if self.prompts.chunking is None:
                return
        self.prompts.next_chunk(join)

    def _guarded(self, seqs: list[Sequence], write: Callable[[Written], None]) -> None:
        """Run ``write`` (prefill ``seqs`` into the pool; each one written joins the batch). If it
        raises, the instance recovers as from any fault, and each of ``seqs`` that holds a slot
        yet neither joined the batch nor was given up with the chunk in progress gets its slot
        back and is prefilled again once (or fails): a fault never strands a request or its pages."""
        joined: set[int] = set()

        def join(seq: Sequence, slot: int) -> None:
            joined.add(id(seq))
            self.batch.join(seq, slot)

        try:
            write(join)
        except Exception as exc:
            log.exception("%s failed", self.name)
            error = f"{self.name} failed: {exc}"
            if self.prompts.chunking is not None:
                joined.add(id(self.prompts.chunking.seq))  # ``abandon`` sends it back
            self._recover(error)
            self.pool.release_all()  # the batch let go of its own slots: what is left was held by ``seqs``
            for seq in seqs:
                if id(seq) not in joined and not seq.done:
                    self.batch.retry_or_fail(seq, error)
