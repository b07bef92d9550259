"""Weights as matrices: float ones in both orientations on CPU, and weight-only int8 (rounding,
products, sharding and the config key)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from jax.sharding import PartitionSpec

from jds.config import ConfigError, load_config, parse_config
from jds.mesh.rules import make_mesh, shardings
from jds.model import llama
from jds.model.matrices import (
    as_served,
    float_matrices,
    held_weight_itemsize,
    keeps_batched_copies,
    matrix_weight,
    quantize_params,
)
from jds.model.params import InverseNorm, LayerParams, MatrixWeight, init_params
from tests_paths import CONFIGS

TINY = load_config(CONFIGS / "tiny.yaml").model.architecture
# The product each projection field takes part in, as in the model.
SPECS = {"wq": "btd,dhk->bthk", "wk": "btd,dhk->bthk", "wv": "btd,dhk->bthk", "wo": "bthk,hkd->btd",
         "w_gate": "btd,df->btf", "w_up": "btd,df->btf", "w_down": "btf,fd->btd"}  # fmt: skip


def _dequantized(w: MatrixWeight, names: tuple[str, ...], contract: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
    """The float weight a MatrixWeight stands for, back in the float field's layout."""
    if w.out_in is not None and w.in_out is not None:  # both layouts hold the same values
        np.testing.assert_array_equal(np.asarray(w.in_out), np.asarray(w.out_in).swapaxes(-1, -2))
    values = np.asarray(w.out_in if w.out_in is not None else w.in_out.swapaxes(-1, -2), np.float32)
    scale = np.ones(values.shape[:-1], np.float32) if w.scale is None else np.asarray(w.scale, np.float32).reshape(values.shape[:-1])
    kept = [i for i, n in enumerate(names) if n not in contract]
    summed = [names.index(n) for n in contract]
    moved = (values * scale[..., None]).reshape([shape[i] for i in kept + summed])
    return np.transpose(moved, np.argsort(kept + summed))


def _field(name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(LayerParams) if f.name == name)


@pytest.mark.parametrize("batched_copy", [False, True])
@pytest.mark.parametrize("name", SPECS)
def test_int8_weights_round_to_within_half_a_step_of_each_output_channel(name, batched_copy):
    f = _field(name)
    w = getattr(init_params(TINY, jax.random.key(1)).layers, name)
    q = matrix_weight(w, f.metadata["axes"], f.metadata["contract"], batched_copy)
    # The output projection (summed over heads x head_dim) is kept inputs first only; the others
    # outputs first, and inputs first as well when batched products get their own copy.
    assert (q.out_in is None) == (name == "wo") and (q.in_out is None) == (name != "wo" and not batched_copy)
    values = q.out_in if q.out_in is not None else q.in_out
    assert values.dtype == jnp.int8 and int(jnp.max(jnp.abs(values))) == 127  # each channel's largest maps to 127
    back = _dequantized(q, f.metadata["axes"], f.metadata["contract"], w.shape)
    kept = [i for i, n in enumerate(f.metadata["axes"]) if n not in f.metadata["contract"]]
    step = np.asarray(q.scale, np.float32)
    step = np.expand_dims(step, [i for i in range(w.ndim) if i not in kept])
    assert np.all(np.abs(back - np.asarray(w)) <= step / 2 + 1e-7)


@pytest.mark.parametrize("batch", [1, 3])
def test_float_matrices_give_the_loaded_weights_products_in_both_orientations(batch):
    params = init_params(TINY, jax.random.key(3))
    laid_out = float_matrices(params)
    rng = np.random.default_rng(1)
    for name, spec in SPECS.items():
        w = getattr(laid_out.layers, name)
        assert w.scale is None and w.in_out.dtype == jnp.float32
        assert (w.out_in is None) == (name == "wo")  # summed over heads x head_dim: inputs first only
        original = getattr(params.layers, name)
        np.testing.assert_array_equal(_dequantized(w, _field(name).metadata["axes"], _field(name).metadata["contract"], original.shape), original)
        layer = jax.tree.map(lambda a: a[0], w)
        x = rng.standard_normal([batch, 1, *original.shape[1 : 1 + len(spec.split(",")[0]) - 2]]).astype(np.float32)
        np.testing.assert_allclose(llama.project(spec, x, layer), np.einsum(spec, x, original[0]), rtol=1e-5, atol=1e-5)
    assert laid_out.embed is params.embed and laid_out.lm_head is params.lm_head  # read in place already
    # Where both orientations are kept (the CPU backend), the fit check counts both.
    both = keeps_batched_copies()
    assert isinstance(as_served(params, "none").layers.wq, MatrixWeight) == both
    assert held_weight_itemsize("none", 4) == (8 if both else 4) and held_weight_itemsize("int8", 4) == (2 if both else 1)


def test_int8_models_keep_layer_norms_as_reciprocals_that_normalise_alike():
    params = init_params(TINY, jax.random.key(4))
    g = params.layers.attn_norm.at[:, 3].set(0.0).at[:, 5].set(-2.5)  # a zero and a negative channel
    quantized = quantize_params(params.replace(layers=params.layers.replace(attn_norm=g)))
    inverse = quantized.layers.attn_norm
    assert isinstance(inverse, InverseNorm) and isinstance(quantized.layers.mlp_norm, InverseNorm)
    assert quantized.final_norm is params.final_norm  # only the layers' norms feed int8 batch-1 loops
    x = np.random.default_rng(2).standard_normal((2, 3, TINY.hidden_size)).astype(np.float32)
    for layer in (0, TINY.num_layers - 1):
        expected = llama.rms_norm(x, g[layer], TINY.rms_norm_eps)
        actual = llama.rms_norm(x, jax.tree.map(lambda a: a[layer], inverse), TINY.rms_norm_eps)
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-7)
        assert np.all(np.asarray(actual)[..., 3] == 0)


def test_an_all_zero_channel_stays_zero():
    w = jnp.zeros((2, 8, 4)).at[:, :, 1:].set(1.0)
    q = matrix_weight(w, ("layers", "embed", "mlp"), ("embed",))
    assert np.all(np.asarray(q.out_in)[:, 0] == 0) and np.all(np.isfinite(np.asarray(q.scale)))


@pytest.mark.parametrize("batched_copies", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_int8_products_equal_the_float_product_of_the_weights_they_stand_for(batch, batched_copies):
    params = init_params(TINY, jax.random.key(2))
    quantized = quantize_params(params, batched_copies)
    rng = np.random.default_rng(0)
    for name, spec in SPECS.items():
        f = _field(name)
        w = getattr(params.layers, name)[0]
        q = jax.tree.map(lambda a: a[0], getattr(quantized.layers, name))
        names, contract = f.metadata["axes"][1:], f.metadata["contract"]
        back = _dequantized(q, names, contract, w.shape)
        x = rng.standard_normal([batch, 1] + [w.shape[names.index(n)] for n in contract]).astype(np.float32)
        np.testing.assert_allclose(llama.project(spec, x, q), np.einsum(spec, x, back), rtol=1e-4, atol=1e-5)
    # The embedding table, looked up by token, and the output head over the whole vocabulary.
    table = _dequantized(quantized.embed, ("vocab", "embed"), ("embed",), params.embed.shape)
    tokens = np.array([[3, 0, 255]])
    np.testing.assert_allclose(llama.embed(quantized, tokens), table[tokens], rtol=1e-6)
    assert not TINY.tie_embeddings  # so the head is its own field, [embed, vocab] as floats
    head = _dequantized(quantized.lm_head, ("embed", "vocab"), ("embed",), params.lm_head.shape)
    h = rng.standard_normal((batch, TINY.hidden_size)).astype(np.float32)
    normed = np.asarray(llama.rms_norm(h, params.final_norm, TINY.rms_norm_eps))
    np.testing.assert_allclose(llama.logits(quantized, h, TINY), normed @ head, rtol=1e-4, atol=1e-5)


def test_int8_weights_shard_like_the_float_fields_they_replace():
    quantized = quantize_params(init_params(TINY, jax.random.key(0)), batched_copies=True)
    sh = shardings(quantized, make_mesh(jax.devices()[:2]))
    assert sh.layers.wq.out_in.spec == PartitionSpec(None, "tp", None)  # [layers, heads x head_dim, embed]
    assert sh.layers.wq.in_out.spec == PartitionSpec(None, None, "tp")  # [layers, embed, heads x head_dim]
    assert sh.layers.wq.scale.spec == PartitionSpec(None, "tp", None)  # [layers, heads, head_dim]
    assert sh.layers.wo.out_in is None and sh.layers.wo.in_out.spec == PartitionSpec(None, "tp", None)
    assert sh.layers.wo.scale.spec == PartitionSpec(None, None)
    assert sh.layers.w_down.out_in.spec == PartitionSpec(None, None, "tp") and sh.embed.out_in.spec == PartitionSpec(None, None)
    assert sh.embed.in_out is None  # the table and head: one row per token only
    assert sh.layers.attn_norm.inverse.spec == PartitionSpec(None, None)  # norms replicated, as floats
    placed = jax.device_put(quantized, sh)
    heads = TINY.num_heads * TINY.head_dim
    assert placed.layers.wq.out_in.addressable_shards[0].data.shape == (TINY.num_layers, heads // 2, TINY.hidden_size)
    assert placed.layers.wq.in_out.addressable_shards[0].data.shape == (TINY.num_layers, TINY.hidden_size, heads // 2)


def test_the_config_names_an_unknown_quantization():
    data = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    data["model"]["quantization"] = "int4"
    with pytest.raises(ConfigError, match="model.quantization"):
        parse_config(data)
