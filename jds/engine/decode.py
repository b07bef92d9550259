"""The decode side: slots that advance together one token per step, and the disaggregated decode worker.

``DecodeBatch`` is the state both the decode worker and the colocated worker step: which sequence
holds which slot, each slot's sampling row, the pipeline that owns the KV. ``DecodeWorker`` is
one thread per decode instance: it inserts KV deliveries into free slots between steps and steps
while anything is active.

No request can fail another. A sampling row that cannot be written fails its request as it
joins. A step that fails before it runs (the cache it donates still whole) is run again for
halves of its rows, down to one, so only a row whose own input breaks it fails. A step that
fails on the device may have consumed the cache: every request holding a slot goes back to
prefill once, to be prefilled with its prompt and tokens so far (``Sequence.context_ids``) and
continue where it was (``recover``); it fails if that happens to it again.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections.abc import Callable

import jax
import numpy as np

from jds.engine.kv_pool import KVPool
from jds.engine.programs import Pipeline, clear_row, empty_rows, set_row, slice_rows
from jds.engine.sequence import Sequence
from jds.scheduling import policy

log = logging.getLogger(__name__)

KV_LOST = "KV lost"  # how the error of a request whose KV a device fault took begins, where it cannot be requeued
PREEMPTED = "preempted"  # how the error of a request preempted for pages begins, where it cannot be requeued


def retry_or_fail(seq: Sequence, error: str, requeue: Callable[[Sequence], None] | None) -> None:
    """A request whose KV was lost (it holds no slot): back to prefill (``requeue``) the first
    time, else it fails; where nothing here may prefill it (``requeue`` None: a decode process),
    it fails with ``KV_LOST``, for whoever routed it to prefill it again."""
    if seq.aborted.is_set():
        seq.publish("abort")
        return
    if requeue is None:  # a decode process: whoever routes the request may prefill it again
        seq.publish("error", f"{KV_LOST}: {error}")
        return
    if seq.recomputed:
        seq.publish("error", error)
        return
    log.warning("%s: %s; prefilling its %d tokens again", seq.request_id, error, seq.context_len)
    seq.recomputed = True
    requeue(seq)


class DecodeBatch:
    """The sequences holding slots of one pipeline; only the owning worker thread calls it.

    A round visits the microbatches in order: it dispatches the microbatch's next step, then
    reads the tokens of its previous one (blocking only on that one) and streams them. The next
    step does not wait for the host: a row continuing from the step in flight takes that step's
    token on the device (the pipeline's feed), so the host's reading, detokenizing and
    publishing hide under the device's work. The price is one step computed for nothing when a
    row turns out to have finished (a stop id or string; not a length limit, which is known).
    Before a step, each of its rows gets the page its new token's position falls in; when none is
    free, the youngest running request is preempted (``policy.preemption_victim``): its slot and
    pages are freed and it goes back to prefill, to be prefilled with its prompt and tokens so far
    and continue exactly where it was. With ``pp`` stages and ``pp`` microbatches the other microbatches are in flight on the other
    stages, so every stage keeps working.
    """

    def __init__(self, pipeline: Pipeline, pool: KVPool, requeue: Callable[[Sequence], None] | None = None):
        """``requeue`` sends a request whose KV was lost or preempted back to prefill (None: it fails instead)."""
        self.pipeline = pipeline
        self.pool = pool
        self.requeue = requeue
        self.active: dict[int, Sequence] = {}
        self.rows = empty_rows(pipeline.slots)  # sampling settings, written when a request takes a slot
        self.resets = 0  # how many times the cache was replaced after a fault
        self.preemptions = 0  # requests sent back to prefill for want of pages
        self._inflight: dict[int, tuple[object, dict[int, Sequence]]] = {}  # microbatch -> (device out, members)

    @property
    def busy(self) -> bool:
        return bool(self.active or self._inflight)

    def join(self, seq: Sequence, slot: int) -> None:
        """Give ``seq`` its slot; a request whose sampling row cannot be written fails alone here."""
        try:
            set_row(self.rows, slot, seq)
            if seq.request.params.penalised:  # penalties read the slot's token history
                self.pipeline.write_history(slot, seq.context_ids)
        except Exception as exc:
            log.exception("sampling row of %s", seq.request_id)
            seq.publish("error", f"its sampling settings cannot be used: {exc}")
            clear_row(self.rows, slot)
            self.pool.release(slot)
            return
        self.active[slot] = seq

    def leave(self, slot: int) -> None:
        """Free a request's slot and pages; the full pages of its tokens stay cached where the
        instance caches prefixes (the KV of every token it knows but the newest is written: the
        host has read the step that wrote the last of them)."""
        seq = self.active.pop(slot)
        clear_row(self.rows, slot)
        self.pool.register(slot, seq.context_ids)
        self.pool.release(slot)

    def reap_aborted(self) -> None:
        for slot, seq in list(self.active.items()):
            if seq.aborted.is_set():
                seq.publish("abort")
                self.leave(slot)

    def step(self) -> None:
        """One round: every microbatch's next step dispatched, then its previous tokens applied."""
        try:
            for m, (lo, hi) in enumerate(self.pipeline.microbatch_bounds):
                self._advance(m, lo, hi)
        except Exception as exc:  # a failed program may have consumed the donated cache
            log.exception("decode step failed")
            self.recover(f"decode step failed: {exc}")

    def _advance(self, m: int, lo: int, hi: int) -> None:
        previous = self._inflight.pop(m, None)  # (device out, members) of the step in flight
        fed = previous[1] if previous is not None else {}
        members = self._make_room(self._members(lo, hi, fed), fed)
        try:
            if members:
                self._inflight[m] = (self._forward(lo, members, fed), members)
        except Exception as exc:
            if not self.pipeline.intact:
                raise
            if previous is None:
                self._run_apart(lo, members, exc)
                return
            self._apply(*previous, lo)  # then again, every row's token known on the host
            self._advance(m, lo, hi)
            return
        if previous is not None:
            self._apply(*previous, lo)

    def drain(self) -> None:
        """Read every step in flight (before the device is given other work)."""
        try:
            for m, (lo, _) in enumerate(self.pipeline.microbatch_bounds):
                if m in self._inflight:
                    self._apply(*self._inflight.pop(m), lo)
        except Exception as exc:
            log.exception("decode step failed")
            self.recover(f"decode step failed: {exc}")

    def _members(self, lo: int, hi: int, fed: dict[int, Sequence]) -> dict[int, Sequence]:
        """The rows of slots ``lo .. hi`` to step, less those whose token in flight is their last
        by length."""
        return {s: seq for s, seq in self.active.items() if lo <= s < hi and policy.steps_again(len(seq.tokens), fed.get(s) is seq, seq.limit)}

    def _make_room(self, members: dict[int, Sequence], fed: dict[int, Sequence]) -> dict[int, Sequence]:
        """Give each member the page its next token is written to, oldest request first,
        preempting the youngest running request while none is free; the members left."""
        for s, seq in sorted(members.items(), key=lambda item: item[1].timings.arrival):
            position = seq.position + (fed.get(s) is seq)
            while self.active.get(s) is seq and not self.pool.grow(s, position + 1):
                if not self.pool.holds(position + 1):  # no preemption makes room for it: admission should have refused it
                    self.leave(s)
                    seq.publish("error", f"max_tokens: position {position} is past the {self.pool.pages.total} KV pages this instance holds")
                    break
                self._preempt(policy.preemption_victim({slot: held.timings.arrival for slot, held in self.active.items()}))
        return {s: seq for s, seq in members.items() if self.active.get(s) is seq}

    def _preempt(self, slot: int) -> None:
        """Free ``slot`` and its pages; its request goes back to prefill (or, in a decode process,
        fails naming the preemption, for whoever routes it to prefill again)."""
        seq = self.active[slot]
        self.leave(slot)
        self.preemptions += 1
        if seq.aborted.is_set():
            seq.publish("abort")
        elif self.requeue is None:
            seq.publish("error", f"{PREEMPTED}: no KV page free for its next token")
        else:
            log.info("%s preempted at %d tokens (no KV page free); prefilling it again", seq.request_id, seq.context_len)
            self.requeue(seq)

    def _forward(self, lo: int, members: dict[int, Sequence], fed: dict[int, Sequence], apart: bool = False):
        """Dispatch a step of ``members``, each continuing from its newest token: on the host, or
        (the rows ``fed`` holds) drawn by the step in flight; ``apart``: with no other row's
        sampling settings, which may be what broke the step they were part of."""
        ahead = {s: fed.get(s) is seq for s, seq in members.items()}  # one token ahead of what the host has read
        longest = max(seq.position + ahead[s] for s, seq in members.items())
        n, context = self.pipeline.round_shape(max(members) - lo, longest)  # rows lo .. lo + n
        tokens, steps, from_feed = np.zeros((n, 1), np.int32), np.zeros(n, np.int32), np.zeros(n, bool)
        # Free slots among those rows still compute, but at a position past the cache, so their
        # K/V writes are dropped: a slot being filled chunk by chunk must not be touched.
        positions = np.full(n, self.pipeline.max_seq_len, np.int32)
        for s, seq in members.items():
            from_feed[s - lo], positions[s - lo], steps[s - lo] = ahead[s], seq.position + ahead[s], len(seq.tokens) + ahead[s]
            if not ahead[s]:
                tokens[s - lo, 0] = seq.tokens[-1]
        rows = slice_rows(self.rows, lo, lo + n)
        if apart:
            mine, only = np.fromiter(members, np.int64) - lo, empty_rows(n)
            for kept, every in zip(jax.tree.leaves(only), jax.tree.leaves(rows)):
                kept[mine] = every[mine]
            rows = only
        tables, pages = self.pool.step_pages(lo, n, context, np.fromiter(members, np.int64) - lo, positions)
        return self.pipeline.forward(tokens, positions, lo, np.zeros(n, np.int32), rows, steps, tables, pages, from_feed)

    def _run_apart(self, lo: int, members: dict[int, Sequence], exc: Exception) -> None:
        """A step of ``members`` failed before it ran: step halves of them, at once, down to the
        row that fails alone. Every other row gets the token it would have had."""
        if len(members) == 1:
            ((slot, seq),) = members.items()
            log.error("decode step of %s failed: %s", seq.request_id, exc)
            seq.publish("error", f"decode step failed: {exc}")
            self.leave(slot)
            return
        log.warning("decode step of %d rows failed (%s); stepping them apart", len(members), exc)
        ordered = sorted(members.items())
        half = (len(ordered) + 1) // 2
        for part in (dict(ordered[:half]), dict(ordered[half:])):
            try:
                out = self._forward(lo, part, {}, apart=True)
            except Exception as again:
                if not self.pipeline.intact:
                    raise
                self._run_apart(lo, part, again)
                continue
            self._apply(out, part, lo)

    def _apply(self, out, members: dict[int, Sequence], lo: int) -> None:
        drawn = jax.device_get(out)
        for s, seq in members.items():
            if self.active.get(s) is not seq:
                continue  # aborted (and maybe replaced) while this step was in flight
            seq.position += 1
            reason = seq.add_drawn(drawn, s - lo)
            seq.publish(reason)
            if reason:
                self.leave(s)

    def retry_or_fail(self, seq: Sequence, error: str) -> None:
        """A request whose KV was lost (it holds no slot): back to prefill the first time, else it fails."""
        retry_or_fail(seq, error, self.requeue)

    def recover(self, error: str) -> None:
        """After a fault that may have consumed the cache: a fresh cache, and every request that
        held a slot goes back to prefill (once) or fails."""
        self._inflight.clear()
        lost = list(self.active.values())
        for slot in list(self.active):
            self.leave(slot)
        self.resets += 1
        self.pool.drop_cache()  # the pages it named went with the cache
        try:
            self.pipeline.reset()
        except Exception:  # the device may still be failing: the next step tries again, and fails its requests
            log.exception("a fresh cache could not be made")
        for seq in lost:
            self.retry_or_fail(seq, error)


@dataclasses.dataclass(frozen=True)
class Delivery:
    """KV pages on this instance's devices (``Handoff.parts``), and whose they are: each row's
    pages follow the previous row's."""

    parts: list
    rows: list[tuple[Sequence, int, int]]  # (sequence, reserved slot, pages of its context)


class DecodeWorker:
    """One decode instance: a pipeline, its slots, and the thread that steps it."""

    def __init__(
        self, name: str, pipeline: Pipeline, pool: KVPool, stop: threading.Event, requeue: Callable[[Sequence], None] | None = None
    ):
        self.name = name
        self.pipeline = pipeline
        self.pool = pool
        self.batch = DecodeBatch(pipeline, pool, requeue)
        self.inbox: queue.SimpleQueue[Delivery] = queue.SimpleQueue()
        self.targets = pipeline.targets
        self._stop = stop
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)

    @property
    def max_seq_len(self) -> int:
        return self.pipeline.max_seq_len

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._receive(wait=not self.batch.busy)
                self.batch.reap_aborted()
                if self.batch.busy:
                    self.batch.step()
            except Exception as exc:  # never let the thread die with requests waiting on it
                log.exception("%s failed", self.name)
                self.batch.recover(f"{self.name} failed: {exc}")

    def _receive(self, wait: bool) -> None:
        try:
            deliveries = [self.inbox.get(timeout=0.05) if wait else self.inbox.get_nowait()]
        except queue.Empty:
            return
        while not self.inbox.empty():
            deliveries.append(self.inbox.get_nowait())
        for d in deliveries:
            ids, live = [], []
            for seq, slot, n in d.rows:
                if seq.aborted.is_set():
                    seq.publish("abort")
                    self.pool.release(slot)
                    ids.append(np.full(n, self.pool.no_page, np.int32))  # not written
                else:
                    ids.append(self.pool.held_pages(slot, n))
                    live.append((seq, slot))
            if not live:
                continue
            try:
                self.pipeline.insert(d.parts, np.concatenate(ids))
            except Exception as exc:
                log.exception("KV insert failed")
                for seq, slot in live:
                    self.pool.release(slot)
                    self.batch.retry_or_fail(seq, f"KV insert failed: {exc}")
                if not self.pipeline.intact:  # it ran, and took the cache it donates with it
                    self.batch.recover(f"KV insert failed: {exc}")
                continue
            for seq, slot in live:
                self.batch.join(seq, slot)
