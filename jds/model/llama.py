"""The Llama-family decoder as pure functions over ``Params`` and ``KVPages``.

Both phases share every line of math here; they differ only in the shapes they are called with and,
once placed on meshes, in the sharding of their inputs. Layers run under ``lax.scan`` over the
stacked parameters, so compile time does not grow with depth and a pipeline stage is a slice.
Activations stay in the parameter dtype; normalisation, softmax and logits are computed in float32.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jds.model import flash, kv_cache, paged_decode
from jds.model.architecture import Architecture
from jds.model.kv_cache import KVPages
from jds.model.params import InverseNorm, LayerParams, MatrixWeight, Params, Weight
from jds.model.rope import apply_rope, inverse_frequencies
from jds.model.sampling import log_probabilities

_MASKED = jnp.finfo(jnp.float32).min


def rms_norm(x: jax.Array, weight: jax.Array | InverseNorm, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if isinstance(weight, InverseNorm):
        return (normed / weight.inverse.astype(jnp.float32)).astype(x.dtype)
    return (normed * weight.astype(jnp.float32)).astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention.

    q: ``[B, T, H, hd]``; k, v: ``[B, KV, S, hd]`` (the cache layout); mask: ``[B, T, S]``, True
    where query t may attend to key s. Returns ``[B, T, H, hd]``.
    """
    b, t, h, hd = q.shape
    kv = k.shape[1]
    qg = q.reshape(b, t, kv, h // kv, hd)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (hd**-0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v)
    return out.reshape(b, t, h, hd)


def prompt_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array) -> jax.Array:
    """Causal attention of whole prompts padded to one length; keys past a prompt's length are
    masked. Shapes as ``attention``. Through the fused kernel where the backend has one
    (``flash``: cuDNN's on NVIDIA GPUs, for 16-bit types), which never holds the ``T x T`` scores;
    elsewhere the form above, the fastest measured on XLA's CPU backend."""
    kernel = flash.implementation("prompt", q.dtype, q.shape[2], k.shape[1], q.shape[3])
    if kernel is not None:
        return flash.prompt_attention(q, k, v, lengths, kernel)
    t = q.shape[1]
    idx = jnp.arange(t)
    mask = (idx[None, :, None] >= idx[None, None, :]) & (idx[None, None, :] < lengths[:, None, None])
    return attention(q, k, v, mask)


def attention_with_cache(
    q: jax.Array, kt_cache: jax.Array, v_cache: jax.Array, cached: jax.Array, k_new: jax.Array, v_new: jax.Array
) -> jax.Array:
    """Attention of new tokens over cached positions plus, causally, over each other.

    q: ``[B, T, H, hd]``; caches ``kt_cache`` ``[B, KV, hd, S]`` (keys transposed) and ``v_cache``
    ``[B, KV, S, hd]``, with ``cached`` ``[B, 1, S]`` marking the positions written before these
    tokens; k_new, v_new: ``[B, KV, T, hd]``. Decode is ``T == 1``, a chunk of a long prompt is
    ``T > 1``. The softmax over the two parts is joined by hand so the cache is never concatenated
    (copied).
    """
    b, t, h, hd = q.shape
    kv = kt_cache.shape[1]
    if t == 1:
        return _one_token_attention(q, kt_cache, v_cache, cached, k_new, v_new)
    qg = q.reshape(b, t, kv, h // kv, hd)
    scale = hd**-0.5
    old = jnp.einsum("btkgd,bkds->bkgts", qg, kt_cache, preferred_element_type=jnp.float32) * scale
    old = jnp.where(cached[:, None, None, :, :], old, _MASKED)
    new = jnp.einsum("btkgd,bksd->bkgts", qg, k_new, preferred_element_type=jnp.float32) * scale
    new = jnp.where(jnp.tril(jnp.ones((t, t), bool)), new, _MASKED)
    top = jnp.maximum(old.max(axis=-1, keepdims=True), new.max(axis=-1, keepdims=True))
    p_old, p_new = jnp.exp(old - top), jnp.exp(new - top)
    total = p_old.sum(axis=-1, keepdims=True) + p_new.sum(axis=-1, keepdims=True)
    out = jnp.einsum("bkgts,bksd->btkgd", (p_old / total).astype(v_cache.dtype), v_cache)
    out = out + jnp.einsum("bkgts,bksd->btkgd", (p_new / total).astype(v_new.dtype), v_new)
    return out.reshape(b, t, h, hd)


def _one_token_attention(
    q: jax.Array, kt_cache: jax.Array, v_cache: jax.Array, cached: jax.Array, k_new: jax.Array, v_new: jax.Array
) -> jax.Array:
    """``attention_with_cache`` for a decode step: one query per row, so the query-length axis is
    dropped and each row's heads of a group form one ``[groups, hd] @ [hd, S]`` product (then
    ``[groups, S] @ [S, hd]``), the shapes XLA's CPU backend hands whole to its matrix kernels.
    Against products summed by hand over untransposed keys, a step is as fast over 32 positions
    and 1.1x (batch 8, 256 positions) to 1.3x (batch 32, 2048 positions) faster; the general form
    above, query-length axis and causal mask kept, made the step 1.5x (batch 8, 256 positions) to
    4.5x (batch 32, 2048) slower."""
    b, _, h, hd = q.shape
    kv = kt_cache.shape[1]
    qg = q.reshape(b, kv, h // kv, hd)  # [B, KV, G, hd]
    scale = hd**-0.5
    old = jnp.einsum("bkgd,bkds->bkgs", qg, kt_cache, preferred_element_type=jnp.float32) * scale
    old = jnp.where(cached[:, :, None, :], old, _MASKED)
    new = jnp.sum(qg.astype(jnp.float32) * k_new.astype(jnp.float32), axis=-1, keepdims=True) * scale  # [B, KV, G, 1]
    top = jnp.maximum(old.max(axis=-1, keepdims=True), new)
    p_old, p_new = jnp.exp(old - top), jnp.exp(new - top)
    total = p_old.sum(axis=-1, keepdims=True) + p_new
    out = jnp.einsum("bkgs,bksd->bkgd", (p_old / total).astype(v_cache.dtype), v_cache, preferred_element_type=jnp.float32)
    out = out + (p_new / total) * v_new.astype(jnp.float32)
    return out.reshape(b, 1, h, hd).astype(q.dtype)


DECODE_ATTENTION_FORMS = ("by-page", "end-to-end", "kernel")


def decode_attention_form() -> str:
    """How a decode step reads its rows' KV pages, one of ``DECODE_ATTENTION_FORMS``: page by page
    (``by-page``: ``gather_pages``, then ``one_token_attention_over_pages``), over each row's pages
    laid end to end (``end-to-end``: ``gather``, then ``attention_with_cache``), or by a Pallas
    kernel reading the pages where they lie (``kernel``: ``paged_decode``).

    On XLA's CPU backend page by page is faster than end to end: the end-to-end layout moves K's
    pages between its head and position axes, which XLA's CPU gather does element by element. With
    pages of 64 positions, a SmolLM2 float32 step at batch 8 over 256 positions took 61 ms against
    77, batch 32 over 256 161 against 209, batch 8 over 2,048 183 against 296, batch 32 over 2,048
    634 against 930 (pages of 16 end to end, the earlier default). Page by page wants long pages:
    with pages of 16, batch 32 over 2,048 took 1,904 ms. Other backends keep the end-to-end form
    until a measurement there says otherwise; the kernel, which spares the two copies both XLA
    forms make of every page they read, is unmeasured on a GPU. ``JDS_DECODE_ATTENTION`` overrides
    the choice, for measuring the forms (``python -m jds.bench layers``). It is read as a step is
    traced.
    """
    form = _decode_attention_setting()
    if form is None:
        return "by-page" if jax.default_backend() == "cpu" else "end-to-end"
    return form


def _decode_attention_setting() -> str | None:
    form = os.environ.get("JDS_DECODE_ATTENTION")
    if form is not None and form not in DECODE_ATTENTION_FORMS:
        raise ValueError(f"JDS_DECODE_ATTENTION: {form!r} is not one of {', '.join(DECODE_ATTENTION_FORMS)}")
    return form


def check_form_settings() -> None:
    """Refuse a ``JDS_LAYER_UNROLL``, ``JDS_LAYER_FORM`` or ``JDS_DECODE_ATTENTION`` that means
    nothing, naming it: they are read as programs are traced, and a start should stop over one,
    not its first request. Starts no backend (a router process loads no model)."""
    layer_unroll()
    layers_apart()
    _decode_attention_setting()


def one_token_attention_over_pages(
    q: jax.Array, kt_pages: jax.Array, v_pages: jax.Array, cached: jax.Array, k_new: jax.Array, v_new: jax.Array
) -> jax.Array:
    """Decode attention read page by page: q ``[B, 1, H, hd]``; the row's pages as gathered,
    ``kt_pages`` ``[B, n, KV, hd, P]`` and ``v_pages`` ``[B, n, KV, P, hd]``; ``cached``
    ``[B, n, P]`` marking the positions written before this token; k_new, v_new ``[B, KV, 1, hd]``.
    Each (row, page, KV head) is one ``[groups, hd] @ [hd, P]`` product, then ``[groups, P] @ [P,
    hd]``, summed over pages, so the gathered pages are used where they landed."""
    b, _, h, hd = q.shape
    n, kv = kt_pages.shape[1:3]
    grouped = q.reshape(b, kv, h // kv, hd)  # [B, KV, G, hd]
    scale = hd**-0.5
    qg = jnp.broadcast_to(grouped[:, None], (b, n, *grouped.shape[1:]))
    old = jnp.einsum("bnkgd,bnkdp->bnkgp", qg, kt_pages, preferred_element_type=jnp.float32) * scale
    old = jnp.where(cached[:, :, None, None, :], old, _MASKED)
    new = jnp.sum(grouped.astype(jnp.float32) * k_new.astype(jnp.float32), axis=-1, keepdims=True) * scale  # [B, KV, G, 1]
    top = jnp.maximum(old.max(axis=(1, 4)), new[..., 0])  # [B, KV, G]
    p_old, p_new = jnp.exp(old - top[:, None, :, :, None]), jnp.exp(new - top[..., None])
    total = p_old.sum(axis=(1, 4)) + p_new[..., 0]  # [B, KV, G]
    out = jnp.einsum("bnkgp,bnkpd->bnkgd", p_old.astype(v_pages.dtype), v_pages, preferred_element_type=jnp.float32).sum(axis=1)
    out = (out + p_new * v_new.astype(jnp.float32)) / total[..., None]
    return out.reshape(b, 1, h, hd).astype(q.dtype)


def project(spec: str, x: jax.Array, w: Weight, preferred_element_type: jnp.dtype | None = None) -> jax.Array:
    """``einsum(spec, x, w)``. For a ``MatrixWeight`` the same product as one matrix product of x's
    trailing (summed) axes, flattened, with the values in the layout kept for this many rows, then
    the per-channel scale of int8 values."""
    if not isinstance(w, MatrixWeight):
        return jnp.einsum(spec, x, w, preferred_element_type=preferred_element_type)
    x_axes, rest = spec.split(",")
    w_axes, out_axes = rest.split("->")
    summed = len(set(x_axes) & set(w_axes) - set(out_axes))
    lead = x.shape[: x.ndim - summed]
    rows = x.reshape(math.prod(lead), -1)
    values, inputs_first = w.matrix(rows.shape[0])
    values = values.astype(x.dtype)
    y = jnp.matmul(rows, values if inputs_first else values.T, preferred_element_type=jnp.float32)
    y = y.reshape(*lead, *w.out_shape)
    if w.scale is not None:
        y = y * w.scale.astype(jnp.float32)
    return y.astype(preferred_element_type or x.dtype)


def mlp(x: jax.Array, layer: LayerParams) -> jax.Array:
    gate = project("btd,df->btf", x, layer.w_gate)
    up = project("btd,df->btf", x, layer.w_up)
    # silu(gate) * up, ending in a division by a vector: XLA's CPU backend will not copy that
    # into the loop of an int8 batch-1 product, which would redo it once per output (2.5x slower).
    return project("btf,fd->btd", gate * up / (1 + jnp.exp(-gate)), layer.w_down)


def _qkv(x: jax.Array, layer: LayerParams, positions: jax.Array, arch: Architecture):
    """Project to queries, keys and values; rotate q and k. k and v come out in cache layout."""
    h = rms_norm(x, layer.attn_norm, arch.rms_norm_eps)
    inv_freq = inverse_frequencies(arch)
    q = apply_rope(project("btd,dhk->bthk", h, layer.wq), positions, inv_freq)
    k = apply_rope(project("btd,dhk->bthk", h, layer.wk), positions, inv_freq)
    v = project("btd,dhk->bthk", h, layer.wv)
    return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _finish_layer(x: jax.Array, attn_out: jax.Array, layer: LayerParams, arch: Architecture) -> jax.Array:
    x = x + project("bthk,hkd->btd", attn_out, layer.wo)
    return x + mlp(rms_norm(x, layer.mlp_norm, arch.rms_norm_eps), layer)


def logits(params: Params, x: jax.Array, arch: Architecture) -> jax.Array:
    """Final norm and output projection, in float32: ``[B, D] -> [B, vocab]``."""
    h = rms_norm(x, params.final_norm, arch.rms_norm_eps)
    head = params.embed if params.lm_head is None else params.lm_head
    if isinstance(head, MatrixWeight):
        return _int8_logits(h, head)
    if params.lm_head is None:
        return jnp.einsum("bd,vd->bv", h, head, preferred_element_type=jnp.float32)
    return jnp.einsum("bd,dv->bv", h, head, preferred_element_type=jnp.float32)


HEAD_CHUNK = 4096  # vocabulary rows per piece of an int8 output head


def _int8_logits(h: jax.Array, head: MatrixWeight) -> jax.Array:
    """Logits over an int8 head ``[vocab, D]``, a piece of the vocabulary at a time. Converted
    whole for a batch of rows, the table's float copy (4 bytes per weight, written then read) cost
    2.5x the float32 product itself; a piece's copy stays in cache."""
    (vocab,) = head.out_shape
    chunk = max((c for c in range(1, min(HEAD_CHUNK, vocab) + 1) if vocab % c == 0), default=vocab)
    pieces = MatrixWeight(head.out_in.reshape(vocab // chunk, chunk, -1), None, head.scale.reshape(vocab // chunk, chunk), (chunk,))
    out = jax.lax.map(lambda piece: project("bd,vd->bv", h, piece, preferred_element_type=jnp.float32), pieces)
    return jnp.moveaxis(out, 0, 1).reshape(h.shape[0], vocab)


def embed(params: Params, tokens: jax.Array) -> jax.Array:
    """Token ids ``[B, T]`` to activations ``[B, T, D]``."""
    table = params.embed
    if isinstance(table, MatrixWeight):
        return table.out_in[tokens].astype(table.scale.dtype) * table.scale[tokens][..., None]
    return table[tokens]


def prefill(params: Params, tokens: jax.Array, lengths: jax.Array, arch: Architecture) -> tuple[jax.Array, jax.Array]:
    """Run whole prompts.

    tokens: ``[B, T]`` right-padded to a length bucket; lengths: ``[B]`` true prompt lengths.
    Returns the logits of each prompt's last real token ``[B, vocab]`` and the prompts' K and V in
    the transit layout ``[2, layers, B, KV, T, hd]`` (entries past a prompt's length are padding,
    never attended to).
    """
    x, kv = _whole_prompts(params, tokens, lengths, arch)
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return logits(params, last, arch), kv


SCORE_ROWS = 128  # logit rows (prompt positions over the batch) that exist at once while scoring prompts


def prompt_logprobs(params: Params, tokens: jax.Array, lengths: jax.Array, arch: Architecture, n: int):
    """The log-probability of every prompt token given the ones before it, and the ``n``
    likeliest tokens at each position: ``[B, T-1]``, ``[B, T-1, n]`` ids, ``[B, T-1, n]`` (position
    ``t`` is about token ``t + 1``; past a prompt's length, padding). Logits are made for about
    ``SCORE_ROWS`` positions of the batch at a time, so long prompts never hold ``B x T x vocab``
    of them, and short ones are not padded to a long chunk."""
    x, _ = _whole_prompts(params, tokens, lengths, arch)
    b, t, d = x.shape
    chunk = min(t - 1, max(1, SCORE_ROWS // b)) if t > 1 else 1
    chunks = -(-(t - 1) // chunk)
    pad = chunks * chunk - (t - 1)
    hidden = jnp.pad(x[:, :-1], ((0, 0), (0, pad), (0, 0))).reshape(b, chunks, chunk, d)
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, pad))).reshape(b, chunks, chunk)

    def score(piece):
        h, target = piece
        out = logits(params, h.reshape(b * chunk, d), arch).reshape(b, chunk, -1)
        return log_probabilities(out, target, n)

    chosen, ids, top = jax.lax.map(score, (jnp.moveaxis(hidden, 1, 0), jnp.moveaxis(targets, 1, 0)))
    unchunk = lambda a: jnp.moveaxis(a, 0, 1).reshape(b, chunks * chunk, *a.shape[3:])[:, : t - 1]  # noqa: E731
    return unchunk(chosen), unchunk(ids), unchunk(top)


def layer_unroll() -> int:
    """Layers one iteration of the scan over stacked layers runs (``lax.scan``'s ``unroll``).

    1 on every backend: on a CPU, unrolling over per-layer arrays measured no faster and compiled
    3-5x slower (WORKSPACE.md). On an H200 a fully unrolled decode step ran 1.4-2x faster but
    compiled in about 30 s a shape, too slow for the 60-odd shapes a server prepares; partial
    unrolling is unmeasured there. ``JDS_LAYER_UNROLL`` overrides it, for measuring the forms
    (``python -m jds.bench layers``).
    """
    text = os.environ.get("JDS_LAYER_UNROLL", "1")
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"JDS_LAYER_UNROLL: {text!r} is not a whole number of layers, at least 1")
    return int(text)


LAYER_FORMS = ("stacked", "per-layer")


def layers_apart() -> bool:
    """Whether an instance keeps each layer's weights in arrays of their own, which
    ``over_layers`` runs as a Python loop, rather than stacked under ``lax.scan``.

    No on every backend for now. On a CPU the per-layer arrays ran decode steps 1.5-2.1x slower
    over KV pages and compiled 3-4x slower (``docs/results/layer-loops-cpu-2core``). On an H200 they
    read 32 layers' weights in 4.2 ms against the scan's 10.6 ms, but whole engine steps and their
    compile times there are unmeasured (``python -m jds.bench layers`` measures both).
    ``JDS_LAYER_FORM`` (``stacked`` or ``per-layer``) overrides it; it is read as a model loads
    (``matrices.as_served``).
    """
    form = os.environ.get("JDS_LAYER_FORM", "stacked")
    if form not in LAYER_FORMS:
        raise ValueError(f"JDS_LAYER_FORM: {form!r} is not one of {', '.join(LAYER_FORMS)}")
    return form == "per-layer"


def over_layers(layer_step: Callable, x: jax.Array, layers: LayerParams | Sequence[LayerParams]) -> tuple[jax.Array, Any]:
    """``x, out = layer_step(x, layer, i)`` for every layer in order: the last ``x`` and each
    output stacked along a new leading axis.

    Stacked ``LayerParams`` run under ``lax.scan`` (``i`` traced), so compile time stays flat in
    depth and a pipeline stage is a slice. A sequence of per-layer ``LayerParams`` runs as a
    Python loop (``i`` a constant), each layer's weights their own buffers, which matrix products
    read in place: on an H200, reading 32 layers' weights took 4.2 ms this way against 10.6 ms
    through the scan, which copies each layer's slice first; but the program grows with depth.
    """
    if isinstance(layers, LayerParams):
        count = jax.tree.leaves(layers)[0].shape[0]
        return jax.lax.scan(lambda x, xs: layer_step(x, *xs), x, (layers, jnp.arange(count)), unroll=layer_unroll())
    outs = []
    for i, layer in enumerate(layers):
        x, out = layer_step(x, layer, i)
        outs.append(out)
    return x, jax.tree.map(lambda *each: jnp.stack(each), *outs)


def _whole_prompts(params: Params, tokens: jax.Array, lengths: jax.Array, arch: Architecture) -> tuple[jax.Array, jax.Array]:
    """Every layer over whole prompts: the last layer's activations ``[B, T, D]`` and the K/V."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x = embed(params, tokens)

    def layer_step(x: jax.Array, layer: LayerParams, _):
        q, k, v = _qkv(x, layer, positions, arch)
        x = _finish_layer(x, prompt_attention(q, k, v, lengths), layer, arch)
        return x, (k, v)

    x, (k, v) = over_layers(layer_step, x, params.layers)
    return x, jnp.stack([k, v])


def decoder_layers(
    layers: LayerParams | Sequence[LayerParams],
    cache: KVPages,
    x: jax.Array,
    start: jax.Array,
    tables: jax.Array,
    pages: jax.Array,
    arch: Architecture,
) -> tuple[jax.Array, KVPages]:
    """Run new tokens through the given layers against the cache pages of their rows.

    x: ``[B, T, D]``, the tokens of row b sitting at positions ``start[b] .. start[b] + T``. They
    attend to the row's cached positions before ``start[b]``, read from the pages its block table
    ``tables[b]`` lists (``[B, n]``: a step reads the pages in use rounded up to a bucket, not a
    row's whole reach), and causally to each other; their K/V are written into ``pages`` ``[B, T]``
    (the page each token's position falls in; ``cache.num_pages`` drops the write). ``layers``
    and ``cache`` hold the same layer range, so a pipeline stage runs exactly its own slice. Jit
    with the cache donated so the writes happen in place.
    """
    b, t, _ = x.shape
    context = tables.shape[1] * cache.page_size
    positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    cached = (jnp.arange(context)[None, :] < start[:, None])[:, None, :]  # [B, 1, context]

    # The cache is only read inside the layer loop; the new K/V of all layers are written once
    # after it. Writing into the cache inside the loop made XLA copy the whole cache per layer.
    def layer_step(x: jax.Array, layer: LayerParams, i: jax.Array | int):
        q, k, v = _qkv(x, layer, positions, arch)
        form = decode_attention_form() if t == 1 else None
        if form == "by-page":
            by_page = cached.reshape(b, tables.shape[1], cache.page_size)
            attn = one_token_attention_over_pages(q, *kv_cache.gather_pages(cache, i, tables), by_page, k, v)
        elif form == "kernel":
            attn = paged_decode.one_token_attention(q, cache.k, cache.v, i, tables, start, k, v)
        elif t > 1 and (kernel := flash.implementation("chunk", q.dtype, q.shape[2], k.shape[1], q.shape[3])):
            attn = flash.chunk_attention(q, *kv_cache.gather_tokens(cache, i, tables), k, v, start, kernel)
        else:
            attn = attention_with_cache(q, *kv_cache.gather(cache, i, tables), cached, k, v)
        x = _finish_layer(x, attn, layer, arch)
        return x, (k, v)

    x, (k_new, v_new) = over_layers(layer_step, x, layers)
    # The write happens in place only where XLA sees it follow every layer's read of the cache,
    # but the last layer's new K/V do not depend on its read. So the write is made to depend on
    # the finished activations: a token whose activations are not finite writes nothing (its
    # output is lost anyway). Over per-layer weights XLA otherwise copied the cache twice (its
    # CPU backend drops an optimization barrier before placing copies); the scan's loop already
    # orders every read first.
    pages = jnp.where(jnp.isfinite(x).all(axis=2), pages, cache.num_pages)
    return x, kv_cache.write(cache, k_new, v_new, pages, positions)


def decode_step(
    params: Params, cache: KVPages, tokens: jax.Array, positions: jax.Array, tables: jax.Array, arch: Architecture
) -> tuple[jax.Array, KVPages]:
    """One token for every row, all layers at once (the single-stage case).

    tokens: ``[B]`` the newest token of each row; positions: ``[B]`` where that token sits (equal
    to the row's length before it); tables: ``[B, n]`` each row's pages, covering that position.
    Returns logits ``[B, vocab]`` and the updated cache.
    """
    pages = kv_cache.written_pages(tables, positions[:, None], cache.page_size, cache.num_pages)
    x, cache = decoder_layers(params.layers, cache, embed(params, tokens[:, None]), positions, tables, pages, arch)
    return logits(params, x[:, 0], arch), cache
