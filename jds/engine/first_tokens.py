"""Prompt batches to first tokens: one prefill call, its retries apart, and prompt scoring.

What every instance that prefills shares (prefill and colocated ones): a batch's first tokens are
published here, the moment the program's results reach the host (each request's TTFT).
"""

from __future__ import annotations

import logging
import time

from jds.engine.programs import BatchPages, PrefillProgram
from jds.engine.request import PromptLogprobs
from jds.engine.sequence import Sequence

log = logging.getLogger(__name__)

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
