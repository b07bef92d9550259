"""Sampling in jit: greedy, temperature, top-k, top-p, seeds and stop ids, checked statistically."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jds.model.sampling import SamplingRows, sample
from jds.sampling_params import SamplingParams

sample_jit = jax.jit(sample)
LOGITS = np.log(np.array([0.5, 0.25, 0.15, 0.07, 0.03], np.float32))


def _rows(n: int, temperature=1.0, top_k=0, top_p=1.0, seed=None, stop=()) -> SamplingRows:
    stop_ids = np.full((n, 4), -1, np.int32)
    stop_ids[:, : len(stop)] = stop
    return SamplingRows(
        temperature=np.full(n, temperature, np.float32),
        top_k=np.full(n, top_k, np.int32),
        top_p=np.full(n, top_p, np.float32),
        seed=np.arange(n, dtype=np.uint32) if seed is None else np.full(n, seed, np.uint32),
        stop_ids=stop_ids,
    )


def _frequencies(n: int = 4000, **kw) -> np.ndarray:
    tokens, _ = sample_jit(np.tile(LOGITS, (n, 1)), _rows(n, **kw), np.zeros(n, np.int32))
    return np.bincount(np.asarray(tokens), minlength=len(LOGITS)) / n


def test_greedy_is_argmax():
    logits = np.random.default_rng(0).normal(size=(6, 100)).astype(np.float32)
    tokens, _ = sample_jit(logits, _rows(6, temperature=0.0), np.zeros(6, np.int32))
    np.testing.assert_array_equal(np.asarray(tokens), logits.argmax(-1))


def test_temperature_one_follows_the_distribution():
    freq = _frequencies()
    # 4000 draws: the standard error of p=0.5 is 0.008; 0.03 is a generous 3.7 sigma.
    np.testing.assert_allclose(freq, np.exp(LOGITS), atol=0.03)


def test_low_temperature_sharpens():
    assert _frequencies(temperature=0.25)[0] > 0.85


def test_top_k_and_top_p_cut_the_tail():
    top2 = _frequencies(top_k=2)
    assert top2[2:].sum() == 0
    np.testing.assert_allclose(top2[:2], [2 / 3, 1 / 3], atol=0.03)
    # Mass before token i: 0, .5, .75, .9 -> with top_p=0.8 tokens 0..2 stay, renormalised over .9.
    nucleus = _frequencies(top_p=0.8)
    assert nucleus[3:].sum() == 0
    np.testing.assert_allclose(nucleus[:3], np.array([0.5, 0.25, 0.15]) / 0.9, atol=0.03)
    assert _frequencies(top_p=0.3)[0] == 1.0


def test_seed_and_step_decide_the_draw():
    logits = np.tile(np.zeros(1000, np.float32), (3, 1))
    rows = _rows(3, seed=42)
    a, _ = sample_jit(logits, rows, np.array([0, 0, 1], np.int32))
    a = np.asarray(a)
    assert a[0] == a[1] != a[2]
    b, _ = sample_jit(logits, _rows(3, seed=43), np.array([0, 0, 1], np.int32))
    assert np.asarray(b)[0] != a[0]


def test_stop_ids_are_flagged():
    logits = np.zeros((2, 10), np.float32)
    logits[0, 3] = logits[1, 5] = 10.0
    _, is_stop = sample_jit(logits, _rows(2, temperature=0.0, stop=(3, 7)), np.zeros(2, np.int32))
    np.testing.assert_array_equal(np.asarray(is_stop), [True, False])


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"seed": -5}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-3]}, "stop_token_ids"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": 1e39}, "temperature"),  # finite in Python, infinite as the float32 it becomes
        ({"top_p": float("nan")}, "top_p"),
        ({"stop": ["a"] * 17}, "stop"),
        ({"stop": ["a" * 257]}, r"stop\[0\]"),
        ({"stop": ["ok", "\ud800"]}, r"stop\[1\]"),
        ({"stop": 7}, "stop"),
        ({"stop_token_ids": list(range(9))}, "stop_token_ids"),
        ({"stop_token_ids": [2**31]}, "stop_token_ids"),
        ({"stop_token_ids": None}, "stop_token_ids"),
    ],
)
def test_sampling_params_name_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} "):
        SamplingParams(**kwargs)


def test_sampling_params_accept_natural_forms():
    p = SamplingParams(stop="###", stop_token_ids=[5, 6])
    assert p.stop == ("###",) and p.stop_token_ids == (5, 6)
    assert SamplingParams(seed=3).resolved_seed() == 3
