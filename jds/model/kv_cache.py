"""The key/value cache: a pool of fixed-size pages for all layers, stacked like the layer parameters.

A sequence's KV lives in pages of ``page_size`` positions, wherever the pool had room; its block
table (kept on the host by whoever owns the pages, ``jds.engine.kv_pool``) lists them in order, so
position ``p`` of a sequence is offset ``p % page_size`` of page ``table[p // page_size]``.
Memory follows the tokens a sequence holds, not the longest it might grow to, and two sequences
may list the same page (a shared prompt prefix).

V is laid out ``[layers, pages, kv_heads, page, head_dim]`` and K, transposed, ``[layers, pages,
kv_heads, head_dim, page]``: a pipeline stage owns a slice of the leading axis, and a page's
positions of one layer are one contiguous block, which a decode step gathers whole
(``gather_pages``) and attends to where it landed. K is stored transposed so that both
products of attention are plain matrix products (queries ``[groups, head_dim] @ [head_dim,
seq]``, probabilities ``[groups, seq] @ [seq, head_dim]``): with K as ``[seq, head_dim]`` the
score product contracts both operands' minor axes, which XLA's CPU backend runs at a third of
memory speed. Lengths are not stored here: whoever owns the pages knows them.

A prefill's KV leaves its program already as pages (``as_pages``: batch row ``r``'s page ``i``
is page ``r * n + i`` of a ``KVPages`` of ``batch * n`` pages), so moving a request's KV is moving
the pages its prompt fills (``take``), and landing it is a scatter of whole pages into the pages
reserved for it (``put``): no position-by-position write, no transpose where it lands.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jds.model.architecture import Architecture
from jds.model.params import axes


@struct.dataclass
class KVPages:
    k: jax.Array = axes("layers", "pages", "kv_heads", "head_dim", "page")
    v: jax.Array = axes("layers", "pages", "kv_heads", "page", "head_dim")

    @classmethod
    def zeros(cls, arch: Architecture, pages: int, page_size: int, dtype: jnp.dtype, layers: int | None = None) -> KVPages:
        """An empty pool of ``pages`` pages for ``layers`` layers (default: all of them)."""
        lead = (arch.num_layers if layers is None else layers, pages, arch.num_kv_heads)
        return cls(k=jnp.zeros((*lead, arch.head_dim, page_size), dtype), v=jnp.zeros((*lead, page_size, arch.head_dim), dtype))

    @property
    def page_size(self) -> int:
        return self.v.shape[3]

    @property
    def num_pages(self) -> int:
        """Also the page id that stands for "no page": a write to it is dropped."""
        return self.v.shape[1]


def gather(cache: KVPages, layer: jax.Array, tables: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The pages ``tables`` ``[B, n]`` lists for each row, of one layer, laid end to end: K
    ``[B, KV, hd, n * page]`` and V ``[B, KV, n * page, hd]`` (what prompt chunks attend to, and
    decode steps where ``llama.decode_attention_form`` says ``end-to-end``). Only those pages are read (one
    gather from the whole pool, never a copy of a layer). An entry past the pool (no page) reads
    the last page: positions the caller masks."""
    b, n = tables.shape
    _, _, kv, hd, p = cache.k.shape
    kt, v = _listed_pages(cache, layer, tables)
    return kt.transpose(0, 2, 3, 1, 4).reshape(b, kv, hd, n * p), v.transpose(0, 2, 1, 3, 4).reshape(b, kv, n * p, hd)


def gather_tokens(cache: KVPages, layer: jax.Array, tables: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The pages ``tables`` ``[B, n]`` lists, of one layer, laid end to end position-major: K and
    V both ``[B, n * page, KV, hd]``, the layout fused attention takes (``flash.chunk_attention``).
    One gather each, reordered as it lands; an entry past the pool reads the last page, as in
    ``gather``."""
    b, n = tables.shape
    _, _, kv, hd, p = cache.k.shape
    kt, v = _listed_pages(cache, layer, tables)
    return kt.transpose(0, 1, 4, 2, 3).reshape(b, n * p, kv, hd), v.transpose(0, 1, 3, 2, 4).reshape(b, n * p, kv, hd)


def _listed_pages(cache: KVPages, layer: jax.Array, tables: jax.Array) -> tuple[jax.Array, jax.Array]:
    """K ``[B, n, KV, hd, P]`` and V ``[B, n, KV, P, hd]`` of the pages ``tables`` lists, one layer;
    an entry past the pool reads the last page."""
    return cache.k.at[layer, tables].get(mode="clip"), cache.v.at[layer, tables].get(mode="clip")


def gather_pages(cache: KVPages, layer: jax.Array, tables: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The pages ``tables`` ``[B, n]`` lists, of one layer, page by page: K ``[B, n, KV, hd,
    page]`` and V ``[B, n, KV, page, hd]``. Each page is read as one contiguous row of the pool and
    lands as one contiguous row, nothing moved within it. An entry past the pool reads the last
    page, as in ``gather``."""
    b, n = tables.shape
    layers, pages = cache.k.shape[:2]
    kt = cache.k.reshape(layers, pages, -1).at[layer, tables].get(mode="clip")
    v = cache.v.reshape(layers, pages, -1).at[layer, tables].get(mode="clip")
    return kt.reshape(b, n, *cache.k.shape[2:]), v.reshape(b, n, *cache.v.shape[2:])


def write(cache: KVPages, k_new: jax.Array, v_new: jax.Array, pages: jax.Array, positions: jax.Array, layer_offset: int = 0) -> KVPages:
    """Write new K/V ``[layers, B, KV, T, hd]`` of row b's token t at ``positions[b, t]`` of page
    ``pages[b, t]`` (``[B, T]``; ``num_pages``: dropped), for layers ``layer_offset`` onwards.
    Jit it with the cache donated so the write happens in place.

    Two forms of the same write, chosen per backend here. XLA's GPU compiler brings every scatter
    to one form before it emits it, the axes its index addresses first: for an index on a later
    axis of the pool (the offset within a page) that is a transposed copy of the whole pool, the
    likeliest cause of the copy that failed every step of a 64-slot cache on an H200. So off a
    CPU every value is addressed by the pool's leading axes in order (``_write_in_axis_order``).
    XLA's CPU backend writes a scatter where it stands, and there indexing the page and offset
    alone (``_write_at_offsets``) compiles and runs faster: a SmolLM2-shaped write of 8 rows in
    0.12 s against 0.26 s of compile and 0.58 against 0.84 ms a call, a chunk of 256 tokens in 8
    against 22 ms."""
    form = _write_at_offsets if jax.default_backend() == "cpu" else _write_in_axis_order
    return form(cache, k_new, v_new, pages, positions, layer_offset)


def _write_at_offsets(cache: KVPages, k_new: jax.Array, v_new: jax.Array, pages: jax.Array, positions: jax.Array, layer_offset: int) -> KVPages:
    layers = slice(layer_offset, layer_offset + k_new.shape[0])
    offsets = positions % cache.page_size
    # The indexed views are [B, T, layers, KV, hd] for both K and V.
    return KVPages(
        k=cache.k.at[layers, pages, :, :, offsets].set(k_new.transpose(1, 3, 0, 2, 4).astype(cache.k.dtype), mode="drop"),
        v=cache.v.at[layers, pages, :, offsets].set(v_new.transpose(1, 3, 0, 2, 4).astype(cache.v.dtype), mode="drop"),
    )


def _write_in_axis_order(cache: KVPages, k_new: jax.Array, v_new: jax.Array, pages: jax.Array, positions: jax.Array, layer_offset: int) -> KVPages:
    """(layer, page, KV head, offset) for V, its head dim the window; K's values one index each,
    (layer, page, KV head, head dim, offset), its offset being its minor axis."""
    n, _, kv_heads, _, hd = k_new.shape
    layer = layer_offset + jnp.arange(n, dtype=jnp.int32)[:, None, None, None]  # [n, 1, 1, 1]
    page, offset = pages[None, :, :, None], (positions % cache.page_size)[None, :, :, None]  # [1, B, T, 1]
    head, dim = jnp.arange(kv_heads, dtype=jnp.int32), jnp.arange(hd, dtype=jnp.int32)
    # Both updates are [n, B, T, KV, hd]: V's indices broadcast to its first four axes, K's to all five.
    k = k_new.transpose(0, 1, 3, 2, 4).astype(cache.k.dtype)
    v = v_new.transpose(0, 1, 3, 2, 4).astype(cache.v.dtype)
    return KVPages(
        k=cache.k.at[layer[..., None], page[..., None], head[:, None], dim, offset[..., None]].set(k, mode="drop"),
        v=cache.v.at[layer, page, head, offset].set(v, mode="drop"),
    )


def as_pages(kv: jax.Array, page_size: int) -> KVPages:
    """A prefill's K and V ``[2, layers, B, KV, T, hd]`` as ``B * n`` pages (``n = ceil(T /
    page_size)``; row ``r``'s page ``i`` is page ``r * n + i``), positions past ``T`` zero."""
    _, layers, b, kv_heads, t, hd = kv.shape
    n = -(-t // page_size)
    kv = jnp.pad(kv, ((0, 0),) * 4 + ((0, n * page_size - t), (0, 0))).reshape(2, layers, b, kv_heads, n, page_size, hd)
    return KVPages(
        k=kv[0].transpose(0, 1, 3, 2, 5, 4).reshape(layers, b * n, kv_heads, hd, page_size),
        v=kv[1].transpose(0, 1, 3, 2, 4, 5).reshape(layers, b * n, kv_heads, page_size, hd),
    )


def take(pages: KVPages, ids: jax.Array) -> KVPages:
    """Pages ``ids`` of ``pages``, in that order (what a transfer moves). Indexed by (layer, page),
    the leading axes in order, as ``write`` explains: indexing the page axis alone makes XLA's GPU
    compiler transpose the pages first."""
    layers = jnp.arange(pages.k.shape[0], dtype=jnp.int32)[:, None]
    return KVPages(k=pages.k[layers, ids[None, :]], v=pages.v[layers, ids[None, :]])


def put(cache: KVPages, update: KVPages, ids: jax.Array, layer_offset: int = 0) -> KVPages:
    """Write the pages of ``update`` over pages ``ids`` of ``cache`` (``num_pages``: dropped), for
    ``update``'s layers from ``layer_offset`` on. Jit it with the cache donated so the write
    happens in place; indexed by (layer, page), as ``take``."""
    layers = layer_offset + jnp.arange(update.k.shape[0], dtype=jnp.int32)[:, None]
    return KVPages(
        k=cache.k.at[layers, ids[None, :]].set(update.k.astype(cache.k.dtype), mode="drop"),
        v=cache.v.at[layers, ids[None, :]].set(update.v.astype(cache.v.dtype), mode="drop"),
    )


def written_pages(tables: jax.Array, positions: jax.Array, page_size: int, no_page: int) -> jax.Array:
    """The page each of ``positions`` ``[B, T]`` falls in, by the rows' block ``tables`` ``[B, n]``;
    ``no_page`` for a position past its table."""
    index = positions // page_size
    page = jnp.take_along_axis(tables, jnp.minimum(index, tables.shape[1] - 1), axis=1)
    return jnp.where(index < tables.shape[1], page, no_page)
