"""Parameter and cache pytrees: every array carries one logical axis name per dimension."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from jds.model.architecture import Architecture
from jds.model.kv_cache import KVPages, as_pages, gather, put, take
from jds.model.params import build_params, init_params, logical_axes, param_shapes

ARCH = Architecture(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2)


@pytest.mark.parametrize("tie", [False, True])
def test_every_parameter_has_one_axis_name_per_dimension(tie):
    arch = ARCH.model_copy(update={"tie_embeddings": tie})
    params = init_params(arch, jax.random.key(0))
    specs = logical_axes(params)
    arrays, specs_flat = jax.tree.leaves(params), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    assert len(arrays) == len(specs_flat) == len(param_shapes(arch))
    for array, spec in zip(arrays, specs_flat):
        assert len(spec) == array.ndim
    assert jax.tree.leaves(specs.layers, is_leaf=lambda x: isinstance(x, PartitionSpec))[0][0] == "layers"
    assert (params.lm_head is None) == tie


def test_cache_axes_and_a_prefill_moved_into_pages():
    cache = KVPages.zeros(ARCH, pages=6, page_size=4, dtype=jnp.float32)
    assert len(logical_axes(cache).k) == cache.k.ndim and logical_axes(cache).k[1] == "pages"
    assert logical_axes(cache).k[3:] == ("head_dim", "page") and logical_axes(cache).v[3:] == ("page", "head_dim")
    update = np.random.default_rng(0).standard_normal((2, 3, 2, 2, 6, ARCH.head_dim)).astype(np.float32)  # a prefill's K, V
    pages = as_pages(update, 4)  # two rows of six positions: two pages each, the last half empty
    assert pages.num_pages == 4 and pages.page_size == 4
    assert np.asarray(pages.k)[:, [1, 3], :, :, 2:].max() == 0 and np.asarray(pages.v)[:, [1, 3], :, 2:].max() == 0
    # Row 1's pages (2 and 3) are moved, into pages 5 and 2 of the pool; a third id past the pool is dropped.
    moved = jax.jit(take)(pages, np.array([2, 3, 0], np.int32))
    cache = jax.jit(put, donate_argnums=0)(cache, moved, np.array([5, 2, 6], np.int32))
    k, v = np.asarray(cache.k), np.asarray(cache.v)
    np.testing.assert_array_equal(k[:, 5], update[0, :, 1, :, :4].swapaxes(-1, -2))  # keys land transposed
    np.testing.assert_array_equal(k[:, 2, :, :, :2], update[0, :, 1, :, 4:6].swapaxes(-1, -2))
    np.testing.assert_array_equal(v[:, 5], update[1, :, 1, :, :4])
    np.testing.assert_array_equal(v[:, 2, :, :2], update[1, :, 1, :, 4:6])
    assert k[:, [0, 1, 3, 4]].max() == 0 and v[:, [0, 1, 3, 4]].max() == 0
    kt, vg = jax.jit(gather)(cache, 1, np.array([[5, 2]], np.int32))  # a row's pages read back in order
    np.testing.assert_array_equal(np.asarray(kt)[0, :, :, :6], update[0, 1, 1, :, :6].swapaxes(-1, -2))
    np.testing.assert_array_equal(np.asarray(vg)[0, :, :6], update[1, 1, 1, :, :6])
    # Layers land from an offset: a piece of two layers written into layers 1 and 2.
    piece = KVPages(k=moved.k[1:], v=moved.v[1:])
    fresh = jax.jit(put, static_argnums=3)(KVPages.zeros(ARCH, pages=6, page_size=4, dtype=jnp.float32), piece, np.array([0, 1, 6], np.int32), 1)
    np.testing.assert_array_equal(np.asarray(fresh.v)[1:, 0], update[1, 1:, 1, :, :4])
    assert np.asarray(fresh.v)[0].max() == 0


def test_build_params_names_wrong_shapes():
    arrays = {name: np.zeros(shape, np.float32) for name, shape in param_shapes(ARCH).items()}
    arrays["w_up"] = np.zeros((3, 32, 47), np.float32)
    with pytest.raises(ValueError, match=r"'w_up' has shape \(3, 32, 47\).*\(3, 32, 48\)"):
        build_params(ARCH, arrays)
    del arrays["w_up"]
    with pytest.raises(ValueError, match="missing.*w_up"):
        build_params(ARCH, arrays)


def test_architecture_rejects_inconsistent_heads():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        Architecture(vocab_size=8, hidden_size=32, intermediate_size=8, num_layers=1, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="head_dim"):
        Architecture(vocab_size=8, hidden_size=30, intermediate_size=8, num_layers=1, num_heads=4, num_kv_heads=2)
