"""The key/value cache: one pytree for all layers, stacked like the layer parameters.

V is laid out ``[layers, batch, kv_heads, seq, head_dim]`` and K, transposed, ``[layers, batch,
kv_heads, head_dim, seq]``: a pipeline stage owns a slice of the leading axis, a decode slot is one
row of ``batch``, and each head's block stays contiguous for the attention reads of a decode step.
K is stored transposed so that both products of attention are plain matrix products (queries
``[groups, head_dim] @ [head_dim, seq]``, probabilities ``[groups, seq] @ [seq, head_dim]``): with K
as ``[seq, head_dim]`` the score product contracts both operands' minor axes, which XLA's CPU
backend runs at a third of memory speed (a decode step at batch 32 over 2048 positions took 1.3x
longer that way). Lengths are not stored here: whoever owns the slots knows them.

In transit (prefill to decode) K and V travel stacked in the same layout, ``[2, layers, batch,
kv_heads, seq, head_dim]``: one large copy dispatches faster than two, and K is transposed only
when it lands in a cache. A transit array may hold a range of the layers only (a piece cut at
decode stage boundaries).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jds.model.architecture import Architecture
from jds.model.params import axes

TRANSIT_AXES = ("kv", "layers", "batch", "kv_heads", "seq", "head_dim")


@struct.dataclass
class KVCache:
    k: jax.Array = axes("layers", "batch", "kv_heads", "head_dim", "seq")
    v: jax.Array = axes("layers", "batch", "kv_heads", "seq", "head_dim")

    @classmethod
    def zeros(cls, arch: Architecture, batch: int, seq: int, dtype: jnp.dtype, layers: int | None = None) -> KVCache:
        """An empty cache for ``layers`` layers (default: all of them)."""
        lead = (arch.num_layers if layers is None else layers, batch, arch.num_kv_heads)
        return cls(k=jnp.zeros((*lead, arch.head_dim, seq), dtype), v=jnp.zeros((*lead, seq, arch.head_dim), dtype))

    @property
    def seq(self) -> int:
        return self.v.shape[3]


def insert(cache: KVCache, update: jax.Array, slots: jax.Array, layer_offset: int = 0) -> KVCache:
    """Write a stacked prefill KV ``update`` (batch row i) into cache rows ``slots[i]``, from position 0.

    ``update`` may cover only some layers: it lands at ``layer_offset`` onwards. Rows whose slot
    index is out of range (batch padding, aborted requests) are dropped. Jit it with the cache
    donated so the write happens in place.
    """
    layers, length = update.shape[1], update.shape[4]
    rows = (slice(layer_offset, layer_offset + layers), slots, slice(None))
    k = cache.k.at[(*rows, slice(None), slice(0, length))].set(update[0].swapaxes(3, 4).astype(cache.k.dtype), mode="drop")
    v = cache.v.at[(*rows, slice(0, length))].set(update[1].astype(cache.v.dtype), mode="drop")
    return KVCache(k=k, v=v)
