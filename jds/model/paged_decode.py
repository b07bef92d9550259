"""Decode attention as one Pallas kernel that reads a row's KV pages where they lie in the pool.

The XLA forms of decode attention (``llama``) first gather each row's pages into a buffer of their
own, then attend over it: every cached position is read, written and read again, three times the
bytes of the KV a step must read. At large batches that KV outweighs the weights (32 rows of 2,048
positions of a 7B model: 32 GiB against 13.5 GB), so the copy alone can double a step's time. This
kernel reads each page once, straight from the pool ``[layers, pages, KV, hd, page]`` (K, keys
transposed) and ``[layers, pages, KV, page, hd]`` (V), with the layer as an input, so a scan over
layers slices nothing either.

One program per (row, KV head, split of the row's pages) keeps an online softmax over its pages
(flash decoding: small batches still fill the device); the splits and the token being decoded,
whose K/V the pool does not hold yet, are joined afterwards in plain JAX. Written for Pallas's
Triton lowering (GPUs); elsewhere it runs in Pallas's interpreter, which is how the tests check it
on a CPU. Whether it beats the XLA forms on a GPU is for ``python -m jds.bench layers`` to
measure (the ``attention-kernel`` form); it is chosen with ``JDS_DECODE_ATTENTION=kernel``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pallas_triton

_MASKED = -1e30  # a logit no position reaches; finite, so an empty split's sums stay zero
TARGET_PROGRAMS = 256  # rows x KV heads x splits to aim for: about two waves on an H100/H200's 132 SMs
MIN_ROWS = 16  # the fewest query rows a Triton matrix product takes: a KV head's query heads are padded up to it
# (Pallas's Triton lowering also wants every tile a power of two of elements: page size and head dim too)


def _kernel(layer_ref, length_ref, table_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, pages_per_split: int, page_size: int):
    head, split = pl.program_id(1), pl.program_id(2)
    layer, length = layer_ref[0], length_ref[0]
    q = q_ref[...]  # [G, hd], already scaled
    first = split * pages_per_split
    last = jnp.minimum(first + pages_per_split, (length + page_size - 1) // page_size)

    def page_step(j, carry):
        o, m, l = carry
        page = table_ref[j]
        logits = jnp.dot(q, k_ref[layer, page, head], preferred_element_type=jnp.float32)  # [G, P]
        seen = j * page_size + jnp.arange(page_size) < length
        logits = jnp.where(seen[None, :], logits, _MASKED)
        m_next = jnp.maximum(m, logits.max(axis=1))
        p = jnp.exp(logits - m_next[:, None])
        correction = jnp.exp(m - m_next)
        v = v_ref[layer, page, head]  # [P, hd]
        o = o * correction[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return o, m_next, l * correction + p.sum(axis=1)

    g, hd = q.shape
    start = (jnp.zeros((g, hd), jnp.float32), jnp.full((g,), _MASKED, jnp.float32), jnp.zeros((g,), jnp.float32))
    o, m, l = jax.lax.fori_loop(first, jnp.maximum(first, last), page_step, start)
    o_ref[...], m_ref[...], l_ref[...] = o, m, l


def splits_for(rows: int, kv_heads: int, pages: int) -> int:
    """How many splits each row's ``pages`` are cut into: enough programs to fill the device."""
    return max(1, min(pages, TARGET_PROGRAMS // (rows * kv_heads)))


@functools.partial(jax.jit, static_argnames=("interpret",))
def attention_over_pool(
    q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, layer: jax.Array, tables: jax.Array, lengths: jax.Array, interpret: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Each row's attention over its first ``lengths[b]`` positions, read from the pages
    ``tables[b]`` lists of pool layer ``layer``, in parts: q ``[B, H, hd]`` (scaled); the pools as
    ``KVPages``' K and V. Returns, per split, the unnormalised outputs ``[S, B, KV, G, hd]``, the
    largest logits ``[S, B, KV, G]`` and the sums of exponentials ``[S, B, KV, G]``, G the query
    heads of a KV head padded to at least ``MIN_ROWS``."""
    b, h, hd = q.shape
    n = tables.shape[1]
    kv, page_size = k_pool.shape[2], k_pool.shape[4]
    groups = h // kv
    padded = max(MIN_ROWS, 1 << (groups - 1).bit_length())  # Triton's tiles hold a power of two of elements
    grouped = jnp.pad(q.reshape(b, kv, groups, hd), ((0, 0), (0, 0), (0, padded - groups), (0, 0)))
    splits = splits_for(b, kv, n)
    per_split = -(-n // splits)
    whole = lambda array: pl.BlockSpec(array.shape, lambda *_: (0,) * array.ndim)  # noqa: E731
    kernel = functools.partial(_kernel, pages_per_split=per_split, page_size=page_size)
    o, m, l = pl.pallas_call(
        kernel,
        grid=(b, kv, splits),
        in_specs=[
            pl.BlockSpec((1,), lambda r, k, s: (0,)),  # layer
            pl.BlockSpec((None, 1), lambda r, k, s: (r, 0)),  # the row's length
            pl.BlockSpec((None, n), lambda r, k, s: (r, 0)),  # the row's table
            pl.BlockSpec((None, None, padded, hd), lambda r, k, s: (r, k, 0, 0)),  # its queries of this KV head
            whole(k_pool),
            whole(v_pool),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, padded, hd), lambda r, k, s: (s, r, k, 0, 0)),
            pl.BlockSpec((None, None, None, padded), lambda r, k, s: (s, r, k, 0)),
            pl.BlockSpec((None, None, None, padded), lambda r, k, s: (s, r, k, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((splits, b, kv, padded, hd), jnp.float32),
            jax.ShapeDtypeStruct((splits, b, kv, padded), jnp.float32),
            jax.ShapeDtypeStruct((splits, b, kv, padded), jnp.float32),
        ],
        interpret=interpret,
        # Triton's lowering, named: Pallas's default on a GPU is Mosaic GPU, which stages every
        # block in shared memory, and a block here is the whole pool
        compiler_params=pallas_triton.CompilerParams(num_warps=4, num_stages=2),
        name="jds_paged_decode",
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), lengths.reshape(b, 1).astype(jnp.int32), tables, grouped, k_pool, v_pool)
    return o[..., :groups, :], m[..., :groups], l[..., :groups]


def one_token_attention(
    q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, layer: jax.Array | int, tables: jax.Array, start: jax.Array,
    k_new: jax.Array, v_new: jax.Array,
) -> jax.Array:  # fmt: skip
    """What ``llama.attention_with_cache`` computes for a decode step (q ``[B, 1, H, hd]``, the
    row's positions before ``start[b]`` and the new token's k_new, v_new ``[B, KV, 1, hd]``), with
    the cached positions read by the kernel: its splits and the new token joined by their
    largest logits."""
    b, _, h, hd = q.shape
    kv = k_pool.shape[2]
    scale = hd**-0.5
    queries = (q[:, 0].astype(jnp.float32) * scale).astype(q.dtype)
    parts, tops, sums = attention_over_pool(
        queries, k_pool, v_pool, jnp.asarray(layer, jnp.int32), tables, start, interpret=jax.default_backend() != "gpu"
    )
    grouped = queries.reshape(b, kv, h // kv, hd).astype(jnp.float32)
    new = jnp.sum(grouped * k_new[:, :, 0][:, :, None].astype(jnp.float32), axis=-1)  # [B, KV, G]
    top = jnp.maximum(tops.max(axis=0), new)
    weights = jnp.exp(tops - top)  # [S, B, KV, G]
    p_new = jnp.exp(new - top)
    total = (sums * weights).sum(axis=0) + p_new
    out = (parts * weights[..., None]).sum(axis=0) + p_new[..., None] * v_new[:, :, 0][:, :, None].astype(jnp.float32)
    return (out / total[..., None]).reshape(b, 1, h, hd).astype(q.dtype)
