"""Parameter pytrees of the model, each array tagged with logical axis names.

Pure dataclass pytrees (``flax.struct``) rather than NNX modules: the model is a handful of pure
functions, a pipeline stage is a slice of the stacked ``layers`` along their leading axis, and the
sharding rules of each phase (prefill tensor parallel, decode pipeline stages) are applied to the
logical names below without touching the model code.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec

from jds.model.architecture import Architecture


def axes(*names: str) -> Any:
    """A dataclass field whose array has these logical axis names, one per dimension."""
    return dataclasses.field(metadata={"axes": names})


@struct.dataclass
class LayerParams:
    """All decoder layers, stacked along the leading ``layers`` axis."""

    attn_norm: jax.Array = axes("layers", "embed")
    wq: jax.Array = axes("layers", "embed", "q_heads", "head_dim")
    wk: jax.Array = axes("layers", "embed", "kv_heads", "head_dim")
    wv: jax.Array = axes("layers", "embed", "kv_heads", "head_dim")
    wo: jax.Array = axes("layers", "q_heads", "head_dim", "embed")
    mlp_norm: jax.Array = axes("layers", "embed")
    w_gate: jax.Array = axes("layers", "embed", "mlp")
    w_up: jax.Array = axes("layers", "embed", "mlp")
    w_down: jax.Array = axes("layers", "mlp", "embed")


@struct.dataclass
class Params:
    """The whole model. ``lm_head`` is None when the output projection is tied to ``embed``."""

    embed: jax.Array = axes("vocab", "embed")
    layers: LayerParams
    final_norm: jax.Array = axes("embed")
    lm_head: jax.Array | None = axes("embed", "vocab")


def logical_axes(tree: Any) -> Any:
    """The same pytree with every array replaced by the PartitionSpec of its logical axis names."""
    if tree is None:
        return None
    updates = {}
    for f in dataclasses.fields(tree):
        value = getattr(tree, f.name)
        if dataclasses.is_dataclass(value):
            updates[f.name] = logical_axes(value)
        elif value is not None:
            updates[f.name] = PartitionSpec(*f.metadata["axes"])
    return tree.replace(**updates)


def param_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """Expected shape of every parameter, keyed by field name (layer fields include ``layers``)."""
    L, D, F, V = arch.num_layers, arch.hidden_size, arch.intermediate_size, arch.vocab_size
    H, K, hd = arch.num_heads, arch.num_kv_heads, arch.head_dim
    shapes = {
        "embed": (V, D),
        "final_norm": (D,),
        "attn_norm": (L, D),
        "wq": (L, D, H, hd),
        "wk": (L, D, K, hd),
        "wv": (L, D, K, hd),
        "wo": (L, H, hd, D),
        "mlp_norm": (L, D),
        "w_gate": (L, D, F),
        "w_up": (L, D, F),
        "w_down": (L, F, D),
    }
    if not arch.tie_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


def build_params(arch: Architecture, arrays: dict[str, Any]) -> Params:
    """Assemble a Params from arrays keyed like ``param_shapes``, checking every shape."""
    expected = param_shapes(arch)
    missing = sorted(set(expected) - set(arrays))
    unknown = sorted(set(arrays) - set(expected))
    if missing or unknown:
        raise ValueError(f"parameter set does not match the architecture: missing {missing}, unknown {unknown}")
    for name, shape in expected.items():
        if tuple(arrays[name].shape) != shape:
            raise ValueError(f"parameter {name!r} has shape {tuple(arrays[name].shape)}, architecture expects {shape}")
    layer_names = [f.name for f in dataclasses.fields(LayerParams)]
    return Params(
        embed=arrays["embed"],
        layers=LayerParams(**{n: arrays[n] for n in layer_names}),
        final_norm=arrays["final_norm"],
        lm_head=arrays.get("lm_head"),
    )


def init_params(arch: Architecture, key: jax.Array, dtype: jnp.dtype = jnp.float32) -> Params:
    """Random weights from the shapes alone (normal, std 0.02; norms at one), for load tests."""
    shapes = param_shapes(arch)
    keys = dict(zip(shapes, jax.random.split(key, len(shapes))))
    arrays = {
        name: (
            jnp.ones(shape, dtype)
            if name.endswith("norm")
            else (0.02 * jax.random.normal(keys[name], shape, jnp.float32)).astype(dtype)
        )
        for name, shape in shapes.items()
    }
    return build_params(arch, arrays)

