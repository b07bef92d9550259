"""The layer loop's forms compute the same thing: the scan over stacked layers (one layer an
iteration, or several unrolled) and a Python loop over per-layer arrays, which an accelerator may
run without copying each layer's weights out of the stack."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jds.config import load_config
from jds.model import flash, kv_cache, llama, paged_decode
from jds.model.architecture import Architecture
from jds.model.kv_cache import KVPages
from jds.model.loader import load_model
from jds.model.params import init_params, split_layers
from tests_paths import CONFIGS

ARCH = Architecture(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4, num_kv_heads=2)
PAGE = 8


def _params():
    """Random weights for ``ARCH``, drawn in one program rather than a compile per shape."""
    return jax.jit(init_params, static_argnums=0)(ARCH, jax.random.key(0))


def _chunk(params, cache: KVPages, tokens: jax.Array, start: jax.Array, tables: jax.Array) -> tuple[jax.Array, KVPages]:
    """A prompt chunk's activations (``[B, T]`` new tokens from ``start``) and the cache it wrote."""
    positions = start[:, None] + jnp.arange(tokens.shape[1])[None, :]
    pages = kv_cache.written_pages(tables, positions, PAGE, cache.num_pages)
    return llama.decoder_layers(params.layers, cache, llama.embed(params, tokens), start, tables, pages, ARCH)


def _prefill_then_decode(params) -> tuple[np.ndarray, ...]:
    """Prefill logits, one decode step's logits, then a 3-token chunk's activations, and the cache
    they wrote, for two rows. The programs are traced afresh on every call: JAX keeps a function's
    traces across jit wrappers of it, and the unroll is read when a program is traced."""
    tokens = jnp.array([[5, 9, 3, 7, 1, 2], [4, 8, 0, 0, 0, 0]], jnp.int32)
    lengths = jnp.array([6, 2], jnp.int32)
    prompt_logits, _ = jax.jit(lambda *a: llama.prefill(*a, arch=ARCH))(params, tokens, lengths)
    cache = KVPages.zeros(ARCH, 6, PAGE, jnp.float32)
    rng = np.random.default_rng(3)  # NumPy: JAX compiles a sampler per shape
    cache = KVPages(k=jnp.asarray(rng.standard_normal(cache.k.shape, np.float32)), v=jnp.asarray(rng.standard_normal(cache.v.shape, np.float32)))
    tables = jnp.array([[4, 1], [0, 6]], jnp.int32)  # row 1 holds one page; 6 is past the pool
    positions = jnp.array([11, 3], jnp.int32)
    step_logits, cache = jax.jit(lambda *a: llama.decode_step(*a, arch=ARCH))(params, cache, jnp.array([2, 3], jnp.int32), positions, tables)
    chunk_tokens = jnp.array([[6, 1, 8], [2, 2, 9]], jnp.int32)
    chunked, cache = jax.jit(lambda *a: _chunk(*a))(params, cache, chunk_tokens, positions + 1, jnp.array([[4, 1], [0, 2]], jnp.int32))
    return np.asarray(prompt_logits), np.asarray(step_logits), np.asarray(chunked), np.asarray(cache.k)


def test_every_form_of_the_layer_loop_gives_the_same_logits_and_cache(monkeypatch):
    params = _params()
    scanned = _prefill_then_decode(params)
    looped = _prefill_then_decode(params.replace(layers=split_layers(params.layers)))
    # Count that the unrolled programs really were traced with the unroll set.
    monkeypatch.setenv("JDS_LAYER_UNROLL", "2")
    unrolls = []
    read = llama.layer_unroll
    monkeypatch.setattr(llama, "layer_unroll", lambda: unrolls.append(read()) or unrolls[-1])
    unrolled = _prefill_then_decode(params)
    assert unrolls == [2, 2, 2]  # the prefill's loop, the decode step's and the chunk's
    for got in (looped, unrolled):
        for a, b in zip(got, scanned):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # The caches compared hold what the step and the chunk wrote: row 0's positions 11-14 are in
    # its second page.
    cache, before = scanned[3], np.random.default_rng(3).standard_normal(scanned[3].shape, np.float32)
    for position in range(11, 15):
        assert not np.allclose(cache[:, 1, :, :, position % PAGE], before[:, 1, :, :, position % PAGE])
    np.testing.assert_array_equal(cache[:, 3], before[:, 3])  # a page no row holds is untouched


def test_prompts_and_chunks_through_the_fused_forms_give_the_same_logits_and_cache(monkeypatch):
    """Where the backend compiles a fused attention kernel (a GPU with cuDNN), prompts and prompt
    chunks run through ``flash``'s forms; here JAX's XLA form of the same call stands in for the
    kernel, so the routing, the chunk's write into its gathered pages and its mask are checked
    against the CPU forms over a whole model. The backend said to be a GPU, the cache is written
    in its form too (``kv_cache.write``: every index on the pool's leading axes), and compared."""
    params = _params()
    cpu = _prefill_then_decode(params)
    monkeypatch.setattr(flash.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(flash, "KERNEL", "xla")
    for kind in flash.KINDS:  # probe first, so the calls counted below are the layers' own
        assert flash.implementation(kind, jnp.float32, ARCH.num_heads, ARCH.num_kv_heads, ARCH.head_dim) == "xla"
    calls = []
    for name in ("prompt_attention", "chunk_attention"):
        form = getattr(flash, name)
        monkeypatch.setattr(flash, name, lambda *a, _form=form, _name=name, **kw: calls.append(_name) or _form(*a, **kw))
    fused = _prefill_then_decode(params)
    assert calls == ["prompt_attention", "chunk_attention"]  # traced once each: the layers run under a scan
    for a, b in zip(fused, cpu):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_decode_steps_through_the_pallas_kernel_give_the_same_logits_and_cache(monkeypatch):
    """``JDS_DECODE_ATTENTION=kernel`` routes decode steps (not prompts or chunks) through
    ``paged_decode``, which reads the pool itself with the layer as an input: under the scan (the
    layer traced) and over per-layer weights (a constant). Here Pallas's interpreter runs it."""
    params = _params()
    cpu = _prefill_then_decode(params)
    monkeypatch.setenv("JDS_DECODE_ATTENTION", "kernel")
    calls = []
    form = paged_decode.one_token_attention
    monkeypatch.setattr(paged_decode, "one_token_attention", lambda *a: calls.append(a[3]) or form(*a))
    scanned = _prefill_then_decode(params)
    assert len(calls) == 1 and isinstance(calls[0], jax.core.Tracer)  # the scan's layer index
    looped = _prefill_then_decode(params.replace(layers=split_layers(params.layers)))
    assert calls[1:] == list(range(ARCH.num_layers))
    for got in (scanned, looped):
        for a, b in zip(got, cpu):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


READERS = {"JDS_LAYER_UNROLL": llama.layer_unroll, "JDS_LAYER_FORM": llama.layers_apart, "JDS_DECODE_ATTENTION": llama.decode_attention_form}


@pytest.mark.parametrize(
    ("name", "value"),
    [("JDS_LAYER_UNROLL", "0"), ("JDS_LAYER_UNROLL", "four"), ("JDS_LAYER_FORM", "unrolled"), ("JDS_DECODE_ATTENTION", "paged")],
)
def test_a_layer_form_setting_that_means_nothing_is_refused_by_name(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"^{name}: '{value}' is not"):
        READERS[name]()
    with pytest.raises(ValueError, match=f"^{name}: '{value}' is not"):  # as a server starts, before it traces a program
        load_model(load_config(CONFIGS / "tiny.yaml"), weights=False)
