"""Logical axis names to mesh axes: how one model definition is sharded on any instance.

Every instance mesh (a prefill instance, one decode pipeline stage, a colocated instance) has a
single ``tp`` axis. Attention heads and the MLP width are split over it, Megatron style, so each
layer needs one all-reduce after attention and one after the MLP; everything else is replicated.
Pipeline parallelism is not a mesh axis here: a decode stage is its own mesh holding a slice of
the stacked layers (see ``jds.mesh.stages``), so the same rules serve both phases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jds.model.params import logical_axes

TP = "tp"
TENSOR_PARALLEL: Mapping[str, str] = {"q_heads": TP, "kv_heads": TP, "mlp": TP}


def make_mesh(devices: Sequence[jax.Device]) -> Mesh:
    """A one-axis ``tp`` mesh over exactly these devices, in this order."""
    return Mesh(np.array(list(devices)), (TP,))


def mesh_spec(logical: Sequence[str | None], rules: Mapping[str, str] = TENSOR_PARALLEL) -> PartitionSpec:
    """The mesh PartitionSpec for a tuple of logical axis names."""
    return PartitionSpec(*(rules.get(name) if name else None for name in logical))


def shardings(tree: Any, mesh: Mesh, rules: Mapping[str, str] = TENSOR_PARALLEL) -> Any:
    """The NamedSharding of every array in a pytree whose fields declare logical axes."""
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, mesh_spec(spec, rules)),
        logical_axes(tree),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
