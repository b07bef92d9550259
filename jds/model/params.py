"""Parameter pytrees of the model, each array tagged with logical axis names.

Pure dataclass pytrees (``flax.struct``) rather than NNX modules: the model is a handful of pure
functions, a pipeline stage is a slice of the stacked ``layers`` along their leading axis (or of
the tuple of per-layer ones, ``split_layers``), and the sharding rules of each phase (prefill
tensor parallel, decode pipeline stages) are applied to the logical names below without touching
the model code.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec

from jds.model.architecture import Architecture


def axes(*names: str, contract: tuple[str, ...] = ()) -> Any:
    """A dataclass field whose array has these logical axis names, one per dimension.

    ``contract`` names the axes a projection weight sums over with its input: quantisation keeps
    one scale per entry of the other axes (per output channel).
    """
    return dataclasses.field(metadata={"axes": names, "contract": contract})


@struct.dataclass
class MatrixWeight:
    """A projection weight as one matrix per layer (the output axes flattened, the summed axes
    flattened), kept in one or both orientations, whichever the products it takes part in read
    fastest; int8 with one scale per output channel, or in the model's float dtype.

    - ``out_in``, ``[layers..., outputs, inputs]``: for one row at a time. XLA's CPU backend
      computes ``row @ out_in.T`` in one fused loop that reads the layer's slice of the stacked
      weights in place (converting each int8 as it reads it). From ``in_out`` the backend first
      copies every layer's slice out of the stack, then YNNPACK reads the copy: a float32 batch-1
      step of SmolLM2 took 24 ms that way against 18.5 ms here (a 16 ms bandwidth floor). The
      embedding table is looked up in this layout too.
    - ``in_out``, ``[layers..., inputs, outputs]``: for several rows, multiplied by YNNPACK (an int8
      layer converted to float once first); it ran products of 8-32 rows 1.1-1.4x faster with the
      inputs first. It is also the only layout of a weight summed over several axes (attention's
      output projection): the fused loop also computes its input row, and reading that row through
      a reshape of heads x head_dim stopped it vectorising (15x slower).

    ``scale`` is ``[layers..., out...]`` in the model's float dtype for int8 values, None for float.
    ``out_shape`` is the output axes' shape, unflattened (``out...``).
    """

    out_in: jax.Array | None
    in_out: jax.Array | None
    scale: jax.Array | None
    out_shape: tuple[int, ...] = struct.field(pytree_node=False, default=())

    def matrix(self, rows: int) -> tuple[jax.Array, bool]:
        """The values a product of ``rows`` rows reads, and whether they are ``in_out``: that
        layout for several rows where it is kept, and wherever it is the only one."""
        if self.in_out is not None and (rows > 1 or self.out_in is None):
            return self.in_out, True
        return self.out_in, False


def matrix_axes(names: tuple[str, ...], contract: tuple[str, ...]) -> MatrixWeight:
    """Logical axes of a ``MatrixWeight``'s arrays for a float field's axes. A flattened group of
    axes is named by its first (the heads of ``heads x head_dim``), which is the one the sharding
    rules split."""
    lead = tuple(n for n in names if n == "layers")
    outputs = tuple(n for n in names if n not in contract and n != "layers")
    return MatrixWeight(lead + (outputs[0], contract[0]), lead + (contract[0], outputs[0]), lead + outputs)


Weight = jax.Array | MatrixWeight  # a projection (or embedding) weight as loaded, or as matrices


@struct.dataclass
class InverseNorm:
    """A layer's RMSNorm weight kept as its reciprocal, for int8 weights: the norm then divides by
    it. XLA's CPU batch-1 loop recomputes its input row once per output, and reading a per-layer
    slice of the norm weight inside that row stopped the int8 loop vectorising; a division by a
    vector is not copied into the loop, so the normalised row is written once instead (SmolLM2
    int8 batch 1: 6.2 ms against 7.2). A zero weight stays exact: ``x / inf == 0``."""

    inverse: jax.Array


@struct.dataclass
class LayerParams:
    """Decoder layers stacked along the leading ``layers`` axis; or, as an element of the tuple
    ``split_layers`` makes, one layer without that axis."""

    attn_norm: jax.Array | InverseNorm = axes("layers", "embed")
    wq: Weight = axes("layers", "embed", "q_heads", "head_dim", contract=("embed",))
    wk: Weight = axes("layers", "embed", "kv_heads", "head_dim", contract=("embed",))
    wv: Weight = axes("layers", "embed", "kv_heads", "head_dim", contract=("embed",))
    wo: Weight = axes("layers", "q_heads", "head_dim", "embed", contract=("q_heads", "head_dim"))
    mlp_norm: jax.Array | InverseNorm = axes("layers", "embed")
    w_gate: Weight = axes("layers", "embed", "mlp", contract=("embed",))
    w_up: Weight = axes("layers", "embed", "mlp", contract=("embed",))
    w_down: Weight = axes("layers", "mlp", "embed", contract=("mlp",))


@struct.dataclass
class Params:
    """The whole model. ``lm_head`` is None when the output projection is tied to ``embed``."""

    embed: Weight = axes("vocab", "embed", contract=("embed",))
    layers: LayerParams | tuple[LayerParams, ...]  # stacked, or each layer's own (``split_layers``)
    final_norm: jax.Array = axes("embed")
    lm_head: Weight | None = axes("embed", "vocab", contract=("embed",))


def split_layers(layers: LayerParams, release: bool = False) -> tuple[LayerParams, ...]:
    """Each layer's weights in arrays of their own (copies), the form ``llama.over_layers`` runs
    as a Python loop. ``release``: delete each stacked array once it is split, so that a device
    holds no more than one weight twice meanwhile (for a caller that owns them all)."""
    count = jax.tree.leaves(layers)[0].shape[0]
    leaves, tree = jax.tree.flatten(layers)
    parts = []
    for i, a in enumerate(leaves):
        parts.append(_unstack(a, count))
        if release and not any(b is a for b in leaves[i + 1 :]):
            a.delete()
    return tuple(tree.unflatten([p[i] for p in parts]) for i in range(count))


@functools.partial(jax.jit, static_argnums=1)
def _unstack(stacked: jax.Array, count: int) -> tuple[jax.Array, ...]:
    return tuple(stacked[i] for i in range(count))


def float_dtype(tree: Any) -> jnp.dtype:
    """The model's float dtype, that of the first floating-point array in ``tree`` (with int8
    weights, a norm or a scale)."""
    return next(a.dtype for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.floating))


def logical_axes(tree: Any) -> Any:
    """The same pytree with every array replaced by the PartitionSpec of its logical axis names."""
    if tree is None:
        return None
    updates = {}
    for f in dataclasses.fields(tree):
        value = getattr(tree, f.name)
        if isinstance(value, InverseNorm):
            updates[f.name] = InverseNorm(PartitionSpec(*f.metadata["axes"]))
        elif isinstance(value, MatrixWeight):
            names = matrix_axes(f.metadata["axes"], f.metadata["contract"])
            specs = {k: None if getattr(value, k) is None else PartitionSpec(*getattr(names, k)) for k in ("out_in", "in_out", "scale")}
            updates[f.name] = MatrixWeight(**specs, out_shape=value.out_shape)
        elif isinstance(value, tuple):  # per-layer weights: their axes less the leading ``layers``
            updates[f.name] = tuple(jax.tree.map(lambda s: PartitionSpec(*s[1:]), logical_axes(v), is_leaf=_is_spec) for v in value)
        elif dataclasses.is_dataclass(value):
            updates[f.name] = logical_axes(value)
        elif value is not None:
            updates[f.name] = PartitionSpec(*f.metadata["axes"])
    return tree.replace(**updates)


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


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

