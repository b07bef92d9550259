"""The key/value cache: one pytree for all layers, stacked like the layer parameters.

Layout ``[layers, batch, kv_heads, seq, head_dim]``: a pipeline stage owns a slice of the leading
axis, a decode slot is one row of ``batch``, and the per-head ``seq x head_dim`` block stays
contiguous for the attention reads of a decode step. Lengths are not stored here: whoever owns the
slots knows them.

In transit (prefill to decode) K and V travel stacked, ``[2, layers, batch, kv_heads, seq,
head_dim]``: one large copy dispatches faster than two. A transit array may hold a range of the
layers only (a piece cut at decode stage boundaries).
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
    k: jax.Array = axes("layers", "batch", "kv_heads", "seq", "head_dim")
    v: jax.Array = axes("layers", "batch", "kv_heads", "seq", "head_dim")

    @classmethod
    def zeros(cls, arch: Architecture, batch: int, seq: int, dtype: jnp.dtype, layers: int | None = None) -> KVCache:
        """An empty cache for ``layers`` layers (default: all of them)."""
        shape = (arch.num_layers if layers is None else layers, batch, arch.num_kv_heads, seq, arch.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def seq(self) -> int:
        return self.k.shape[3]

    def stacked(self) -> jax.Array:
        """K and V as one array in the transit layout."""
        return jnp.stack([self.k, self.v])


def insert(cache: KVCache, update: jax.Array, slots: jax.Array, layer_offset: int = 0) -> KVCache:
    """Write a stacked prefill KV ``update`` (batch row i) into cache rows ``slots[i]``, from position 0.

    ``update`` may cover only some layers: it lands at ``layer_offset`` onwards. Rows whose slot
    index is out of range (batch padding, aborted requests) are dropped. Jit it with the cache
    donated so the write happens in place.
    """
    layers, length = update.shape[1], update.shape[4]
    where = (slice(layer_offset, layer_offset + layers), slots, slice(None), slice(0, length))

    def put(dst: jax.Array, src: jax.Array) -> jax.Array:
        return dst.at[where].set(src.astype(dst.dtype), mode="drop")

    return KVCache(k=put(cache.k, update[0]), v=put(cache.v, update[1]))
