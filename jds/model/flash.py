"""Fused (flash) attention for whole prompts and prompt chunks: where it applies, and the form a
chunk takes to use it.

``jax.nn.dot_product_attention`` runs cuDNN's flash kernel only when asked for it by name
(``implementation="cudnn"``); left unnamed, it runs XLA's form, which writes out every query's
scores over every key. The kernel takes 16-bit types and head dims up to 128 (256 from Hopper on),
on NVIDIA GPUs with cuDNN present. Rather than restate those rules, which move with every cuDNN
and JAX release, the backend is asked: a small program of the same kind is compiled with the
kernel once per process and shape family, and where that fails (a CPU, a ROCm GPU, float32, an
older cuDNN) the XLA forms in ``llama`` serve, as they do on a CPU. On an H200 the kernel ran
causal attention over 2,048 positions in 0.28 ms against 1.09 ms for XLA's form, and over 4,096 in
0.50 ms against 3.22 ms.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

KERNEL = "cudnn"
KINDS = ("prompt", "chunk")  # causal over padded prompts; a chunk over its row's earlier positions


def implementation(kind: str, dtype: jnp.dtype, heads: int, kv_heads: int, head_dim: int) -> str | None:
    """``KERNEL`` where this backend compiles it for attention of ``kind`` at these head shapes,
    else None (the XLA form). Safe to call while tracing: the probe is compiled apart."""
    if jax.default_backend() != "gpu":
        return None
    return KERNEL if _compiles(kind, KERNEL, jnp.dtype(dtype), heads, kv_heads, head_dim) else None


@functools.cache
def _compiles(kind: str, kernel: str, dtype: jnp.dtype, heads: int, kv_heads: int, head_dim: int) -> bool:
    t, s = 128, 256
    q = jax.ShapeDtypeStruct((1, t, heads, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((1, s, kv_heads, head_dim), dtype)
    k_new = jax.ShapeDtypeStruct((1, kv_heads, t, head_dim), dtype)
    if kind == "prompt":
        fn = functools.partial(prompt_attention, implementation=kernel)
        args = (q, k_new, k_new, jax.ShapeDtypeStruct((1,), jnp.int32))
    else:
        fn = functools.partial(chunk_attention, implementation=kernel)
        args = (q, kv, kv, k_new, k_new, jax.ShapeDtypeStruct((1,), jnp.int32))
    try:
        jax.jit(fn).lower(*args).compile()
    except Exception as error:  # what the kernel refuses surfaces as several exception types
        level = logging.WARNING if jax.default_backend() == "gpu" else logging.DEBUG
        log.log(level, "%s attention stays in XLA's form (%s, %d heads of %d): %s", kind, dtype, heads, head_dim, error)
        return False
    return True


def prompt_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, implementation: str) -> jax.Array:
    """Causal attention of prompts padded to one length, keys past a prompt's ``lengths`` masked,
    through ``jax.nn.dot_product_attention``: q ``[B, T, H, hd]``, k and v ``[B, KV, T, hd]`` (the
    cache layout). The kernel never holds the ``T x T`` scores."""
    return jax.nn.dot_product_attention(
        q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), is_causal=True, key_value_seq_lengths=lengths,
        implementation=implementation,
    )  # fmt: skip


def chunk_attention(
    q: jax.Array, k_context: jax.Array, v_context: jax.Array, k_new: jax.Array, v_new: jax.Array, start: jax.Array,
    implementation: str,
) -> jax.Array:  # fmt: skip
    """Attention of a prompt chunk over its row's earlier positions and, causally, itself, as one
    call: q ``[B, T, H, hd]``, the tokens of row b at positions ``start[b] ..``; ``k_context`` and
    ``v_context`` ``[B, S, KV, hd]``, the row's pages gathered end to end (``kv_cache.gather_tokens``,
    reaching past the chunk's last position); k_new, v_new ``[B, KV, T, hd]``.

    The chunk's K/V are written into the gathered copy at their positions, so the keys are one
    sequence and key s is seen by the chunk's token t exactly where ``s <= start[b] + t``: no
    concatenation, and the softmax is the kernel's own."""
    b, t = q.shape[:2]
    positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    rows = jnp.arange(b)[:, None]
    k = k_context.at[rows, positions].set(jnp.swapaxes(k_new, 1, 2).astype(k_context.dtype), mode="drop")
    v = v_context.at[rows, positions].set(jnp.swapaxes(v_new, 1, 2).astype(v_context.dtype), mode="drop")
    seen = jnp.arange(k.shape[1])[None, None, :] <= positions[:, :, None]  # [B, T, S]
    return jax.nn.dot_product_attention(q, k, v, mask=seen[:, None], implementation=implementation)
