"""In-process KV handoff: ``jax.device_put`` from the prefill mesh into each decode stage's layout.

The prefill program returns K and V stacked in transit arrays ``[2, layers, batch, kv_heads, seq,
head_dim]``, sharded over its own ``tp`` and already cut at every decode stage boundary of the
placement. Each decode stage receives the pieces of its own layer range, put straight into the
stage's sharding (its own ``tp``, which may differ from prefill's): XLA copies device to device
(over NVLink or ICI on accelerators) and never gathers a whole array on one device. The caller blocks until the copies land, so the decode loop that later inserts
them never waits on a transfer.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
from jax.sharding import NamedSharding

from jds.config.stages import StageSpan


@dataclasses.dataclass(frozen=True)
class StageTarget:
    """Where one decode stage wants its KV: its layer range and its transit sharding."""

    span: StageSpan
    sharding: NamedSharding


@dataclasses.dataclass(frozen=True)
class Handoff:
    """A prefill batch's KV on the decode devices: each stage's pieces, and what moving them cost."""

    parts: list[list[tuple[int, jax.Array]]]
    seconds: float
    bytes: int


def send_kv(pieces: Sequence[tuple[int, jax.Array]], targets: Sequence[StageTarget]) -> Handoff:
    """Copy each piece (first layer, transit array) onto the stage that owns its layers; returns when all landed."""
    begin = time.perf_counter()
    parts = [[(start, jax.device_put(kv, t.sharding)) for start, kv in pieces if t.span.start <= start < t.span.stop] for t in targets]
    jax.block_until_ready(parts)
    moved = sum(kv.nbytes for part in parts for _, kv in part)
    return Handoff(parts, time.perf_counter() - begin, moved)
