"""Projection weights as ``MatrixWeight``: the orientations a backend reads fastest, and weight-only int8.

On XLA's CPU backend every layer projection is kept in both orientations (``MatrixWeight`` says
which product reads which), float32 as well as int8: the batch-1 and the batched products each run
near their limit from only one of them. Other backends' matrix units take either, so there float
weights stay as loaded and int8 ones keep a single orientation.

Int8 (``model.quantization: int8``): one symmetric scale per output channel (the largest magnitude
over the summed axes maps to 127). Activations, norms, the KV cache and all arithmetic stay in the
model's float dtype; only the bytes a decode step streams from memory shrink, by 4x against
float32. On SmolLM2 the greedy continuation of a 24-token prompt stayed identical for 40 tokens;
the parity tests bound the logit error.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jds.model import llama
from jds.model.params import InverseNorm, LayerParams, MatrixWeight, Params, split_layers

INT8_MAX = 127


def matrix_weight(
    w: jax.Array, names: tuple[str, ...], contract: tuple[str, ...], batched_copy: bool = False, int8: bool = True
) -> MatrixWeight:
    """``w`` with logical axes ``names`` as a ``MatrixWeight`` summing over the ``contract`` axes,
    its values int8 (per-channel scales) or ``w``'s own.

    Layouts (see ``MatrixWeight``): a layer weight summed over several axes only ``in_out``; the
    embedding table and output head (no layers axis) only ``out_in``; every other layer weight
    ``out_in``, and ``in_out`` too with ``batched_copy``."""
    lead = tuple(i for i, n in enumerate(names) if n == "layers")
    summed = tuple(names.index(n) for n in contract)
    outputs = tuple(i for i in range(w.ndim) if i not in summed + lead)
    out_shape = tuple(w.shape[i] for i in lead + outputs)
    lead_shape = tuple(w.shape[i] for i in lead)
    values = jnp.transpose(w, lead + outputs + summed)
    values = values.reshape(*lead_shape, math.prod(out_shape[len(lead) :]), -1)
    scale = None
    if int8:
        wf = values.astype(jnp.float32)
        scale = jnp.max(jnp.abs(wf), axis=-1) / INT8_MAX
        scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero channel stays zero
        values = jnp.clip(jnp.round(wf / scale[..., None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
        scale = scale.reshape(out_shape).astype(w.dtype)
    by_rows = len(contract) == 1 or not lead
    by_columns = bool(lead) and (batched_copy or not by_rows)
    return MatrixWeight(
        out_in=values if by_rows else None,
        in_out=values.swapaxes(-1, -2) if by_columns else None,
        scale=scale,
        out_shape=out_shape[len(lead) :],
    )


_matrix_jit = jax.jit(matrix_weight, static_argnums=(1, 2, 3, 4))


def _as_matrices(tree: Any, batched_copy: bool, int8: bool) -> Any:
    updates = {}
    for f in dataclasses.fields(tree):
        value = getattr(tree, f.name)
        if f.metadata.get("contract") and value is not None and not isinstance(value, MatrixWeight):
            updates[f.name] = _matrix_jit(value, f.metadata["axes"], f.metadata["contract"], batched_copy, int8)
    return tree.replace(**updates)


def keeps_batched_copies() -> bool:
    """Whether this backend gets layer weights in both orientations: XLA's CPU backend, where the
    batch-1 and the batched products each read one of them faster. Weights then take twice their
    size (int8 half of float32's memory instead of a quarter). Other backends' matrix units take
    either."""
    return jax.default_backend() == "cpu"


def weight_itemsize(quantization: str, float_itemsize: int, batched_copies: bool) -> int:
    """For memory estimates: bytes held per weight, counted twice where both orientations are kept
    (the embedding table, kept once, and int8 scales, under 1%, make it an upper bound)."""
    return (1 if quantization == "int8" else float_itemsize) * (2 if batched_copies else 1)


def held_weight_itemsize(quantization: str, itemsize: int) -> int:
    """Bytes this backend holds per weight for ``model.quantization`` and the float dtype's size."""
    return weight_itemsize(quantization, itemsize, keeps_batched_copies())


def quantize_params(params: Params, batched_copies: bool = False) -> Params:
    """The same model with int8 projections and embedding table; norms stay float, the layers'
    kept as reciprocals (``InverseNorm``).

    Each field is converted in its own call so only one float weight is converted at a time."""
    layers: LayerParams = _as_matrices(params.layers, batched_copies, int8=True)
    layers = layers.replace(attn_norm=InverseNorm(1 / layers.attn_norm), mlp_norm=InverseNorm(1 / layers.mlp_norm))
    return _as_matrices(params, batched_copies, int8=True).replace(layers=layers)


def float_matrices(params: Params) -> Params:
    """Float weights with every layer projection in both orientations (the CPU backend's form);
    the embedding table and output head keep their loaded layout, which the batch-1 head product
    already reads in place. Attention's output projection, summed over heads x head_dim, keeps
    only ``in_out``, the layout it has as loaded."""
    return params.replace(layers=_as_matrices(params.layers, batched_copy=True, int8=False))


def as_served(params: Params, quantization: str) -> Params:
    """Parameters in the form this backend serves them: int8 if asked, both orientations on CPU,
    each layer's weights apart where ``llama.layers_apart`` says so. Takes ``params`` over: the
    stacked arrays are deleted as they are split, so a device never holds more than one weight
    twice, and before any instance places a copy or allocates a cache."""
    if quantization == "int8":
        params = quantize_params(params, keeps_batched_copies())
    elif keeps_batched_copies():
        params = float_matrices(params)
    return params.replace(layers=split_layers(params.layers, release=True)) if llama.layers_apart() else params
