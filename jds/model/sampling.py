"""Token sampling inside jit, one row per decode slot, each row with its own settings.

Randomness comes from ``fold_in(key(seed), step)``: a row's draw depends only on its own seed and
step count, so a seeded request reproduces exactly whatever else shares the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class SamplingRows:
    """Per-row settings: ``temperature`` 0 means greedy; ``top_k`` 0 and ``top_p`` 1 mean off."""

    temperature: jax.Array  # f32 [B]
    top_k: jax.Array  # i32 [B]
    top_p: jax.Array  # f32 [B]
    seed: jax.Array  # u32 [B]
    stop_ids: jax.Array  # i32 [B, S], padded with -1


def _filtered_sample(logits: jax.Array, rows: SamplingRows, steps: jax.Array) -> jax.Array:
    vocab = logits.shape[-1]
    temp = jnp.maximum(rows.temperature, 1e-6)[:, None]
    order = jnp.argsort(-logits, axis=-1)
    ranked = jnp.take_along_axis(logits, order, axis=-1) / temp
    rank = jnp.arange(vocab)[None, :]
    k = jnp.where(rows.top_k > 0, rows.top_k, vocab)[:, None]
    ranked = jnp.where(rank < k, ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    ranked = jnp.where(mass_before < rows.top_p[:, None], ranked, -jnp.inf)  # always keeps rank 0
    keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(rows.seed, steps)
    choice = jax.vmap(jax.random.categorical)(keys, ranked)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]


def sample(logits: jax.Array, rows: SamplingRows, steps: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Next token per row ``[B]`` and whether it is one of the row's stop ids ``[B]``.

    The sort needed by top-k/top-p is skipped when every row is greedy.
    """
    greedy = jnp.argmax(logits, axis=-1)
    sampled = jax.lax.cond(
        jnp.all(rows.temperature == 0),
        lambda: greedy,
        lambda: jnp.where(rows.temperature == 0, greedy, _filtered_sample(logits, rows, steps)),
    ).astype(jnp.int32)
    is_stop = jnp.any(sampled[:, None] == rows.stop_ids, axis=-1)
    return sampled, is_stop
