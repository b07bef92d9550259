"""The prefill side of a disaggregated placement: one prefill thread and one transfer thread per instance.

The prefill thread takes FCFS batches from the shared waiting queue, runs them, publishes each
request's first token (its TTFT), and puts the batch's KV on a small bounded queue. The transfer
thread routes each request to the decode instance with the most room (``policy.decode_room``), reserves a slot and pages, moves
the pages its prompt fills with ``device_put`` and blocks until they have landed, then hands them to
that instance's inbox. A full transfer queue stalls prefill: KV waiting for decode room stays bounded.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from jds.engine.decode import DecodeWorker, Delivery
from jds.engine.programs import BatchPages, PrefillProgram
from jds.engine.request import PromptLogprobs
from jds.engine.sequence import Sequence
from jds.engine.waiting import WaitingQueue
from jds.scheduling import policy
from jds.transfer.handoff import send_pages

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05


Prefilled = tuple[list[tuple[int, Sequence]], BatchPages]  # (batch row, sequence) pairs that go on to decode, and the KV


def prefill_batch(program: PrefillProgram, seqs: list[Sequence]) -> list[Prefilled]:
    """Run one prefill batch and publish first tokens; for each program run that succeeded, the
    requests that go on to decode and their KV.

    A batch that fails is run again in halves, down to single requests, so that a request whose
    own input breaks the program fails alone and its neighbours get the tokens they would have
    had; a request fails once it has failed alone too (a fault of the device fails each request
    after that one retry).
    """
    now = time.perf_counter()
    for s in seqs:
        if s.timings.prefill_start is None:  # not a request prefilled again after a device fault
            s.timings.prefill_start = now
    runs = _run_apart_on_failure(program, seqs, retried=False)
    return [(going, kv) for going, kv in (_first_tokens(program, out, part) for out, part in runs) if going]


def _run_apart_on_failure(program: PrefillProgram, seqs: list[Sequence], retried: bool) -> list[tuple[tuple, list[Sequence]]]:
    try:
        return [(program.run(seqs), seqs)]
    except Exception as exc:
        if len(seqs) == 1 and retried:
            log.exception("prefill of %s failed", seqs[0].request_id)
            seqs[0].publish("error", f"prefill failed: {exc}")
            return []
        log.warning("prefill of %d request(s) failed (%s); running them again apart", len(seqs), exc)
        half = (len(seqs) + 1) // 2
        parts = [seqs] if len(seqs) == 1 else [seqs[:half], seqs[half:]]
        return [run for part in parts for run in _run_apart_on_failure(program, part, retried=True)]


def _first_tokens(program: PrefillProgram, out: tuple, seqs: list[Sequence]) -> Prefilled:
    drawn, kv = out
    going = []
    scored = {id(s) for s in score_prompts(program, [s for s in seqs if not s.aborted.is_set()])}
    for i, s in enumerate(seqs):
        if s.aborted.is_set():
            s.publish("abort")
            continue
        if s.tokens:  # prefilled again after a device fault: its newest token is known, its KV rebuilt
            going.append((i, s))
            continue
        if id(s) not in scored:
            continue
        if s.limit == 0:  # max_tokens 0: the prompt (its log-probabilities) was all it asked about
            s.publish("length")
            continue
        reason = s.add_drawn(drawn, i)
        s.publish(reason)
        if reason is None:
            going.append((i, s))
    return going, kv


def score_prompts(program: PrefillProgram, seqs: list[Sequence]) -> list[Sequence]:
    """Give each of ``seqs`` that asks for them its prompt's log-probabilities, all in one call;
    if that call fails, each alone, so only a request whose own scoring fails fails. Returns the
    sequences that go on."""
    asking = [s for s in seqs if s.request.params.prompt_logprobs is not None and s.prompt_logprobs is None]
    if not asking:
        return seqs
    try:
        scores = program.score(asking)
    except Exception as exc:
        if len(asking) == 1:
            scores = [_scoring_failed(asking[0], exc)]
        else:
            log.warning("scoring %d prompts failed (%s); scoring them apart", len(asking), exc)
            scores = [_score_alone(program, s) for s in asking]
    failed = set()
    for s, score in zip(asking, scores):
        s.prompt_logprobs = score
        if score is None:
            failed.add(id(s))
    return [s for s in seqs if id(s) not in failed]


def _score_alone(program: PrefillProgram, seq: Sequence) -> PromptLogprobs | None:
    try:
        return program.score([seq])[0]
    except Exception as exc:
        return _scoring_failed(seq, exc)


def _scoring_failed(seq: Sequence, exc: Exception) -> None:
    log.error("scoring the prompt of %s failed: %s", seq.request_id, exc)
    seq.publish("error", f"scoring the prompt failed: {exc}")


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
        those long enough for it; None if that one cannot admit it now."""
        need = seq.prompt_len + seq.limit
        with self._cond:
            fits = [d for d in self.decoders if d.max_seq_len >= need]
            best = policy.most_room([d.pool.room for d in fits])
            if best is None:
                return None
            slot = fits[best].pool.try_reserve(seq.context_len, need)
            return None if slot is None else (fits[best], slot)

    def wait(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait(timeout)

    def send(self, kv: BatchPages, going: list[tuple[int, Sequence]]) -> None:
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

    def _ship(self, kv: BatchPages, groups: dict[DecodeWorker, list[tuple[int, Sequence, int]]]) -> None:
        for decoder, rows in groups.items():
            counts = [policy.pages_for(seq.context_len, decoder.pool.page_size) for _, seq, _ in rows]
            try:
                handoff = send_pages(kv.pieces, kv.ids([(row, n) for (row, _, _), n in zip(rows, counts)]), decoder.targets)
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


Ship = Callable[[BatchPages, list[tuple[int, Sequence]]], None]  # where a prefilled batch's KV goes


class PrefillWorker:
    """One prefill instance: its program, its prefill thread and its transfer thread.

    ``ship`` is the transfer thread's job: ``DecodeRouter.send`` in one process, an offer for a
    decode process to pull when roles run as processes.
    """

    def __init__(self, name: str, program: PrefillProgram, waiting: WaitingQueue, ship: Ship, stop: threading.Event):
        self.name = name
        self.program = program
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
        seqs = self._waiting.take(self.program.batches, _any_prompt, timeout=POLL_SECONDS)
        if not seqs:
            return
        for s in seqs:
            s.timings.route.append(self.name)
        for going, kv in prefill_batch(self.program, seqs):
            self._put_pending((kv, going))

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
