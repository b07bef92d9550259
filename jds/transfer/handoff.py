"""In-process KV handoff: ``jax.device_put`` from the prefill mesh into each decode stage's layout.

The prefill program returns K and V stacked in one transit array ``[2, layers, batch, kv_heads,
seq, head_dim]``, sharded over its own ``tp``. Each decode stage receives its own layer range,
put straight into the stage's sharding (its own ``tp``, which may differ from prefill's): XLA
copies device to device (over NVLink or ICI on accelerators) and never gathers the whole array
on one device. The caller blocks until the copies land, so the decode loop that later inserts
them never waits on a transfer.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
from jax.sharding import NamedSharding

from jds.mesh.stages import StageSpan


@dataclasses.dataclass(frozen=True)
class StageTarget:
    """Where one decode stage wants its KV: its layer range and its transit sharding."""

    span: StageSpan
    sharding: NamedSharding


@dataclasses.dataclass(frozen=True)
class Handoff:
    """A prefill batch's KV on the decode devices, one part per stage, and what moving it cost."""

    parts: list[jax.Array]
    seconds: float
    bytes: int


def send_kv(kv: jax.Array, targets: Sequence[StageTarget]) -> Handoff:
    """Copy each stage's layer range of ``kv`` onto that stage's devices; returns when all landed."""
    begin = time.perf_counter()
    num_layers = kv.shape[1]
    parts = []
    for t in targets:
        piece = kv if (t.span.start, t.span.stop) == (0, num_layers) else kv[:, t.span.start : t.span.stop]
        parts.append(jax.device_put(piece, t.sharding))
    jax.block_until_ready(parts)
    return Handoff(parts, time.perf_counter() - begin, sum(p.nbytes for p in parts))
