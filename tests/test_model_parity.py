"""Logits of the jds model against transformers' LlamaForCausalLM on the same weights.

Bounds: both sides compute in float32 but sum in different orders (XLA vs oneDNN kernels), so
logits differ by accumulated rounding: about 1e-6 relative per matmul, growing with depth. The
3-layer tiny model stays under 1e-4; the 30-layer SmolLM2 with logits up to ~25 was measured at
~9e-5, and 1e-3 leaves room for other CPUs while still catching any real mistake (a wrong rope,
mask or permutation moves logits by whole units).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jds.model import llama
from jds.model.kv_cache import KVPages, as_pages, put, written_pages
from jds.model.matrices import as_served
from jds.model.weights.gguf_file import load_gguf
from jds.model.weights.hf_checkpoint import load_hf
from reference_models import save_hf, tiny_hf_model

TINY_BOUND = 1e-4
SMOLLM2_BOUND = 1e-3
# Weight-only int8 (one scale per output channel) moved SmolLM2's logits by up to 1.33 here, and
# the top token agreed with transformers at every checked position; a wrong layout or scale moves
# them by many units and the top token almost everywhere.
INT8_BOUND = 2.0
INT8_AGREEMENT = 0.95
# bfloat16 weights, activations and cache (what an accelerator serves in) against transformers in
# float32: SmolLM2's logits moved by up to 1.38 here and the top token agreed at every checked
# position. A product that lost precision beyond bfloat16 (an 8-bit accumulation, say) or a wrong
# layout moves them by many units.
BF16_BOUND = 2.0
BF16_AGREEMENT = 0.95

SMOLLM2_TEXTS = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,", "Hello! How are you today? I"]

prefill_jit = jax.jit(llama.prefill, static_argnums=3)
decode_jit = jax.jit(llama.decode_step, static_argnums=5)
CHUNK = 5
PAGE = 8  # positions per cache page
ROW_PAGES = 64 // PAGE  # each row's reach: 64 positions


@functools.partial(jax.jit, static_argnums=(5, 6))
def chunk_jit(params, cache, tokens, start, table, arch, context):
    """Logits at every position of a prompt chunk written into the pages of ``table`` ``[1, n]``,
    reading ``context`` positions."""
    positions = start[:, None] + np.arange(tokens.shape[1])[None, :]
    pages = written_pages(table, positions, PAGE, cache.num_pages)
    x, cache = llama.decoder_layers(params.layers, cache, llama.embed(params, tokens), start, table[:, : context // PAGE], pages, arch)
    return jax.vmap(lambda h: llama.logits(params, h, arch), in_axes=1, out_axes=1)(x), cache


def _pool(arch, rows: int, dtype, seed: int) -> tuple[KVPages, np.ndarray]:
    """A page pool for ``rows`` rows of 64 positions, and their block tables: every row's pages
    shuffled over the pool (one spare page), so a wrong table entry reads another row's KV."""
    tables = np.random.default_rng(seed).permutation(rows * ROW_PAGES).reshape(rows, ROW_PAGES).astype(np.int32)
    return KVPages.zeros(arch, rows * ROW_PAGES + 1, PAGE, dtype), tables


def _prompt_pages(tables: np.ndarray, bucket: int) -> np.ndarray:
    """Where the pages of bucket-long prefill rows land: each row's first pages of its table, one row after another."""
    return tables[:, : bucket // PAGE].reshape(-1)


def _padded(prompts: list[list[int]], bucket: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.zeros((len(prompts), bucket), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return tokens, np.array([len(p) for p in prompts], np.int32)


def _reference_logits(model, prompt: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].numpy()


def _check_prefill_and_decode(model, arch, params, prompts: list[list[int]], bound: float) -> tuple[float, float]:
    """Batched, padded prefill matches at each prompt's last token; decode steps, of all rows and
    of the first prompt alone (one-row products read other weight layouts), match after it.
    Returns the largest logit difference seen and the share of positions whose top token agrees."""
    params = jax.device_put(params)
    refs = [_reference_logits(model, p) for p in prompts]
    seen = {"worst": 0.0, "agree": 0, "count": 0}

    def check(actual, expected) -> None:
        actual = np.asarray(actual)
        np.testing.assert_allclose(actual, expected, atol=bound, rtol=0)
        seen["worst"] = max(seen["worst"], float(np.max(np.abs(actual - expected))))
        seen["agree"] += int(np.sum(actual.argmax(-1) == expected.argmax(-1)))
        seen["count"] += actual.size // actual.shape[-1]

    split = [len(p) // 2 for p in prompts]
    tokens, lengths = _padded([p[:s] for p, s in zip(prompts, split)], 16)
    logits, kv = prefill_jit(params, tokens, lengths, arch)
    for i, ref in enumerate(refs):
        check(logits[i], ref[split[i] - 1])

    # Decode the rest of each prompt token by token from slots that are not the prefill rows.
    cache, tables = _pool(arch, len(prompts) + 1, params.final_norm.dtype, seed=0)
    cache = put(cache, as_pages(kv, PAGE), _prompt_pages(tables[1:], 16))
    positions = np.array([0] + split, np.int32)
    for _ in range(max(len(p) - s for p, s in zip(prompts, split))):
        step_tokens = np.array([0] + [p[min(pos, len(p) - 1)] for p, pos in zip(prompts, positions[1:])], np.int32)
        logits, cache = decode_jit(params, cache, step_tokens, positions, tables, arch)
        for i, (p, ref) in enumerate(zip(prompts, refs)):
            if positions[i + 1] < len(p):
                check(logits[i + 1], ref[positions[i + 1]])
        positions = positions + 1

    cache, tables = _pool(arch, 1, params.final_norm.dtype, seed=1)
    cache = put(cache, as_pages(kv[:, :, :1], PAGE), _prompt_pages(tables, 16))
    for pos in range(split[0], len(prompts[0])):
        logits, cache = decode_jit(params, cache, np.array([prompts[0][pos]], np.int32), np.array([pos], np.int32), tables, arch)
        check(logits[0], refs[0][pos])

    # Chunked prefill: each prompt in chunks of 5 against its own cache row, every position checked;
    # each chunk reads only the cache positions in use, rounded up to a power of two (>= 16 of 64).
    cache, tables = _pool(arch, 2, params.final_norm.dtype, seed=2)
    for p, ref in zip(prompts, refs):
        for start in range(0, len(p), CHUNK):
            chunk = np.zeros((1, CHUNK), np.int32)
            chunk[0, : len(p[start : start + CHUNK])] = p[start : start + CHUNK]
            context = max(16, 1 << max(start - 1, 0).bit_length())
            logits, cache = chunk_jit(params, cache, chunk, np.array([start], np.int32), tables[1:], arch, context)
            real = min(CHUNK, len(p) - start)
            check(logits[0, :real], ref[start : start + real])
    return seen["worst"], seen["agree"] / seen["count"]


@pytest.mark.parametrize("tie", [False, True])
def test_tiny_safetensors_checkpoint_matches_transformers(tmp_path, tie):
    model = tiny_hf_model(tie=tie, rope_scaling=True)
    save_hf(model, tmp_path)
    arch, params = load_hf(tmp_path, progress=False)
    assert arch.rope_scaling is not None and arch.rope_scaling.type == "llama3"
    assert arch.num_kv_heads < arch.num_heads and arch.tie_embeddings == tie
    assert (params.lm_head is None) == tie
    rng = np.random.default_rng(0)
    # Prompts longer than the rope scaling's original context (32) exercise the scaled frequencies.
    prompts = [rng.integers(0, 256, n).tolist() for n in (5, 12, 16, 9)]
    prompts.append(rng.integers(0, 256, 60).tolist())
    _check_prefill_and_decode(model, arch, as_served(params, "none"), prompts[:4], TINY_BOUND)
    tokens, lengths = _padded(prompts[4:], 64)
    logits, _ = prefill_jit(jax.device_put(params), tokens, lengths, arch)
    np.testing.assert_allclose(np.asarray(logits[0]), _reference_logits(model, prompts[4])[-1], atol=TINY_BOUND, rtol=0)


def test_smollm2_gguf_matches_transformers(smollm2_gguf, hf_smollm2, hf_smollm2_tokenizer):
    arch, params = load_gguf(smollm2_gguf, progress=False)
    assert (arch.num_layers, arch.hidden_size, arch.num_heads, arch.num_kv_heads) == (30, 576, 9, 3)
    assert arch.tie_embeddings and arch.rope_theta == 100000.0
    prompts = [hf_smollm2_tokenizer(t)["input_ids"] for t in SMOLLM2_TEXTS]
    _check_prefill_and_decode(hf_smollm2, arch, as_served(params, "none"), prompts, SMOLLM2_BOUND)


@pytest.mark.parametrize(
    ("dtype", "quantization", "bound", "agreement"),
    [(np.float32, "int8", INT8_BOUND, INT8_AGREEMENT), (jnp.bfloat16, "none", BF16_BOUND, BF16_AGREEMENT)],
    ids=["int8-weights", "bfloat16"],
)
def test_smollm2_stays_near_transformers_in_float32(smollm2_gguf, hf_smollm2, hf_smollm2_tokenizer, dtype, quantization, bound, agreement):
    arch, params = load_gguf(smollm2_gguf, progress=False, dtype=dtype)
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(dtype)}
    prompts = [hf_smollm2_tokenizer(t)["input_ids"] for t in SMOLLM2_TEXTS]
    worst, agree = _check_prefill_and_decode(hf_smollm2, arch, as_served(params, quantization), prompts, bound)
    print(f"{quantization} {np.dtype(dtype)} against transformers in float32: largest logit difference {worst:.3f}, top token agrees at {agree:.0%} of positions")
    assert agree >= agreement
