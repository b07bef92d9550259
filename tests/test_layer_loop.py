"""The layer loop's forms compute the same thing: the scan over stacked layers (one layer an
iteration, or several unrolled) and a Python loop over per-layer arrays, which an accelerator may
run without copying each layer's weights out of the stack."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jds.model import llama
from jds.model.architecture import Architecture
from jds.model.kv_cache import KVPages
from jds.model.params import init_params, split_layers

ARCH = Architecture(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4, num_kv_heads=2)
PAGE = 8


def _prefill_then_decode(params) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prefill logits, one decode step's logits and the cache it wrote, for two rows. The programs
    are traced afresh on every call: JAX keeps a function's traces across jit wrappers of it, and
    the unroll is read when a program is traced."""
    tokens = jnp.array([[5, 9, 3, 7, 1, 2], [4, 8, 0, 0, 0, 0]], jnp.int32)
    lengths = jnp.array([6, 2], jnp.int32)
    prompt_logits, _ = jax.jit(lambda *a: llama.prefill(*a, arch=ARCH))(params, tokens, lengths)
    cache = KVPages.zeros(ARCH, 6, PAGE, jnp.float32)
    cache = KVPages(k=jax.random.normal(jax.random.key(3), cache.k.shape), v=jax.random.normal(jax.random.key(4), cache.v.shape))
    tables = jnp.array([[4, 1], [0, 6]], jnp.int32)  # row 1 holds one page; 6 is past the pool
    positions = jnp.array([11, 3], jnp.int32)
    step_logits, cache = jax.jit(lambda *a: llama.decode_step(*a, arch=ARCH))(params, cache, jnp.array([2, 3], jnp.int32), positions, tables)
    return np.asarray(prompt_logits), np.asarray(step_logits), np.asarray(cache.k)


def test_every_form_of_the_layer_loop_gives_the_same_logits_and_cache(monkeypatch):
    params = init_params(ARCH, jax.random.key(0))
    scanned = _prefill_then_decode(params)
    looped = _prefill_then_decode(params.replace(layers=split_layers(params.layers)))
    # Count that the unrolled programs really were traced with the unroll set.
    monkeypatch.setenv("JDS_LAYER_UNROLL", "2")
    unrolls = []
    read = llama.layer_unroll
    monkeypatch.setattr(llama, "layer_unroll", lambda: unrolls.append(read()) or unrolls[-1])
    unrolled = _prefill_then_decode(params)
    assert unrolls == [2, 2]  # the prefill's loop and the decode step's
    for got in (looped, unrolled):
        for a, b in zip(got, scanned):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # The caches compared hold what the step wrote: row 0's position 11 is in its second page.
    before = np.asarray(jax.random.normal(jax.random.key(3), scanned[2].shape))
    assert not np.allclose(scanned[2][:, 1, :, :, 11 % PAGE], before[:, 1, :, :, 11 % PAGE])
    np.testing.assert_array_equal(scanned[2][:, 2], before[:, 2])  # a page no row holds is untouched
