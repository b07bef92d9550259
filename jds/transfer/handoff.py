"""In-process KV handoff: the pages a batch's prompts fill, copied from the prefill mesh onto each
decode stage with ``jax.device_put``.

The prefill program returns its KV as pages (``kv_cache.as_pages``), already cut at every decode
stage boundary of the placement. A handoff takes exactly the pages the requests' prompts fill
(never a padded row or the padding of a length bucket) and puts them straight into the sharding
of the stage that owns their layers (its own ``tp``, which may differ from prefill's): XLA copies
device to device (over NVLink or ICI on accelerators) and never gathers a whole array on one
device. The caller blocks until the copies land, so the decode loop that later writes them into
its pages never waits on a transfer.

Pages move in groups whose sizes are powers of two (``page_groups``): the bytes are the pages'
own, and the programs that take and place a group are compiled once per size, not once per
prompt length.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Protocol

import jax
import numpy as np

from jds.config.stages import StageSpan
from jds.model import kv_cache
from jds.model.kv_cache import KVPages

MAX_GROUP_PAGES = 256  # the largest group a handoff moves at once

Pieces = list[tuple[int, KVPages]]  # KV pages cut at stage boundaries: (first layer, pages)


class PageSource(Protocol):
    """Where a prefilled request's pages are taken from: a prefill batch's KV, or a prefill
    instance's pool."""

    def groups(self, rows: Sequence[tuple[int, int]]) -> list[Pieces]:
        """The first ``n`` pages of each (row, n) in ``rows``, one row after another, in
        ``page_groups`` groups of pieces."""
        ...


def cut(pages: KVPages, starts: Sequence[int]) -> Pieces:
    """Pages of every layer cut at the layers ``starts`` (the first is 0)."""
    if len(starts) == 1:
        return [(0, pages)]  # no slice: no program to run (or compile) for it
    bounds = (*starts, pages.k.shape[0])
    return [(a, KVPages(k=pages.k[a:b], v=pages.v[a:b])) for a, b in zip(bounds, bounds[1:])]


def page_groups(n: int) -> list[int]:
    """Group sizes that add up to ``n`` pages: as many ``MAX_GROUP_PAGES`` as fit, then the
    binary digits of the rest, largest first."""
    whole, rest = divmod(n, MAX_GROUP_PAGES)
    return [MAX_GROUP_PAGES] * whole + [1 << b for b in reversed(range(rest.bit_length())) if rest >> b & 1]


def group_sizes() -> list[int]:
    """Every size ``page_groups`` may give: what a receiving stage compiles."""
    return [1 << b for b in range(MAX_GROUP_PAGES.bit_length())]


def split(ids: np.ndarray) -> list[np.ndarray]:
    """``ids`` cut into consecutive groups of ``page_groups(len(ids))``."""
    bounds = np.cumsum([0, *page_groups(len(ids))])
    return [ids[a:b] for a, b in zip(bounds, bounds[1:])]


@dataclasses.dataclass(frozen=True)
class StageTarget:
    """Where one decode stage wants its KV: its layer range and its cache's sharding."""

    span: StageSpan
    sharding: KVPages  # of shardings, K's and V's


@dataclasses.dataclass(frozen=True)
class Handoff:
    """Pages on the decode devices: for each stage, each group's pieces; and what moving them cost."""

    parts: list[list[Pieces]]
    seconds: float
    bytes: int


_take = jax.jit(kv_cache.take)  # compiled per (pages offered, group size): both powers of two


def compile_take(pages: KVPages, group: int) -> None:
    """Compile the take of ``group`` pages from ``pages`` (abstract), ahead of time."""
    _take.lower(pages, jax.ShapeDtypeStruct((group,), np.int32)).compile()


def take_groups(pieces: Sequence[tuple[int, KVPages]], ids: np.ndarray) -> list[Pieces]:
    """Pages ``ids`` (in order) of every piece, in ``split`` groups, where the pieces are."""
    return [[(start, _taken(pages, group)) for start, pages in pieces] for group in split(np.asarray(ids, np.int32))]


def _taken(pages: KVPages, group: np.ndarray) -> KVPages:
    """Pages ``group`` of ``pages``: the pieces themselves where that is all of them, in order
    (a prompt that fills its whole bucket), so nothing is copied before it moves."""
    if len(group) == pages.num_pages and (group == np.arange(len(group))).all():
        return pages
    return _take(pages, group)


@functools.partial(jax.jit, static_argnums=2)
def _take_cut(pool: KVPages, ids: jax.Array, starts: tuple[int, ...]) -> list[KVPages]:
    return [pages for _, pages in cut(kv_cache.take(pool, ids), starts)]


def take_from_pool(pool: KVPages, ids: np.ndarray, starts: tuple[int, ...]) -> list[Pieces]:
    """Pages ``ids`` (in order) of a pool of every layer, in ``split`` groups, each cut at the
    layers ``starts``: one program per group size, since the pool's shape never changes."""
    return [list(zip(starts, _take_cut(pool, group, starts))) for group in split(np.asarray(ids, np.int32))]


def compile_take_from_pool(pool: KVPages, group: int, starts: tuple[int, ...]) -> None:
    """Compile ``take_from_pool``'s program for ``group`` pages, ahead of time."""
    _take_cut.lower(pool, jax.ShapeDtypeStruct((group,), np.int32), starts).compile()


def send_pages(source: PageSource, rows: Sequence[tuple[int, int]], targets: Sequence[StageTarget]) -> Handoff:
    """Copy the pages of ``rows`` (``PageSource.groups``) onto the stages that own their layers;
    returns when all landed."""
    begin = time.perf_counter()
    parts = place(source.groups(rows), targets)
    jax.block_until_ready(parts)
    moved = sum(a.nbytes for part in parts for group in part for _, pages in group for a in jax.tree.leaves(pages))
    return Handoff(parts, time.perf_counter() - begin, moved)


def place(groups: list[Pieces], targets: Sequence[StageTarget]) -> list[list[Pieces]]:
    """Each group's pieces (on any device, or the host) put on the stages that own their layers."""
    return [
        [[(start, jax.device_put(pages, t.sharding)) for start, pages in group if t.span.start <= start < t.span.stop] for group in groups]
        for t in targets
    ]
