"""Continuous batching on one device, driven synchronously from the caller's thread.

A fixed number of decode slots share one KV cache. Waiting requests are prefilled as soon as
slots free up (prompts padded to power-of-two length buckets, so the number of compiled shapes
stays small), their KV written into the free slots, and every step decodes all slots at once.
A request leaves its slot on a stop token, a stop string, ``max_tokens`` or the sequence limit.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jds.engine.request import FinishReason, Request, RequestOutput
from jds.model import llama
from jds.model.kv_cache import KVCache, insert
from jds.model.loader import LoadedModel
from jds.model.params import Params
from jds.model.sampling import SamplingRows, sample
from jds.model.tokenizer import IncrementalDetokenizer

MIN_BUCKET = 16
MAX_STOP_IDS = 8


def length_buckets(max_len: int) -> list[int]:
    """Powers of two from MIN_BUCKET, capped by (and ending at) ``max_len``."""
    buckets, b = [], MIN_BUCKET
    while b < max_len:
        buckets.append(b)
        b *= 2
    return buckets + [max_len]


def _pow2_at_least(n: int) -> int:
    return 1 << (n - 1).bit_length()


@dataclasses.dataclass
class _Active:
    """Host-side state of a request holding a slot."""

    request: Request
    detok: IncrementalDetokenizer | None
    position: int  # where the newest token sits
    limit: int  # tokens this request may generate
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: str = ""

    def add(self, token: int, is_stop: bool) -> FinishReason | None:
        """Record a sampled token; the finish reason if the request is now done."""
        self.tokens.append(token)
        if is_stop:
            return "stop"
        if self.detok is not None:
            delta = self.detok.push(token)
            self.text += delta
            if self._cut_at_stop_string(len(delta)):
                return "stop"
        return "length" if len(self.tokens) >= self.limit else None

    def _cut_at_stop_string(self, delta_len: int) -> bool:
        stops = self.request.params.stop
        if not stops or not delta_len:
            return False
        start = max(0, len(self.text) - delta_len - max(map(len, stops)) + 1)
        hits = [i for s in stops if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
        return bool(hits)

    def output(self, reason: FinishReason) -> RequestOutput:
        if self.detok is not None and reason == "length":
            self.text += self.detok.flush()
        return RequestOutput(self.request.request_id, list(self.request.prompt_ids), self.tokens, self.text, reason)


class Generator:
    """Owns the decode slots, their KV cache and the compiled programs of one model."""

    def __init__(self, model: LoadedModel, slots: int = 8):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.model = model
        self.slots = slots
        self.buckets = length_buckets(model.max_seq_len)
        self.cache = KVCache.zeros(model.arch, slots, model.max_seq_len, model.dtype)
        self.rows = _empty_rows(slots)  # sampling settings of each slot, set when a request takes it
        arch = model.arch
        self._prefill = jax.jit(functools.partial(_prefill_and_sample, arch=arch))
        self._insert = jax.jit(insert, donate_argnums=0)
        self._decode = jax.jit(functools.partial(_decode_and_sample, arch=arch), donate_argnums=1)

    def _stop_ids(self, request: Request) -> tuple[int, ...]:
        tok = self.model.tokenizer
        eos = () if request.params.ignore_eos or tok is None else tok.eos_ids
        ids = tuple(dict.fromkeys(eos + request.params.stop_token_ids))
        if len(ids) > MAX_STOP_IDS:
            raise ValueError(f"at most {MAX_STOP_IDS} stop token ids per request, got {len(ids)}")
        return ids

    def _set_row(self, rows: SamplingRows, i: int, request: Request) -> None:
        """Write one request's sampling settings into row ``i`` of host-side rows."""
        p = request.params
        rows.temperature[i], rows.top_k[i], rows.top_p[i], rows.seed[i] = p.temperature, p.top_k, p.top_p, request.seed
        ids = self._stop_ids(request)
        rows.stop_ids[i] = -1
        rows.stop_ids[i, : len(ids)] = ids

    def generate(self, requests: Iterable[Request]) -> list[RequestOutput]:
        """Run requests to completion with continuous batching; outputs in request order."""
        requests = list(requests)
        for r in requests:
            self._stop_ids(r)  # refuse bad requests before any work starts
        waiting = collections.deque(requests)
        active: dict[int, _Active] = {}
        done: dict[str, RequestOutput] = {}
        while waiting or active:
            free = [s for s in range(self.slots) if s not in active]
            if waiting and free:
                admitted = [waiting.popleft() for _ in range(min(len(free), len(waiting)))]
                self._admit(admitted, free, active, done)
            if active:
                self._step(active, done)
        return [done[r.request_id] for r in requests]

    def _admit(self, admitted: list[Request], free: list[int], active: dict[int, _Active], done: dict) -> None:
        longest = max(len(r.prompt_ids) for r in admitted)
        bucket = next(b for b in self.buckets if b >= longest)
        batch = _pow2_at_least(len(admitted))
        tokens = np.zeros((batch, bucket), np.int32)
        lengths = np.ones(batch, np.int32)
        slot_ids = np.full(batch, self.slots, np.int32)  # out of range: padding rows are dropped
        for i, r in enumerate(admitted):
            tokens[i, : len(r.prompt_ids)] = r.prompt_ids
            lengths[i] = len(r.prompt_ids)
            slot_ids[i] = free[i]
        rows = _empty_rows(batch)
        for i, r in enumerate(admitted):
            self._set_row(rows, i, r)
        first, is_stop, kv = self._prefill(self.model.params, tokens, lengths, rows)
        self.cache = self._insert(self.cache, kv, slot_ids)
        first, is_stop = np.asarray(first), np.asarray(is_stop)
        tok = self.model.tokenizer
        for i, r in enumerate(admitted):
            n = len(r.prompt_ids)
            state = _Active(
                request=r,
                detok=IncrementalDetokenizer(tok, list(r.prompt_ids)) if tok is not None else None,
                position=n,
                limit=min(r.params.max_tokens, self.model.max_seq_len - n),
            )
            reason = state.add(int(first[i]), bool(is_stop[i]))
            if reason:
                done[r.request_id] = state.output(reason)
            else:
                active[free[i]] = state
                self._set_row(self.rows, free[i], r)

    def _step(self, active: dict[int, _Active], done: dict) -> None:
        tokens = np.zeros(self.slots, np.int32)
        positions = np.zeros(self.slots, np.int32)
        steps = np.zeros(self.slots, np.int32)
        for s, a in active.items():
            tokens[s], positions[s], steps[s] = a.tokens[-1], a.position, len(a.tokens)
        nxt, is_stop, self.cache = self._decode(self.model.params, self.cache, tokens, positions, self.rows, steps)
        nxt, is_stop = np.asarray(nxt), np.asarray(is_stop)
        for s in list(active):
            a = active[s]
            a.position += 1
            reason = a.add(int(nxt[s]), bool(is_stop[s]))
            if reason:
                done[a.request.request_id] = a.output(reason)
                del active[s]


def _empty_rows(n: int) -> SamplingRows:
    return SamplingRows(
        temperature=np.zeros(n, np.float32),
        top_k=np.zeros(n, np.int32),
        top_p=np.ones(n, np.float32),
        seed=np.zeros(n, np.uint32),
        stop_ids=np.full((n, MAX_STOP_IDS), -1, np.int32),
    )


def _prefill_and_sample(params: Params, tokens, lengths, rows: SamplingRows, *, arch):
    logits, kv = llama.prefill(params, tokens, lengths, arch)
    first, is_stop = sample(logits, rows, jnp.zeros(tokens.shape[0], jnp.int32))
    return first, is_stop, kv


def _decode_and_sample(params: Params, cache: KVCache, tokens, positions, rows: SamplingRows, steps, *, arch):
    logits, cache = llama.decode_step(params, cache, tokens, positions, arch)
    nxt, is_stop = sample(logits, rows, steps)
    return nxt, is_stop, cache
