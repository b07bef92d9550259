"""The decode side: slots that advance together one token per step, and the disaggregated decode worker.

``DecodeBatch`` is the state both the decode worker and the colocated worker step: which sequence
holds which slot, each slot's sampling row, the pipeline that owns the KV. ``DecodeWorker`` is
one thread per decode instance: it inserts KV deliveries into free slots between steps and steps
while anything is active.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading

import numpy as np

from jds.engine.programs import Pipeline, empty_rows, set_row, slice_rows
from jds.engine.sequence import Sequence
from jds.engine.slots import SlotPool

log = logging.getLogger(__name__)


class DecodeBatch:
    """The sequences holding slots of one pipeline; only the owning worker thread calls it.

    A round visits the microbatches in order: it reads the tokens of the microbatch's previous
    dispatch (blocking only on that one), applies them, and dispatches its next step at once.
    With ``pp`` stages and ``pp`` microbatches, while the host reads microbatch m, the other
    microbatches are in flight on the other stages, so every stage keeps working.
    """

    def __init__(self, pipeline: Pipeline, pool: SlotPool):
        self.pipeline = pipeline
        self.pool = pool
        self.active: dict[int, Sequence] = {}
        self.rows = empty_rows(pipeline.slots)  # sampling settings, written when a request takes a slot
        self._inflight: dict[int, tuple[object, dict[int, Sequence]]] = {}  # microbatch -> (device out, members)

    @property
    def busy(self) -> bool:
        return bool(self.active or self._inflight)

    def join(self, seq: Sequence, slot: int) -> None:
        self.active[slot] = seq
        set_row(self.rows, slot, seq)

    def leave(self, slot: int) -> None:
        del self.active[slot]
        self.pool.release(slot)

    def reap_aborted(self) -> None:
        for slot, seq in list(self.active.items()):
            if seq.aborted.is_set():
                seq.publish("abort")
                self.leave(slot)

    def step(self) -> None:
        """One round: every microbatch's previous tokens applied, its next step dispatched."""
        try:
            for m, (lo, hi) in enumerate(self.pipeline.microbatch_bounds):
                if m in self._inflight:
                    self._collect(m)
                self._dispatch(m, lo, hi)
        except Exception as exc:  # a failed program may have consumed the donated cache
            log.exception("decode step failed")
            self.fail_all(f"decode step failed: {exc}")

    def _dispatch(self, m: int, lo: int, hi: int) -> None:
        members = {s: seq for s, seq in self.active.items() if lo <= s < hi}
        if not members:
            return
        n = self.pipeline.rows(max(members) - lo + 1)  # rows lo .. lo + n, a bucket covering every member
        tokens, steps = np.zeros((n, 1), np.int32), np.zeros(n, np.int32)
        # Free slots among those rows still compute, but at a position past the cache, so their
        # K/V writes are dropped: a slot being filled chunk by chunk must not be touched.
        positions = np.full(n, self.pipeline.max_seq_len, np.int32)
        for s, seq in members.items():
            tokens[s - lo, 0], positions[s - lo], steps[s - lo] = seq.tokens[-1], seq.position, len(seq.tokens)
        context = self.pipeline.context(max(seq.position for seq in members.values()))
        out = self.pipeline.forward(tokens, positions, lo, np.zeros(n, np.int32), slice_rows(self.rows, lo, lo + n), steps, context)
        self._inflight[m] = (out, members)

    def _collect(self, m: int) -> None:
        (nxt, is_stop), members = self._inflight.pop(m)
        lo = self.pipeline.microbatch_bounds[m][0]
        nxt, is_stop = np.asarray(nxt), np.asarray(is_stop)
        for s, seq in members.items():
            if self.active.get(s) is not seq:
                continue  # aborted (and maybe replaced) while this step was in flight
            seq.position += 1
            reason = seq.add(int(nxt[s - lo]), bool(is_stop[s - lo]))
            seq.publish(reason)
            if reason:
                self.leave(s)

    def fail_all(self, error: str) -> None:
        self._inflight.clear()
        for slot, seq in list(self.active.items()):
            seq.publish("error", error)
            self.leave(slot)
        self.pipeline.reset()


@dataclasses.dataclass(frozen=True)
class Delivery:
    """A prefill batch's KV on this instance's devices, and which batch row goes to which slot."""

    parts: list
    rows: list[tuple[int, Sequence, int]]  # (batch row, sequence, reserved slot)
    batch: int


class DecodeWorker:
    """One decode instance: a pipeline, its slots, and the thread that steps it."""

    def __init__(self, name: str, pipeline: Pipeline, pool: SlotPool, stop: threading.Event):
        self.name = name
        self.pipeline = pipeline
        self.pool = pool
        self.batch = DecodeBatch(pipeline, pool)
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
                self.batch.fail_all(f"{self.name} failed: {exc}")

    def _receive(self, wait: bool) -> None:
        try:
            deliveries = [self.inbox.get(timeout=0.05) if wait else self.inbox.get_nowait()]
        except queue.Empty:
            return
        while not self.inbox.empty():
            deliveries.append(self.inbox.get_nowait())
        for d in deliveries:
            slot_ids = np.full(d.batch, self.pipeline.slots, np.int32)  # out of range: not inserted
            live = []
            for row, seq, slot in d.rows:
                if seq.aborted.is_set():
                    seq.publish("abort")
                    self.pool.release(slot)
                else:
                    slot_ids[row] = slot
                    live.append((seq, slot))
            if not live:
                continue
            try:
                self.pipeline.insert(d.parts, slot_ids)
            except Exception as exc:
                log.exception("KV insert failed")
                for seq, slot in live:
                    seq.publish("error", f"KV insert failed: {exc}")
                    self.pool.release(slot)
                self.batch.fail_all(f"KV insert failed: {exc}")
                continue
            for seq, slot in live:
                self.batch.join(seq, slot)
