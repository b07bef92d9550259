"""Weight-only int8: every projection and the embedding table become ``Int8Weight``.

One symmetric scale per output channel (the largest magnitude over the summed axes maps to 127).
Activations, norms, the KV cache and all arithmetic stay in the model's float dtype; only the bytes a
decode step streams from memory shrink, by 4x against float32. On SmolLM2 the greedy continuation
of a 24-token prompt stayed identical for 40 tokens; the parity tests bound the logit error.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jds.model.params import Int8Weight, LayerParams, Params

INT8_MAX = 127


def quantize_weight(w: jax.Array, names: tuple[str, ...], contract: tuple[str, ...]) -> Int8Weight:
    """``w`` with logical axes ``names`` as an ``Int8Weight`` summing over the ``contract`` axes."""
    lead = tuple(i for i, n in enumerate(names) if n == "layers")
    summed = tuple(names.index(n) for n in contract)
    outputs = tuple(i for i in range(w.ndim) if i not in summed + lead)
    out_shape = tuple(w.shape[i] for i in lead + outputs)
    lead_shape = tuple(w.shape[i] for i in lead)
    wf = jnp.transpose(w, lead + outputs + summed).astype(jnp.float32)
    wf = wf.reshape(*lead_shape, math.prod(out_shape[len(lead) :]), -1)
    scale = jnp.max(jnp.abs(wf), axis=-1) / INT8_MAX
    scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero channel stays zero
    values = jnp.clip(jnp.round(wf / scale[..., None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    inputs_first = len(contract) > 1  # see Int8Weight
    return Int8Weight(values.swapaxes(-1, -2) if inputs_first else values, scale.reshape(out_shape).astype(w.dtype), inputs_first)


_quantize_jit = jax.jit(quantize_weight, static_argnums=(1, 2))


def _quantize_fields(tree: Any) -> Any:
    updates = {}
    for f in dataclasses.fields(tree):
        value = getattr(tree, f.name)
        if f.metadata.get("contract") and value is not None and not isinstance(value, Int8Weight):
            updates[f.name] = _quantize_jit(value, f.metadata["axes"], f.metadata["contract"])
    return tree.replace(**updates)


def quantize_params(params: Params) -> Params:
    """The same model with int8 projections and embedding table; norms stay float.

    Each field is quantised in its own call so only one float weight is converted at a time."""
    layers: LayerParams = _quantize_fields(params.layers)
    return _quantize_fields(params).replace(layers=layers)
