"""Attention in the forms each backend runs gives the same results: for prompts and prompt
chunks, JAX's fused attention (cuDNN's flash kernel on a GPU) and the CPU forms; for decode, pages
attended one by one (a CPU), laid end to end (other backends), and read in place by the Pallas
kernel (run here by Pallas's interpreter)."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from jds.model import flash, kv_cache, llama, paged_decode
from jds.model.kv_cache import KVPages


def _normal(seed: int, *shapes: tuple[int, ...]) -> list[jax.Array]:
    """Standard normal arrays of ``shapes`` (drawn by NumPy: JAX compiles a sampler per shape)."""
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(shape, np.float32)) for shape in shapes]


def test_fused_prompt_attention_equals_the_cpu_form():
    """``flash.prompt_attention`` names its kernel: cuDNN's on a GPU, here JAX's XLA form of the
    same call, which shares its masking (causal, padded by length) and layout."""
    b, t, heads, kv_heads, hd = 3, 24, 8, 2, 16
    q, k, v = _normal(0, (b, t, heads, hd), (b, kv_heads, t, hd), (b, kv_heads, t, hd))
    lengths = jnp.array([24, 7, 1], jnp.int32)
    cpu = jax.jit(llama.prompt_attention)(q, k, v, lengths)  # jitted: op by op, each op compiles apart
    fused = jax.jit(flash.prompt_attention, static_argnums=4)(q, k, v, lengths, "xla")
    for row, n in enumerate(lengths.tolist()):  # positions past a prompt are padding: nobody reads them
        np.testing.assert_allclose(np.asarray(fused[row, :n]), np.asarray(cpu[row, :n]), atol=1e-5)
    assert not np.allclose(np.asarray(fused[0]), np.asarray(fused[1]))  # the rows are not all the same


def test_a_fused_chunk_attends_as_the_cpu_form():
    """A prompt chunk written into its gathered pages and attended in one fused call sees what
    the CPU form's two-part softmax sees: each row's positions before its start, and the chunk
    causally. Rows start mid-page and at 0; pages are scattered over the pool; one table entry is
    past the pool; a chunk's last tokens fall past what the context holds for one row."""
    layers, pages, kv_heads, hd, page, heads, n, t = 2, 12, 2, 16, 8, 8, 3, 5
    k, v, q, k_new, v_new = _normal(
        2, (layers, pages, kv_heads, hd, page), (layers, pages, kv_heads, page, hd), (3, t, heads, hd), (3, kv_heads, t, hd), (3, kv_heads, t, hd)
    )
    cache = KVPages(k=k, v=v)
    tables = jnp.array([[7, 2, 10], [4, 3, pages], [0, 11, 5]], jnp.int32)
    start = jnp.array([13, 0, 19], jnp.int32)
    cached = (jnp.arange(n * page)[None, :] < start[:, None])[:, None, :]
    layer = jnp.int32(1)
    cpu = jax.jit(lambda: llama.attention_with_cache(q, *kv_cache.gather(cache, layer, tables), cached, k_new, v_new))()
    fused = jax.jit(lambda: flash.chunk_attention(q, *kv_cache.gather_tokens(cache, layer, tables), k_new, v_new, start, "xla"))()
    np.testing.assert_allclose(np.asarray(fused), np.asarray(cpu), atol=1e-5)
    assert not np.allclose(np.asarray(fused[:, 0]), np.asarray(fused[:, 1]))


def test_the_fused_kernel_serves_only_where_the_backend_compiles_it(monkeypatch, caplog):
    """A CPU never asks for it; a GPU backend without cuDNN (here, a CPU said to be one) is
    refused it by the probe and keeps the XLA form, saying why; a kernel the backend compiles
    (here JAX's XLA form standing in for cuDNN's) is named, for any dtype it takes."""
    shape = ("chunk", jnp.bfloat16, 8, 2, 64)
    assert flash.implementation(*shape) is None
    monkeypatch.setattr(flash.jax, "default_backend", lambda: "gpu")
    with caplog.at_level(logging.WARNING, logger="jds.model.flash"):
        assert flash.implementation(*shape) is None
    assert "chunk attention stays in XLA's form" in caplog.text
    monkeypatch.setattr(flash, "KERNEL", "xla")
    assert flash.implementation(*shape) == "xla"
    assert flash.implementation("prompt", jnp.float32, 4, 2, 8) == "xla"


def test_the_decode_attention_forms_give_the_same_output(monkeypatch):
    """The three forms a decode step may read its pages in (a CPU attends page by page, other
    backends over the pages laid end to end, or through the Pallas kernel that reads them in
    place) give the same output: rows of different lengths, one ending mid-page, one with nothing
    cached, table entries past the pool ("no page"), pages scattered over the pool."""
    layers, pages, kv_heads, hd, page, heads, n = 2, 12, 2, 16, 8, 8, 3
    k, v, q, k_new, v_new = _normal(
        1, (layers, pages, kv_heads, hd, page), (layers, pages, kv_heads, page, hd), (4, 1, heads, hd), (4, kv_heads, 1, hd), (4, kv_heads, 1, hd)
    )
    cache = KVPages(k=k, v=v)
    tables = jnp.array([[7, 2, 10], [4, pages, pages], [0, 11, 5], [3, pages, pages]], jnp.int32)  # rows 1 and 3 hold one page
    start = jnp.array([24, 5, 17, 0], jnp.int32)  # positions written before the new token
    cached = (jnp.arange(n * page)[None, :] < start[:, None])[:, None, :]
    layer = jnp.int32(1)
    end_to_end = jax.jit(lambda: llama.attention_with_cache(q, *kv_cache.gather(cache, layer, tables), cached, k_new, v_new))()
    by_page = jax.jit(
        lambda: llama.one_token_attention_over_pages(q, *kv_cache.gather_pages(cache, layer, tables), cached.reshape(4, n, page), k_new, v_new)
    )()
    np.testing.assert_allclose(np.asarray(by_page), np.asarray(end_to_end), atol=1e-5)
    assert not np.allclose(np.asarray(by_page[0]), np.asarray(by_page[2]))
    kernel = jax.jit(paged_decode.one_token_attention)(q, cache.k, cache.v, layer, tables, start, k_new, v_new)  # Pallas, interpreted
    np.testing.assert_allclose(np.asarray(kernel), np.asarray(end_to_end), atol=1e-5)
    assert llama.decode_attention_form() == "by-page"  # these tests run on a CPU, which attends page by page
    monkeypatch.setenv("JDS_DECODE_ATTENTION", "end-to-end")  # unless told otherwise, for measuring the forms
    assert llama.decode_attention_form() == "end-to-end"
    monkeypatch.setattr(llama.jax, "default_backend", lambda: "gpu")
    monkeypatch.delenv("JDS_DECODE_ATTENTION")
    assert llama.decode_attention_form() == "end-to-end"
    monkeypatch.setenv("JDS_DECODE_ATTENTION", "kernel")
    assert llama.decode_attention_form() == "kernel"


@pytest.mark.parametrize(("heads", "kv_heads", "slots"), [(32, 32, 52), (32, 8, 8), (40, 2, 3)], ids=["llama7b-52-slots", "gqa", "twenty-groups"])
def test_the_paged_kernel_lowers_for_a_gpu_through_triton(heads, kv_heads, slots):
    """Pallas lowers a kernel to Triton as its program is lowered, so a CPU can run that step for
    a GPU target (``jax.export``): Triton's lowering, not Pallas's Mosaic GPU default (which would
    stage the whole pool in shared memory); tiles of a power of two of elements, queries padded
    to what a Triton product takes; the pool read where it lies at the 7B config's size (56 GB of
    K), a grouped-query model's, and one whose KV heads have twenty query heads each (padded to
    32). What Triton then compiles for the device is for a GPU run to show."""
    layers, hd, page, n = 32, 128, 64, 64
    pages = slots * n
    specs = (
        jax.ShapeDtypeStruct((slots, heads, hd), jnp.bfloat16),
        jax.ShapeDtypeStruct((layers, pages, kv_heads, hd, page), jnp.bfloat16),
        jax.ShapeDtypeStruct((layers, pages, kv_heads, page, hd), jnp.bfloat16),
        jax.ShapeDtypeStruct((), jnp.int32),
        jax.ShapeDtypeStruct((slots, n), jnp.int32),
        jax.ShapeDtypeStruct((slots,), jnp.int32),
    )
    kernel = jax.jit(lambda *a: paged_decode.attention_over_pool(*a, interpret=False))
    target = "__gpu$xla.gpu.triton"
    exported = export.export(kernel, platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call(target)])(*specs)
    text = exported.mlir_module()
    assert text.count(f"@{target}") == 1 and 'name = "jds_paged_decode"' in text
    groups = 1 << (heads // kv_heads - 1).bit_length()
    assert f"tensor<{slots}x{kv_heads}x{max(paged_decode.MIN_ROWS, groups)}x{hd}xbf16>" in text  # the padded queries
