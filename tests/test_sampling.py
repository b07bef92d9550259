"""Sampling in jit: greedy, temperature, top-k, top-p, seeds and stop ids, checked statistically."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jds.engine.programs import empty_rows
from jds.model.sampling import SamplingRows, sample
from jds.sampling_params import SamplingParams

sample_jit = jax.jit(sample)
LOGITS = np.log(np.array([0.5, 0.25, 0.15, 0.07, 0.03], np.float32))


def _rows(n: int, seed=None, stop=(), **settings) -> SamplingRows:
    """``n`` rows with the same settings (``SamplingRows`` field names); seeds 0..n-1 unless given."""
    rows = empty_rows(n)
    rows.temperature[:] = 1.0
    for name, value in settings.items():
        getattr(rows, name)[:] = value
    rows.seed[:] = np.arange(n) if seed is None else seed
    rows.stop_ids[:, : len(stop)] = stop
    return rows


def _frequencies(n: int = 4000, **kw) -> np.ndarray:
    tokens = sample_jit(np.tile(LOGITS, (n, 1)), _rows(n, **kw), np.zeros(n, np.int32)).tokens
    return np.bincount(np.asarray(tokens), minlength=len(LOGITS)) / n


def test_greedy_is_argmax():
    logits = np.random.default_rng(0).normal(size=(6, 100)).astype(np.float32)
    tokens = sample_jit(logits, _rows(6, temperature=0.0), np.zeros(6, np.int32)).tokens
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
    a = np.asarray(sample_jit(logits, rows, np.array([0, 0, 1], np.int32)).tokens)
    assert a[0] == a[1] != a[2]
    b = sample_jit(logits, _rows(3, seed=43), np.array([0, 0, 1], np.int32)).tokens
    assert np.asarray(b)[0] != a[0]


def test_logprobs_are_the_raw_log_softmax_for_rows_that_ask():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(3, 40)).astype(np.float32)
    rows = _rows(3, temperature=0.7, top_k=5, repetition_penalty=1.5)
    rows.logprobs[:] = [-1, 0, 4]
    drawn = sample_jit(logits, rows, np.zeros(3, np.int32), np.tile(np.arange(40, dtype=np.int32), (3, 1)))
    reference = logits - np.log(np.exp(logits).sum(-1, keepdims=True))  # before temperature, filters and penalties
    tokens = np.asarray(drawn.tokens)
    np.testing.assert_allclose(np.asarray(drawn.logprob)[1:], reference[[1, 2], tokens[1:]], atol=1e-5)
    np.testing.assert_allclose(np.asarray(drawn.top_logprobs)[2, :4], np.sort(reference[2])[::-1][:4], atol=1e-5)
    assert np.asarray(drawn.top_ids)[2, 0] == reference[2].argmax()


def test_stop_ids_are_flagged():
    logits = np.zeros((2, 10), np.float32)
    logits[0, 3] = logits[1, 5] = 10.0
    is_stop = sample_jit(logits, _rows(2, temperature=0.0, stop=(3, 7)), np.zeros(2, np.int32)).is_stop
    np.testing.assert_array_equal(np.asarray(is_stop), [True, False])


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"seed": 2**63}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
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
        ({"stop_token_ids": "5"}, "stop_token_ids"),
        ({"logit_bias": {3: 100.5}}, "logit_bias"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {2**31: 1.0}}, "logit_bias"),
        ({"logit_bias": {3: float("nan")}}, "logit_bias"),
        ({"logit_bias": {i: 1.0 for i in range(301)}}, "logit_bias"),
        ({"logit_bias": [(3, 1.0), (3, 2.0)]}, "logit_bias"),
        ({"logit_bias": 5}, "logit_bias"),
    ],
)
def test_sampling_params_name_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} "):
        SamplingParams(**kwargs)


def test_sampling_params_accept_natural_forms():
    p = SamplingParams(stop="###", stop_token_ids=[5, 6])
    assert p.stop == ("###",) and p.stop_token_ids == (5, 6)
    none = SamplingParams(stop=None, stop_token_ids=None, max_tokens=None, logit_bias=None)  # vLLM's "not given"
    assert (none.stop, none.stop_token_ids, none.logit_bias, none.token_limit(40)) == ((), (), (), 40)
    assert SamplingParams(max_tokens=10).token_limit(40) == 10
    assert SamplingParams(top_k=-1).top_k == 0  # older vLLM's "no filter"
    assert [SamplingParams(seed=s).resolved_seed() for s in (-1, 2**32 + 3, 2**63 - 1)] == [2**32 - 1, 3, 2**32 - 1]
    assert SamplingParams(seed=3).resolved_seed() == 3
    assert SamplingParams(seed=2**32 - 1).resolved_seed(2) == 1  # sample j: seed + j, folded


def test_min_p_keeps_tokens_at_least_that_fraction_of_the_likeliest():
    # p = .5, .25, .15, .07, .03: min_p 0.2 keeps p >= 0.1, tokens 0..2, renormalised over .9
    freq = _frequencies(min_p=0.2)
    assert freq[3:].sum() == 0
    np.testing.assert_allclose(freq[:3], np.array([0.5, 0.25, 0.15]) / 0.9, atol=0.03)


def _wide_logits(n: int, vocab: int = 1000) -> np.ndarray:
    """A few likely tokens, then a long tail of distinct, slowly falling logits (a filter that keeps
    300 or 99.9% of the mass reaches deep into it)."""
    row = (-2.0 - 1e-3 * np.arange(vocab)).astype(np.float32)
    row[:4] = np.log([0.3, 0.2, 0.1, 0.05]) + np.log(vocab)
    return np.tile(row, (n, 1))


def _exact(logits: np.ndarray, keep: np.ndarray) -> np.ndarray:
    p = np.exp(logits - logits.max()) * keep
    return p / p.sum()


@pytest.mark.parametrize(
    "settings, kept",
    [
        ({"top_k": 300}, lambda order: order < 300),
        ({"top_p": 0.999}, None),
        ({"top_p": 0.5}, None),
        ({"top_k": 3}, lambda order: order < 3),
        ({"top_k": 300, "top_p": 0.9}, None),
    ],
    ids=["top_k-deep", "top_p-deep", "top_p-shallow", "top_k-shallow", "top_k-then-top_p"],
)
def test_filters_over_a_wide_vocabulary_match_the_exact_distribution(settings, kept):
    n, vocab = 6000, 1000
    logits = _wide_logits(n, vocab)
    tokens = sample_jit(logits, _rows(n, **settings), np.zeros(n, np.int32)).tokens
    freq = np.bincount(np.asarray(tokens), minlength=vocab) / n
    row = logits[0]
    order = np.argsort(-row, kind="stable").argsort(kind="stable")  # each token's rank
    if kept is None:  # top-p over what top-k leaves: tokens whose mass ranked before them is below top_p
        p = _exact(row, order < settings.get("top_k", vocab))
        ranked = np.argsort(-row, kind="stable")
        before = (np.cumsum(p[ranked]) - p[ranked])[order]
        keep = (before < settings["top_p"]) & (p > 0)
    else:
        keep = kept(order)
    expected = _exact(row, keep)
    assert freq[~keep].sum() == 0
    np.testing.assert_allclose(freq[:4], expected[:4], atol=0.03)
    np.testing.assert_allclose(freq[4:].sum(), expected[4:].sum(), atol=0.03)  # the tail as a whole


def test_a_rows_draw_does_not_depend_on_its_batch_mates():
    """Greedy, plain, filtered and full-sort rows mixed: each row draws what it draws alone."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(8, 1000)).astype(np.float32) * 3
    rows = _rows(8, seed=7)
    rows.temperature[:] = [0, 1, 0.7, 1, 1, 1.3, 1, 0.5]
    rows.top_k[:] = [0, 0, 40, 300, 0, 0, 0, 2]
    rows.top_p[:] = [1, 1, 1, 1, 0.9, 0.999, 1, 1]
    rows.min_p[:] = [0, 0, 0, 0, 0, 0, 0.05, 0]
    steps = np.arange(8, dtype=np.int32)
    together = sample_jit(logits, rows, steps).tokens
    for i in range(8):
        alone = sample_jit(logits[i : i + 1], jax.tree.map(lambda a: a[i : i + 1], rows), steps[i : i + 1]).tokens
        assert int(np.asarray(alone)[0]) == int(np.asarray(together)[i]), i


def test_min_tokens_holds_back_stop_ids_until_reached():
    logits = np.zeros((3, 10), np.float32)
    logits[:, 3] = 10.0  # the stop id is by far the likeliest
    rows = _rows(3, temperature=0.0, stop=(3,), min_tokens=2)
    drawn = sample_jit(logits, rows, np.array([0, 1, 2], np.int32))
    tokens, is_stop = drawn.tokens, drawn.is_stop
    assert np.asarray(tokens).tolist()[:2] != [3, 3] and 3 not in np.asarray(tokens)[:2]
    assert np.asarray(tokens)[2] == 3 and np.asarray(is_stop).tolist() == [False, False, True]


def _penalised_reference(logits, history, prompt_len, presence, frequency, repetition):
    """The penalties from their definitions, one row and one token at a time."""
    out = logits.astype(np.float64).copy()
    for b in range(logits.shape[0]):
        tokens = [t for t in history[b] if t >= 0]
        output = [t for pos, t in enumerate(history[b]) if t >= 0 and pos >= prompt_len[b]]
        for token in set(tokens):  # vLLM / transformers: every token of prompt and output
            out[b, token] = out[b, token] / repetition[b] if out[b, token] > 0 else out[b, token] * repetition[b]
        for token in set(output):  # OpenAI: tokens of the output, once and per occurrence
            out[b, token] -= presence[b] + frequency[b] * output.count(token)
    return out


def test_logit_bias_moves_only_its_rows_tokens_and_not_the_reported_logprobs():
    from jds.engine.programs import set_row
    from jds.engine.request import Request
    from jds.engine.sequence import Sequence

    rng = np.random.default_rng(5)
    logits = rng.normal(size=(3, 40)).astype(np.float32)
    top = logits.argmax(axis=-1)
    low = logits.argmin(axis=-1)
    rows = empty_rows(3)
    biases = [{int(top[0]): -100.0}, {int(low[1]): 100.0}, {}]
    for i, bias in enumerate(biases):
        set_row(rows, i, Sequence(Request(str(i), (1,), SamplingParams(temperature=0, logprobs=0, logit_bias=bias), 0), None, (), 8))
    got = sample_jit(logits, rows, np.zeros(3, np.int32))
    second = np.argsort(logits[0])[-2]
    np.testing.assert_array_equal(np.asarray(got.tokens), [second, low[1], top[2]])
    raw = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))  # reported: the model's own
    np.testing.assert_allclose(np.asarray(got.logprob), raw[np.arange(3), np.asarray(got.tokens)], rtol=1e-5, atol=1e-5)
    set_row(rows, 0, Sequence(Request("0", (1,), SamplingParams(temperature=0), 0), None, (), 8))  # a slot's next request starts unbiased
    assert np.asarray(sample_jit(logits, rows, np.zeros(3, np.int32)).tokens)[0] == top[0]


def test_penalties_match_their_definitions():
    from jds.model.sampling import _penalise

    rng = np.random.default_rng(3)
    b, vocab, length = 4, 50, 30
    logits = rng.normal(size=(b, vocab)).astype(np.float32) * 2
    history = rng.integers(0, vocab, size=(b, length)).astype(np.int32)
    history[1, 20:] = -1  # a shorter row
    rows = _rows(b)
    rows.prompt_len[:] = [10, 5, 0, 30]
    rows.presence_penalty[:] = [0.5, -0.3, 0.0, 1.0]
    rows.frequency_penalty[:] = [0.25, 0.0, 1.5, -0.5]
    rows.repetition_penalty[:] = [1.0, 1.3, 0.8, 2.0]
    got = np.asarray(jax.jit(_penalise)(logits, rows, history))
    want = _penalised_reference(logits, history, rows.prompt_len, rows.presence_penalty, rows.frequency_penalty, rows.repetition_penalty)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_penalties_only_touch_rows_that_ask_for_them():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(2, 30)).astype(np.float32)
    history = np.tile(np.arange(30, dtype=np.int32), (2, 1))
    rows = _rows(2, temperature=0.0)
    rows.frequency_penalty[1] = 2.0
    tokens = sample_jit(logits, rows, np.zeros(2, np.int32), history).tokens
    plain = sample_jit(logits, _rows(2, temperature=0.0), np.zeros(2, np.int32), history).tokens
    assert np.asarray(tokens)[0] == np.asarray(plain)[0] == logits[0].argmax()
