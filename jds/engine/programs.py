"""The compiled programs of an instance, each bound to its own devices.

``PrefillProgram``: whole prompts, padded to length buckets, on one tensor-parallel mesh; returns
the first sampled token and the KV as pages (``BatchPages``). ``Pipeline``: the decode side, one ``Stage``
per layer range on its own mesh, each owning its weights and its slice of the slot cache. The
slots are split into microbatches; ``forward`` dispatches one microbatch through every stage
without waiting, since JAX runs programs asynchronously (MPMD pipelining; ``DecodeBatch`` keeps
the stages busy, and WORKSPACE.md says why this is not one SPMD program).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq

import jax
import jax.numpy as jnp
import numpy as np

from jds.config.placement import PrefillBatching
from jds.config.stages import StageSpan
from jds.engine.request import PromptLogprobs, TokenLogprob
from jds.mesh.rules import make_mesh, replicated, shardings
from jds.mesh.stages import stage_params
from jds.model import kv_cache, llama
from jds.model.architecture import Architecture
from jds.model.kv_cache import KVPages
from jds.model.params import Params, float_dtype
from jds.model.sampling import Sampled, SamplingRows, sample
from jds.sampling_params import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_STOP_TOKEN_IDS
from jds.scheduling import policy
from jds.scheduling.policy import PrefillBatches, pow2_at_least, row_buckets
from jds.transfer.handoff import Pieces, StageTarget, cut, group_sizes, take_groups

log = logging.getLogger(__name__)

def empty_rows(n: int) -> SamplingRows:
    """Host-side sampling rows: greedy, no stop ids, no penalties."""
    return SamplingRows(
        temperature=np.zeros(n, np.float32),
        top_k=np.zeros(n, np.int32),
        top_p=np.ones(n, np.float32),
        min_p=np.zeros(n, np.float32),
        seed=np.zeros(n, np.uint32),
        stop_ids=np.full((n, MAX_STOP_TOKEN_IDS), -1, np.int32),
        min_tokens=np.zeros(n, np.int32),
        presence_penalty=np.zeros(n, np.float32),
        frequency_penalty=np.zeros(n, np.float32),
        repetition_penalty=np.ones(n, np.float32),
        prompt_len=np.zeros(n, np.int32),
        logprobs=np.full(n, -1, np.int32),
        bias_ids=np.full((n, MAX_LOGIT_BIAS), -1, np.int32),
        bias=np.zeros((n, MAX_LOGIT_BIAS), np.float32),
    )


_EMPTY_ROW = empty_rows(1)


def set_row(rows: SamplingRows, i: int, seq) -> None:
    """Write one sequence's sampling settings into row ``i`` of host-side rows."""
    p = seq.request.params
    rows.temperature[i], rows.top_k[i], rows.top_p[i], rows.min_p[i] = p.temperature, p.top_k, p.top_p, p.min_p
    rows.seed[i], rows.min_tokens[i], rows.prompt_len[i] = seq.request.seed, p.min_tokens, seq.prompt_len
    rows.presence_penalty[i], rows.frequency_penalty[i], rows.repetition_penalty[i] = p.presence_penalty, p.frequency_penalty, p.repetition_penalty
    rows.logprobs[i] = -1 if p.logprobs is None else p.logprobs
    rows.stop_ids[i] = -1
    rows.stop_ids[i, : len(seq.stop_ids)] = seq.stop_ids
    rows.bias_ids[i], rows.bias[i] = -1, 0.0
    for j, (token, bias) in enumerate(p.logit_bias):
        rows.bias_ids[i, j], rows.bias[i, j] = token, bias


def clear_row(rows: SamplingRows, i: int) -> None:
    """Reset row ``i`` to the empty row, so a freed slot's settings (logprobs, penalties, or a value
    that broke a step) no longer shape the steps its free row still rides along in."""
    for row, empty in zip(jax.tree.leaves(rows), jax.tree.leaves(_EMPTY_ROW)):
        row[i] = empty[0]


def slice_rows(rows: SamplingRows, lo: int, hi: int) -> SamplingRows:
    return jax.tree.map(lambda a: a[lo:hi], rows)


def place_params(params: Params, devices: Seq[jax.Device]) -> Params:
    """The whole model on a tensor-parallel mesh over ``devices``."""
    mesh = make_mesh(devices)
    return jax.device_put(params, shardings(params, mesh))


@dataclasses.dataclass(frozen=True)
class BatchPages:
    """A prefill batch's KV as pages, cut at decode stage boundaries: row ``r``'s page ``i`` is
    page ``r * per_row + i`` of every piece."""

    pieces: Pieces
    per_row: int  # pages per batch row: its length bucket's

    @property
    def pages(self) -> int:
        return self.pieces[0][1].num_pages

    def ids(self, rows: Seq[tuple[int, int]]) -> np.ndarray:
        """The pages of each (batch row, page count) in ``rows``, one row after another."""
        return np.concatenate([r * self.per_row + np.arange(n) for r, n in rows] or [np.zeros(0, int)]).astype(np.int32)

    def groups(self, rows: Seq[tuple[int, int]]) -> list[Pieces]:
        """``PageSource.groups``: taken from the batch's pieces."""
        return take_groups(self.pieces, self.ids(rows))

    def local(self) -> BatchPages:
        """This process's own copy, on one device, of pieces gathered whole (``gather_kv``): what
        it may take from without the other processes of its instance."""
        return BatchPages([(start, jax.tree.map(lambda a: a.addressable_data(0), pages)) for start, pages in self.pieces], self.per_row)


@dataclasses.dataclass(frozen=True)
class TakenPages:
    """Prefilled requests' pages already taken out of a prefill instance's pool (which they leave
    at once, so it can take the next batch): each batch row's groups of pieces."""

    rows: dict[int, list[Pieces]]

    def groups(self, rows: Seq[tuple[int, int]]) -> list[Pieces]:
        """``PageSource.groups``: the rows' own groups (they hold exactly their pages)."""
        return [group for row, _ in rows for group in self.rows[row]]

    def local(self) -> TakenPages:
        """Each array on one device of this process (gathered over ``tp``), as an offer needs."""
        def one(a: jax.Array) -> jax.Array:
            return jax.device_put(a, jax.sharding.SingleDeviceSharding(a.addressable_shards[0].device))

        return TakenPages({row: [[(s, jax.tree.map(one, p)) for s, p in g] for g in groups] for row, groups in self.rows.items()})


def page_shardings(arch: Architecture, mesh: jax.sharding.Mesh) -> KVPages:
    """The sharding of KV pages on ``mesh`` (K's and V's, by their logical axes), whatever their
    layer and page counts."""
    return shardings(KVPages.zeros(arch, 1, 1, jnp.float32, 1), mesh)


def _spec(value) -> jax.ShapeDtypeStruct:
    """The abstract twin of a host or device array, for ahead-of-time compiles."""
    return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=getattr(value, "sharding", None))


def _prefill(params: Params, tokens, lengths, *, arch: Architecture, cuts: tuple[int, ...], page_size: int):
    logits, kv = llama.prefill(params, tokens, lengths, arch)
    return logits, tuple(pages for _, pages in cut(kv_cache.as_pages(kv, page_size), (0, *cuts)))


def _sample_first(logits: jax.Array, rows: SamplingRows, history: jax.Array):
    return sample(logits, rows, jnp.zeros(logits.shape[0], jnp.int32), history)


class PrefillProgram:
    """Prompt batches to first tokens and KV pages, on one mesh.

    The KV comes out as pages of ``page_size`` positions (the decode instances'), cut at ``cuts``
    (every decode stage boundary of the placement), so a handoff moves whole pages of whole pieces
    and nothing is sliced after the program. Sampling the first
    token is a program of its own, one per batch size rather than one per (batch, length) shape:
    inside each prefill shape it was 0.4 of its 1 s compile, 10 s of the default start-up.
    """

    def __init__(
        self,
        arch: Architecture,
        params: Params,
        max_len: int,
        batching: PrefillBatching,
        page_size: int,
        cuts: tuple[int, ...] = (),
        gather_kv: bool = False,
    ):
        """``gather_kv`` returns the KV whole on every device of the mesh (for an offer to another
        process) instead of sharded over ``tp`` (for a device-to-device handoff)."""
        self.arch = arch
        self.params = params
        self.max_len = max_len
        self.mesh = jax.tree.leaves(params)[0].sharding.mesh
        self.batches = PrefillBatches.up_to(max_len, batching.max_batch, batching.max_batch_tokens)  # what a call takes
        self.starts = (0, *cuts)
        self.page_size = page_size
        self.gather_kv = gather_kv
        self.broadcast: Callable[..., None] | None = None  # (op, *inputs): a multi-process instance's leader tells its followers
        self._page_sharding = page_shardings(arch, self.mesh)
        kv_sharding = replicated(self.mesh) if gather_kv else self._page_sharding
        self._prefill = jax.jit(
            functools.partial(_prefill, arch=arch, cuts=cuts, page_size=page_size),
            out_shardings=(replicated(self.mesh), (kv_sharding,) * len(self.starts)),
        )
        self._sample = jax.jit(_sample_first, out_shardings=replicated(self.mesh))
        self._score = jax.jit(
            functools.partial(llama.prompt_logprobs, arch=arch, n=MAX_LOGPROBS), out_shardings=replicated(self.mesh)
        )  # compiled on first use per length bucket: scoring prompts is for evaluations, not in warm-up
        self._sample_batches: set[int] = set()  # batch sizes whose sampling warm-up compiled

    def shapes(self) -> list[tuple[int, int]]:
        """Every (batch, bucket) this program can be called with: what warm-up compiles."""
        return self.batches.shapes()

    def page_counts(self) -> list[int]:
        """The pages a call's KV holds, for each shape (what a colocated instance's insert compiles for)."""
        return sorted({batch * policy.pages_for(bucket, self.page_size) for batch, bucket in self.shapes()})

    def page_specs(self, pages: int) -> list[KVPages]:
        """The abstract KV pieces of a call whose KV holds ``pages`` pages, as a handoff takes from
        them (this process's own copy, on one device, where they are gathered whole)."""
        dtype = float_dtype(self.params.layers)
        one = jax.sharding.SingleDeviceSharding(self.mesh.local_devices[0])  # where addressable_data(0) is
        where = KVPages(k=one, v=one) if self.gather_kv else self._page_sharding
        bounds = (*self.starts, self.arch.num_layers)
        specs = []
        for a, b in zip(bounds, bounds[1:]):
            shapes = jax.eval_shape(functools.partial(KVPages.zeros, self.arch, pages, self.page_size, dtype, b - a))
            specs.append(jax.tree.map(lambda s, w: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=w), shapes, where))
        return specs

    def inputs(self, batch: int, bucket: int) -> tuple[np.ndarray, np.ndarray, SamplingRows]:
        """Host inputs of one (batch, bucket) call, all padding: what compiles and profiles use."""
        return np.zeros((batch, bucket), np.int32), np.ones(batch, np.int32), empty_rows(batch)

    def run(self, seqs: list) -> tuple[Sampled, BatchPages]:
        """What each sequence's first token is (on the host), and the batch's KV pages (on this mesh)."""
        batch, bucket = pow2_at_least(len(seqs)), self.batches.bucket(max(s.context_len for s in seqs))
        tokens, lengths, rows = self.inputs(batch, bucket)
        for i, s in enumerate(seqs):
            tokens[i, : s.context_len] = s.context_ids
            lengths[i] = s.context_len
            set_row(rows, i, s)
        if self.broadcast is not None:
            self.broadcast("prefill", tokens, lengths, rows)
        sampled, kv = self.call(tokens, lengths, rows)
        return jax.device_get(sampled), BatchPages(list(zip(self.starts, kv)), policy.pages_for(bucket, self.page_size))

    def call(self, tokens: np.ndarray, lengths: np.ndarray, rows: SamplingRows):
        """The program on prepared host inputs (what a multi-process instance's followers call)."""
        logits, kv = self._prefill(self.params, tokens, lengths)
        return self._sample(logits, rows, self._history(tokens, lengths)), kv

    def score(self, seqs: list) -> list[PromptLogprobs]:
        """For each sequence, the log-probability of each of its prompt tokens given those before
        it (none for the first), with its ``prompt_logprobs`` likeliest tokens at each position:
        the batch in one call."""
        tokens, lengths, _ = self.inputs(pow2_at_least(len(seqs)), self.batches.bucket(max(s.prompt_len for s in seqs)))
        for i, s in enumerate(seqs):
            tokens[i, : s.prompt_len] = s.request.prompt_ids
            lengths[i] = s.prompt_len
        if self.broadcast is not None:
            self.broadcast("score", tokens, lengths)
        chosen, ids, top = jax.device_get(self.score_call(tokens, lengths))
        out = []
        for i, s in enumerate(seqs):
            n, prompt = s.request.params.prompt_logprobs, s.request.prompt_ids
            out.append([None] + [
                TokenLogprob(prompt[t + 1], float(chosen[i, t]), tuple(zip(ids[i, t, :n].tolist(), top[i, t, :n].tolist())))
                for t in range(s.prompt_len - 1)
            ])  # fmt: skip
        return out

    def score_call(self, tokens: np.ndarray, lengths: np.ndarray):
        """The scoring program on prepared host inputs (what a multi-process instance's followers call)."""
        return self._score(self.params, tokens, lengths)

    def _history(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Each row's prompt, padded to the longest bucket with -1 (what penalties read), so the
        sampling program keeps one shape per batch size."""
        history = np.full((tokens.shape[0], self.batches.buckets[-1]), -1, np.int32)
        real = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
        history[:, : tokens.shape[1]] = np.where(real, tokens, -1)
        return history

    def compile(self, batch: int, bucket: int) -> None:
        """Compile one shape ahead of time (nothing runs; later calls of that shape reuse it)."""
        tokens, lengths, rows = jax.tree.map(_spec, self.inputs(batch, bucket))
        self._prefill.lower(self.params, tokens, lengths).compile()
        if batch not in self._sample_batches:
            logits = jax.ShapeDtypeStruct((batch, self.arch.vocab_size), jnp.float32, sharding=replicated(self.mesh))
            history = jax.ShapeDtypeStruct((batch, self.batches.buckets[-1]), jnp.int32)
            self._sample.lower(logits, rows, history).compile()
            self._sample_batches.add(batch)


def _fed_tokens(tokens, feed, from_feed, feed_row):
    """The step's input tokens: a row marked ``from_feed`` takes the token its previous step drew,
    still on the device (``feed``, this microbatch's newest token per row), instead of the host's."""
    fed = jax.lax.dynamic_slice(feed, (feed_row,), (tokens.shape[0],))
    return jnp.where(from_feed[:, None], fed[:, None], tokens)


def _run_stage(params: Params, cache: KVPages, history, feed, inputs, tokens, from_feed, start, tables, pages, row_offset, feed_row, last_index, *, arch, first, last):
    """One stage's layers for one microbatch, reading the cache pages ``tables`` lists. The first stage
    embeds the step's tokens, some taken from ``feed``. The last stage also writes them into its
    rows of the token ``history`` (what penalties read; the cache's twin) and returns the logits
    of each row's ``last_index`` token, for ``_sample_step``."""
    if first:
        inputs = _fed_tokens(inputs, feed, from_feed, feed_row)
    x = llama.embed(params, inputs) if first else inputs
    x, cache = llama.decoder_layers(params.layers, cache, x, start, tables, pages, arch)
    if not last:
        return x, cache, history
    tokens = _fed_tokens(tokens, feed, from_feed, feed_row)
    b, t = tokens.shape
    positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    rows_of = row_offset + jnp.arange(b)[:, None]
    history = history.at[rows_of, positions].set(tokens, mode="drop")
    h = jnp.take_along_axis(x, last_index[:, None, None], axis=1)[:, 0]
    return llama.logits(params, h, arch).astype(jnp.float32), cache, history


def _sample_step(logits, history, feed, rows, steps, start, last_index, row_offset, feed_row) -> tuple[Sampled, jax.Array]:
    """Each row's next token from its logits, penalties reading the row's tokens so far in
    ``history``, and the drawn tokens written into ``feed`` (what lets the host dispatch the next
    step before it reads them). A program of its own, one per row count: inside each step
    program the sampler cost about 1 s of compile on 2 CPU cores for every (rows, context)."""
    b, seen = logits.shape[0], history.shape[1]
    mine = jax.lax.dynamic_slice(history, (row_offset, 0), (b, seen))
    mine = jnp.where(jnp.arange(seen)[None, :] <= (start + last_index)[:, None], mine, -1)  # not a previous occupant's
    drawn = sample(logits, rows, steps, mine)
    return drawn, jax.lax.dynamic_update_slice(feed, drawn.tokens, (feed_row,))


def _write_history(history: jax.Array, slot: jax.Array, ids: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice(history, ids[None, :], (slot, 0))


def _insert_pieces(cache: KVPages, pieces: tuple[KVPages, ...], ids, offsets: tuple[int, ...]) -> KVPages:
    for piece, offset in zip(pieces, offsets):
        cache = kv_cache.put(cache, piece, ids, offset)
    return cache


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """The host's inputs of one program call over a microbatch's rows (see ``Pipeline.forward``)."""

    tokens: np.ndarray  # [B, T] token ids; a row marked in ``from_feed`` is replaced by its ``feed`` entry
    from_feed: np.ndarray  # [B] bool
    start: np.ndarray  # [B] position of each row's first token
    tables: np.ndarray  # [B, n] the pages each row reads (its block table's first n entries)
    pages: np.ndarray  # [B, T] the page each token's K/V is written to (the pool's size: dropped)
    row_offset: int  # the first slot of the rows
    microbatch: int  # whose feed the rows read and write
    feed_row: int  # row_offset's row in that feed
    last_index: np.ndarray  # [B] which of the T tokens is sampled from
    rows: SamplingRows
    steps: np.ndarray  # [B] tokens each row generated before this call


@dataclasses.dataclass(frozen=True)
class PoolShape:
    """The KV pages of a decode instance: how many, and how many positions each holds."""

    pages: int
    page_size: int


class Stage:
    """A layer range with its weights and its layers of the instance's KV pages, on its own mesh.
    The last stage also holds each microbatch's feed: the newest token drawn for each of its rows."""

    def __init__(
        self, arch: Architecture, params: Params, span: StageSpan, devices: Seq[jax.Device], slots: int, seq: int, microbatches: int,
        pool: PoolShape,
    ):  # fmt: skip
        self.arch = arch
        self.span = span
        self.mesh = make_mesh(devices)
        sp = stage_params(params, span) if span.num_layers != arch.num_layers else params
        self.params = jax.device_put(sp, shardings(sp, self.mesh))
        self.cache_sharding = page_shardings(arch, self.mesh)
        self.activations = replicated(self.mesh)
        self.dtype = float_dtype(self.params.layers)  # the activations' (weights may be int8)
        self._zeros = jax.jit(
            functools.partial(KVPages.zeros, arch, pool.pages, pool.page_size, self.dtype, span.num_layers), out_shardings=self.cache_sharding
        )
        self.cache = self._zeros()
        self._empty_history = jax.jit(lambda: jnp.full((slots, seq), -1, jnp.int32), out_shardings=self.activations)
        self.history = self._empty_history() if span.last else None  # each slot's tokens, by position
        self._empty_feed = jax.jit(lambda: jnp.zeros(slots // microbatches, jnp.int32), out_shardings=self.activations)
        self.feeds = [self._empty_feed() for _ in range(microbatches)] if span.last else None
        self._run = jax.jit(
            functools.partial(_run_stage, arch=arch, first=span.first, last=span.last),
            donate_argnums=(1, 2) if span.last else (1,),
            out_shardings=(self.activations, self.cache_sharding, self.activations if span.last else None),
        )
        # The last stage's sampler: it takes the microbatch's feed (a first stage's is a copy of it).
        self._sample = jax.jit(_sample_step, donate_argnums=2, out_shardings=(self.activations, self.activations))
        self._insert = jax.jit(_insert_pieces, donate_argnums=0, static_argnums=3, out_shardings=self.cache_sharding)
        self._write_history = jax.jit(_write_history, donate_argnums=0, out_shardings=self.activations)

    def _run_args(self, inputs, step: StepInputs) -> tuple:
        """What this stage's program takes after its state: what a middle stage does not read is None."""
        first, last = self.span.first, self.span.last
        fed = first or last
        return (
            inputs, step.tokens if last else None, step.from_feed if fed else None, step.start, step.tables, step.pages, np.int32(step.row_offset),
            np.int32(step.feed_row) if fed else None, step.last_index if last else None,
        )  # fmt: skip

    def _sample_args(self, step: StepInputs) -> tuple:
        """What the sampler takes after the logits, the history and the feed."""
        return step.rows, step.steps, step.start, step.last_index, np.int32(step.row_offset), np.int32(step.feed_row)

    def run(self, inputs, step: StepInputs, feed: jax.Array | None = None):
        """Dispatch this stage's program (and the last stage's sampler); ``feed``: for a first stage
        that is not the last, the last stage's feed of the microbatch, on this stage's devices."""
        if self.span.last:
            feed = self.feeds[step.microbatch]
        out, self.cache, self.history = self._run(self.params, self.cache, self.history, feed, *self._run_args(inputs, step))
        if not self.span.last:
            return out
        drawn, self.feeds[step.microbatch] = self._sample(out, self.history, feed, *self._sample_args(step))
        return drawn

    def write_history(self, slot: int, ids: np.ndarray) -> None:
        """Set a slot's token history (the last stage's): ``ids`` ``[max_seq_len]``, -1 past its tokens."""
        self.history = self._write_history(self.history, np.int32(slot), ids)

    def insert(self, groups: list[Pieces], ids: np.ndarray) -> None:
        """Write each group's pieces (first layer, pages on this stage's devices) over pages
        ``ids``: the first group's pages go to the first of them, and so on."""
        done = 0
        for pieces in groups:
            n = pieces[0][1].num_pages
            offsets = tuple(start - self.span.start for start, _ in pieces)
            self.cache = self._insert(self.cache, tuple(p for _, p in pieces), ids[done : done + n], offsets)
            done += n

    def reset(self) -> None:
        """A fresh cache, after a failed program may have consumed the donated one."""
        self.cache = self._zeros()
        if self.span.last:
            self.history = self._empty_history()
            self.feeds = [self._empty_feed() for _ in self.feeds]

    def compile_run(self, batch: int, length: int, context: int) -> jax.stages.Compiled:
        """Compile this stage for ``batch`` rows of ``length`` new tokens reading ``context`` positions, ahead of time."""
        return self.trace_run(batch, length, context).lower().compile()

    def trace_run(self, batch: int, length: int, context: int) -> jax.stages.Traced:
        """This stage's program for that shape, traced from abstract inputs: what ``compile_run`` compiles."""
        if self.span.first:
            inputs = jax.ShapeDtypeStruct((batch, length), jnp.int32)
        else:
            inputs = jax.ShapeDtypeStruct((batch, length, self.arch.hidden_size), self.dtype, sharding=self.activations)
        vector, tokens = np.zeros(batch, np.int32), np.zeros((batch, length), np.int32)
        tables = np.zeros((batch, policy.pages_for(context, self.cache.page_size)), np.int32)
        step = StepInputs(tokens, np.zeros(batch, bool), vector, tables, tokens, 0, 0, 0, vector, empty_rows(batch), vector)
        args = self._run_args(inputs, step)
        feed = _spec(self._empty_feed()) if self.span.first or self.span.last else None
        return self._run.trace(self.params, self.cache, self.history, feed, *jax.tree.map(_spec, args))

    def compile_sample(self, batch: int) -> None:
        """Compile the last stage's sampler for ``batch`` rows, ahead of time."""
        vector, tokens = np.zeros(batch, np.int32), np.zeros((batch, 1), np.int32)
        step = StepInputs(tokens, np.zeros(batch, bool), vector, tokens, tokens, 0, 0, 0, vector, empty_rows(batch), vector)
        logits = jax.ShapeDtypeStruct((batch, self.arch.vocab_size), jnp.float32, sharding=self.activations)
        args = jax.tree.map(_spec, self._sample_args(step))
        self._sample.lower(logits, _spec(self.history), _spec(self._empty_feed()), *args).compile()

    def compile_insert(self, pages: int, starts: Seq[int]) -> jax.stages.Compiled:
        """Compile the insert of ``pages`` pages cut at ``starts``, ahead of time."""
        return self.trace_insert(pages, starts).lower().compile()

    def trace_insert(self, pages: int, starts: Seq[int]) -> jax.stages.Traced:
        """That insert, traced from abstract inputs: what ``compile_insert`` compiles."""
        bounds = [*starts, self.arch.num_layers]
        mine = [(a, b) for a, b in zip(bounds, bounds[1:]) if self.span.start <= a < self.span.stop]
        k, v = self.cache.k, self.cache.v
        pieces = tuple(
            KVPages(
                k=jax.ShapeDtypeStruct((b - a, pages, *k.shape[2:]), k.dtype, sharding=k.sharding),
                v=jax.ShapeDtypeStruct((b - a, pages, *v.shape[2:]), v.dtype, sharding=v.sharding),
            )
            for a, b in mine
        )
        offsets = tuple(a - self.span.start for a, _ in mine)
        return self._insert.trace(self.cache, pieces, jax.ShapeDtypeStruct((pages,), jnp.int32), offsets)


class Pipeline:
    """Decode slots spread over pipeline stages; ``forward`` advances one microbatch of slots."""

    def __init__(
        self,
        arch: Architecture,
        params: Params,
        spans: list[StageSpan],
        stage_devices: list[Seq[jax.Device]],
        slots: int,
        max_seq_len: int,
        microbatches: int,
        pool: PoolShape,
    ):
        self.slots = slots
        self.pool = pool
        self.max_seq_len = max_seq_len
        self.contexts = policy.context_buckets(max_seq_len, pool.page_size)  # how many cache positions a step may read
        self.microbatches = microbatches
        self.microbatch_size = size = slots // microbatches
        self.microbatch_bounds = [(lo, lo + size) for lo in range(0, slots, size)]  # slot range [lo, hi) of each
        self.row_buckets = row_buckets(size)
        self.stages = [Stage(arch, params, span, devs, slots, max_seq_len, microbatches, pool) for span, devs in zip(spans, stage_devices)]

    def round_shape(self, highest: int, longest: int) -> tuple[int, int]:
        """The (rows, context) a step computes when row ``highest`` of its microbatch is the
        highest in use and ``longest`` the furthest position a row writes."""
        return policy.round_shape(self.row_buckets, self.contexts, highest, longest)

    def forward(
        self, tokens: np.ndarray, start: np.ndarray, row_offset: int, last_index: np.ndarray, rows, steps, tables: np.ndarray,
        pages: np.ndarray, from_feed: np.ndarray | None = None,
    ) -> Sampled:  # fmt: skip
        """Dispatch rows ``row_offset ..`` of one microbatch through every stage (asynchronously),
        reading the pages ``tables`` lists (``[rows, n]``: a context of ``Pipeline.round_shape``)
        and writing each token's K/V into ``pages`` (``[rows, T]``); what they draw, on the device.

        A row marked in ``from_feed`` takes as its token the one its previous step drew, without
        the host having read it: so a step can be dispatched while the one before still runs.
        """
        microbatch, feed_row = divmod(row_offset, self.microbatch_size)
        from_feed = np.zeros(tokens.shape[0], bool) if from_feed is None else from_feed
        step = StepInputs(tokens, from_feed, start, tables, pages, row_offset, microbatch, feed_row, last_index, rows, steps)
        x, last = tokens, self.stages[-1]
        for stage in self.stages:
            feed = None
            if not stage.span.first:
                x = jax.device_put(x, stage.activations)
            elif not stage.span.last:
                feed = jax.device_put(last.feeds[microbatch], stage.activations)
            x = stage.run(x, step, feed)
        return x

    def write_history(self, slot: int, ids) -> None:
        """Set a slot's token history to ``ids`` (a sequence's tokens before its next step), for
        penalties; ids are padded with -1 to ``max_seq_len``."""
        padded = np.full(self.max_seq_len, -1, np.int32)
        padded[: len(ids)] = ids
        self.stages[-1].write_history(slot, padded)

    def insert(self, parts: list[list[Pieces]], ids: np.ndarray) -> None:
        """Write transferred pages (each stage's groups of pieces, already on its devices) over
        the pool's pages ``ids``, in order (the pool's size: dropped)."""
        for stage, groups in zip(self.stages, parts):
            stage.insert(groups, ids)

    def reset(self) -> None:
        for stage in self.stages:
            stage.reset()

    @property
    def intact(self) -> bool:
        """Whether every stage still holds its cache: a call that failed before it ran did not
        consume the cache it donates, one that failed on the device may have."""
        held = [leaf for stage in self.stages for leaf in jax.tree.leaves((stage.cache, stage.history, stage.feeds))]
        return not any(leaf.is_deleted() for leaf in held)

    @property
    def cuts(self) -> set[int]:
        """The layers where a stage starts, other than 0."""
        return {stage.span.start for stage in self.stages[1:]}

    @property
    def targets(self) -> list[StageTarget]:
        """Where each stage wants its KV: its layer range and its cache's sharding."""
        return [StageTarget(st.span, st.cache_sharding) for st in self.stages]

    @property
    def starts(self) -> tuple[int, ...]:
        """The first layer of every stage."""
        return (0, *sorted(self.cuts))

    def insert_sizes(self) -> list[int]:
        """The page counts handoffs bring here (``page_groups``' sizes, none larger than the pool)."""
        return [n for n in group_sizes() if n <= self.pool.pages]

    def compile(self, inserts: Seq[int], starts: Seq[int], chunk: int | None = None, steps: bool = True) -> list:
        """Ahead-of-time compile jobs: a decode step of every row bucket (unless not ``steps``: a
        prefill instance's pool), a prompt chunk, the sampler of each of their row counts, the
        insert of each of ``inserts`` pages cut at ``starts``."""
        jobs = [functools.partial(st.compile_run, r, 1, c) for st in self.stages for r in self.row_buckets for c in self.contexts if steps]
        if chunk:
            jobs += [functools.partial(st.compile_run, 1, chunk, c) for st in self.stages for c in self.contexts]
        sampled = sorted(set(self.row_buckets if steps else []) | ({1} if chunk else set()))
        jobs += [functools.partial(self.stages[-1].compile_sample, r) for r in sampled]
        jobs += [functools.partial(st.compile_insert, n, starts) for st in self.stages for n in inserts]
        return jobs


def compile_all(jobs: list[Callable[[], None]], progress: bool) -> None:
    """Run ahead-of-time compile jobs, with a progress bar, as many at a time as there are host
    cores this process may run on (XLA compiles without holding Python's lock). On 2 CPU cores,
    where one XLA compile already keeps about 1.5 busy, the default config's 63 programs took
    53 s against 70 s one at a time; a GPU host's compiles and cores are where it should count
    more, not measured yet."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    workers = len(os.sched_getaffinity(0))
    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="compile")
    try:
        for done in tqdm(concurrent.futures.as_completed([pool.submit(job) for job in jobs]), total=len(jobs), desc="compiling", unit="program", disable=not progress):
            done.result()  # a failed compile fails the start-up
    finally:  # on a failure or Ctrl-C, the queued compiles are dropped rather than waited for
        pool.shutdown(wait=True, cancel_futures=True)
    log.info("compiled %d programs in %.1f s on %d threads", len(jobs), time.perf_counter() - start, workers)
