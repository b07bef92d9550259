"""The engine on eight virtual CPU devices: placements, continuous batching, streaming and aborts.

The reference for every placement is the same tiny model on one device (colocated, tp 1), whose
own parity with transformers is shown in test_model_parity and test_llm. Sharding changes the
order of float32 sums only, so greedy tokens must be identical.
"""

from __future__ import annotations

import gc
import logging
import threading

import jax
import numpy as np
import pytest

from jds.config import load_config
from jds.config.placement import Placement
from jds.engine import prefill as prefill_module
from jds.engine.engine import Engine
from jds.engine.request import Request
from jds.engine.sequence import Sequence
from jds.model.loader import load_model
from jds.model.params import MatrixWeight
from jds.sampling_params import SamplingParams
from tests_paths import CONFIGS

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, top_k=50, ignore_eos=True)
PROMPTS = [[(31 * i + 7 * j) % 3000 + 5 for j in range(3 + 11 * i)] for i in range(6)]  # 3 .. 58 tokens
SINGLE = {"instances": {"devices": [0], "slots": 4}}
DISAGG = {
    "mode": "disaggregated",
    "prefill": {"devices": [0, 1], "tp": 2},
    "decode": {"devices": [2, 3, 4, 5], "pp": 2, "tp": 2, "slots": 4, "microbatches": 2},
}


@pytest.fixture(scope="module")
def tiny():
    return load_model(load_config(CONFIGS / "tiny.yaml"), progress=False)


def _engine(model, placement: dict) -> Engine:
    return Engine(model, Placement.model_validate(placement))


def _run(engine: Engine, prompts, params=GREEDY, tag: str = "r") -> list:
    streams = [engine.submit(Request(f"{tag}{i}", tuple(p), params, 1000 + i)) for i, p in enumerate(prompts)]
    return [s.result() for s in streams]


@pytest.fixture(scope="module")
def reference(tiny):
    engine = _engine(tiny, SINGLE)
    yield {"greedy": [o.token_ids for o in _run(engine, PROMPTS)], "sampled": [o.token_ids for o in _run(engine, PROMPTS, SAMPLED)]}
    engine.shutdown()


def _disagg(prefill_devices, prefill_tp, decode: dict) -> dict:
    return {"mode": "disaggregated", "prefill": {"devices": prefill_devices, "tp": prefill_tp}, "decode": {"slots": 4, **decode}}


PLACEMENTS = {
    "p1-d1": _disagg([0], 1, {"devices": [1]}),
    "p2-pp2-mb2": _disagg([0, 1], 2, {"devices": [2, 3], "pp": 2, "microbatches": 2}),
    "p4-pp4-mb4": _disagg([0, 1, 2, 3], 4, {"devices": [4, 5, 6, 7], "pp": 4, "microbatches": 4}),
    "p1-pp2tp2-mb2": _disagg([0], 1, {"devices": [1, 2, 3, 4], "pp": 2, "tp": 2, "microbatches": 2}),
    "p2-pp3-uneven": _disagg([0, 1], 2, {"devices": [2, 3, 4], "pp": 3, "slots": 6}),
    "p2-pp2tp2-explicit-1-3": _disagg([6, 7], 2, {"devices": [0, 1, 2, 3], "pp": 2, "tp": 2, "layers_per_stage": [1, 3]}),
    "two-prefill-two-decode": {
        "mode": "disaggregated",
        "prefill": [{"devices": [0, 1], "tp": 2}, {"devices": [2]}],
        "decode": [{"devices": [3, 4], "pp": 2, "slots": 2}, {"devices": [5, 6], "tp": 2, "slots": 2}],
    },
    "colocated-chunked": {"instances": {"devices": [0], "slots": 4, "chunked_prefill": 16}},
    "two-colocated": {"instances": [{"devices": [0], "slots": 2}, {"devices": [1, 2], "tp": 2, "slots": 2, "chunked_prefill": 32}]},
}


def test_int8_weights_give_the_same_tokens_on_every_kind_of_placement():
    config = load_config(CONFIGS / "tiny.yaml")
    config = config.model_copy(update={"model": config.model.model_copy(update={"quantization": "int8"})})
    model = load_model(config, progress=False)
    assert isinstance(model.params.layers.wq, MatrixWeight) and model.params.final_norm.dtype == np.float32
    outputs = []
    for placement in (SINGLE, PLACEMENTS["p1-pp2tp2-mb2"]):  # int8 matrices whole, and split by tp within pipeline stages
        engine = _engine(model, placement)
        try:
            outputs.append([o.token_ids for o in _run(engine, PROMPTS[:3])])
        finally:
            engine.shutdown()
    assert outputs[1] == outputs[0]


@pytest.mark.parametrize("name", PLACEMENTS)
def test_placements_match_the_single_device_reference(tiny, reference, name):
    engine = _engine(tiny, PLACEMENTS[name])
    try:
        greedy = _run(engine, PROMPTS)
        assert [o.token_ids for o in greedy] == reference["greedy"]
        assert all(o.finish_reason == "length" for o in greedy)
        # Seeded sampling depends only on the seed and step, never on placement or batch mates.
        assert [o.token_ids for o in _run(engine, PROMPTS, SAMPLED, "s")] == reference["sampled"]
        assert engine.slot_usage()[0] == 0
        if name == "two-prefill-two-decode":
            routes = {tuple(o.timings.route) for o in greedy}
            assert {r[1] for r in routes} == {"decode0", "decode1"}  # both decode instances served
    finally:
        engine.shutdown()


def test_instances_holding_each_layer_apart_give_the_reference_tokens(reference, monkeypatch):
    """The per-layer weight form an accelerator may serve with (``llama.layers_apart``): split
    as loaded, then across pipeline stages of uneven size and tensor-parallel devices. (Prompt
    chunks over it: test_layer_loop.)"""
    monkeypatch.setenv("JDS_LAYER_FORM", "per-layer")
    engine = _engine(load_model(load_config(CONFIGS / "tiny.yaml"), progress=False), PLACEMENTS["p2-pp2tp2-explicit-1-3"])
    try:
        held = [stage.params for stage in engine.decode_workers[0].batch.pipeline.stages] + [engine.prefill_workers[0].program.params]
        assert [len(p.layers) if isinstance(p.layers, tuple) else "stacked" for p in held] == [1, 3, 4]  # two stages, and the prefill
        wq = jax.tree.leaves(held[0].layers[0].wq)[0]  # no layer axis; split over the stage's tensor-parallel pair
        assert wq.ndim == 2 and len(wq.sharding.device_set) == 2 and wq.addressable_shards[0].data.size == wq.size // 2
        assert [o.token_ids for o in _run(engine, PROMPTS)] == reference["greedy"]
        assert [o.token_ids for o in _run(engine, PROMPTS, SAMPLED, "s")] == reference["sampled"]
    finally:
        engine.shutdown()


def test_a_request_asking_past_the_sequence_limit_ends_there_with_length(tiny):
    engine = _engine(tiny, SINGLE)
    try:
        (out,) = _run(engine, [[28] * (engine.max_seq_len - 3)], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
        assert out.finish_reason == "length" and len(out.token_ids) == 3
        assert engine.slot_usage()[0] == 0
    finally:
        engine.shutdown()


def test_concurrent_requests_give_what_each_gives_alone(tiny):
    engine = _engine(tiny, DISAGG)
    try:
        rng = np.random.default_rng(0)
        prompts = [rng.integers(5, 4000, size=int(n)).tolist() for n in rng.integers(1, 120, size=12)]
        params = [SamplingParams(max_tokens=int(m), temperature=0, ignore_eos=True) for m in rng.integers(1, 20, size=12)]
        alone = [_run(engine, [p], q, f"alone{i}-")[0].token_ids for i, (p, q) in enumerate(zip(prompts, params))]
        streams = [engine.submit(Request(f"c{i}", tuple(p), q, 0)) for i, (p, q) in enumerate(zip(prompts, params))]
        together = [s.result() for s in streams]  # 12 requests for 4 slots: most wait, then join
        assert [o.token_ids for o in together] == alone
        assert [len(o.token_ids) for o in together] == [q.max_tokens for q in params]
        assert engine.slot_usage() == (0, 4) and engine.num_running == 0
    finally:
        engine.shutdown()


def test_stream_delivers_tokens_as_they_come_and_holds_back_stop_strings(tiny):
    engine = _engine(tiny, DISAGG)
    try:
        full = _run(engine, [PROMPTS[2]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
        messages = list(engine.submit(Request("s", tuple(PROMPTS[2]), SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), 0)))
        assert len(messages) == 12 and all(len(m.token_ids) == 1 for m in messages)
        assert [m.finish_reason for m in messages] == [None] * 11 + ["length"]
        assert "".join(m.text for m in messages) == full.text
        t = messages[-1].timings
        assert t.queue >= 0 and t.prefill > 0 and t.ttft >= t.prefill and t.transfer_seconds > 0
        assert t.transfer_bytes > 0 and len(t.token_times) == 12 and t.tpot > 0
        # A stop string cut from the text is never streamed, even in part.
        middle = next(i for i in range(len(full.text) // 2, len(full.text)) if not full.text[i].isspace())
        stop = full.text[middle : middle + 3]
        stopped = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=[stop])
        msgs = list(engine.submit(Request("t", tuple(PROMPTS[2]), stopped, 0)))
        streamed = "".join(m.text for m in msgs)
        assert stop not in streamed and full.text.startswith(streamed) and msgs[-1].finish_reason == "stop"
    finally:
        engine.shutdown()


def _kv_arrays() -> int:
    """Live KV page arrays (pools, a prefill's KV, a handoff's): after a request ends there are no
    more than before it came. Earlier tests' engines, garbage by now, are collected first."""
    gc.collect()
    return sum(a.ndim == 5 for a in jax.live_arrays())


class _Gate:
    """Wraps a function so the test can hold a request inside it, abort, then let it go."""

    def __init__(self, fn):
        self.fn, self.entered, self.release = fn, threading.Event(), threading.Event()

    def __call__(self, *args, **kwargs):
        self.entered.set()
        assert self.release.wait(30)
        return self.fn(*args, **kwargs)


def test_slots_are_handed_out_lowest_first():
    from jds.engine.kv_pool import KVPool

    pool = KVPool(4, 64, 16, 64, threading.Condition())
    assert [pool.try_reserve(10) for _ in range(3)] == [0, 1, 2]
    pool.release(1)
    pool.release(0)
    assert [pool.try_reserve(10), pool.try_reserve(10), pool.try_reserve(10), pool.try_reserve(10)] == [0, 1, 3, None]


@pytest.mark.parametrize("placement", [SINGLE, PLACEMENTS["p2-pp2-mb2"]], ids=["one-stage", "two-stages"])
def test_the_next_decode_step_is_dispatched_before_the_host_reads_the_last(tiny, reference, monkeypatch, placement):
    """The host's reading and streaming of step n overlap the device's step n + 1, whose tokens it
    takes on the device; a request ending by length costs no extra step."""
    from jds.engine.decode import DecodeBatch
    from jds.engine.programs import Pipeline

    events: list[str] = []
    forward, apply = Pipeline.forward, DecodeBatch._apply
    monkeypatch.setattr(Pipeline, "forward", lambda self, *args: events.append("dispatch") or forward(self, *args))
    monkeypatch.setattr(DecodeBatch, "_apply", lambda self, *args: events.append("read") or apply(self, *args))
    engine = _engine(tiny, placement)
    try:
        (out,) = _run(engine, PROMPTS[2:3])  # alone: one microbatch, one row
    finally:
        engine.shutdown()
    assert out.token_ids == reference["greedy"][2]
    steps = GREEDY.max_tokens - 1  # the first token is the prefill's
    reads = [i for i, e in enumerate(events) if e == "read"]
    assert events.count("dispatch") == steps and len(reads) == steps
    assert [events[:i].count("dispatch") for i in reads] == [k + 2 for k in range(steps - 1)] + [steps]


def test_a_slot_freed_by_a_stop_id_while_its_next_step_runs_serves_the_next_request_exactly(tiny, reference):
    """A stop id is seen only after the following step was dispatched for its row; that step's
    token is dropped, and the request that takes the slot next is unaffected by it."""
    engine = _engine(tiny, {"instances": {"devices": [0], "slots": 1}})
    stop_at = reference["greedy"][0][4]
    stopping = SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_at], ignore_eos=True)
    try:
        first = engine.submit(Request("stops", tuple(PROMPTS[0]), stopping, 1))
        after = [engine.submit(Request(f"next{i}", tuple(p), GREEDY, 2 + i)) for i, p in enumerate(PROMPTS[1:3])]
        out = first.result()
        assert out.finish_reason == "stop"
        assert out.token_ids == reference["greedy"][0][: reference["greedy"][0].index(stop_at) + 1]
        assert [s.result().token_ids for s in after] == reference["greedy"][1:3]
    finally:
        engine.shutdown()


def test_a_decode_step_computes_the_rows_up_to_the_highest_slot_in_use(tiny, monkeypatch):
    from jds.engine.programs import Pipeline

    rows: list[int] = []
    forward = Pipeline.forward

    def counted(self, tokens, *args):
        rows.append(tokens.shape[0])
        return forward(self, tokens, *args)

    monkeypatch.setattr(Pipeline, "forward", counted)
    engine = _engine(tiny, {"instances": {"devices": [0], "slots": 16}})  # row buckets 1, 8, 16
    try:
        _run(engine, PROMPTS[:1])
        assert set(rows) == {1}  # alone in slot 0
        rows.clear()
        _run(engine, PROMPTS[:5], tag="five")  # slots 0-4 while all run: 8 rows
        assert max(rows) == 8 and set(rows) <= {1, 8}
    finally:
        engine.shutdown()


LONG_GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
LONG_SAMPLED = SamplingParams(max_tokens=40, temperature=0.9, top_p=0.9, top_k=50, ignore_eos=True)
# Eight pages of 16 positions: the six prompts (3 .. 58 tokens) need 1 .. 4 pages to start and up
# to 7 by their 40th token, so running requests run out of pages and the youngest is preempted.
TIGHT = {
    "colocated": {"instances": {"devices": [0], "slots": 4, "kv_pages": 8, "page_size": 16}},
    "colocated-chunked": {"instances": {"devices": [0], "slots": 4, "kv_pages": 8, "page_size": 16, "chunked_prefill": 16}},
    "disaggregated-pp2": _disagg([0], 1, {"devices": [1, 2], "pp": 2, "kv_pages": 8, "page_size": 16}),
}


@pytest.fixture(scope="module")
def long_reference(tiny):
    engine = _engine(tiny, SINGLE)  # 4 slots of 512 positions: no request waits for pages
    yield {"greedy": [o.token_ids for o in _run(engine, PROMPTS, LONG_GREEDY)], "sampled": [o.token_ids for o in _run(engine, PROMPTS, LONG_SAMPLED)]}
    engine.shutdown()


def _assert_only_the_prefix_cache_holds_pages(engine: Engine) -> None:
    """Once every request ended: no slot in use, every page in use is a cached one, and dropping
    the cache frees them all."""
    assert engine.slot_usage()[0] == 0
    pools = [w.pool for w in engine.decode_workers + engine.colocated_workers + engine.prefill_workers if w.pool is not None]
    assert [p.pages.used for p in pools] == [p.pages.cached for p in pools]
    prefill_pools = [w.pool for w in engine.prefill_workers if w.pool is not None]
    assert engine.prefill_page_usage() == (sum(p.pages.cached for p in prefill_pools), sum(p.pages.total for p in prefill_pools))
    for p in pools:
        p.drop_cache()
    assert engine.page_usage()[0] == 0 and engine.prefill_page_usage()[0] == 0


@pytest.mark.parametrize("name", TIGHT)
def test_requests_preempted_for_pages_continue_with_the_same_tokens(tiny, long_reference, name):
    engine = _engine(tiny, TIGHT[name])
    try:
        greedy = _run(engine, PROMPTS, LONG_GREEDY)
        assert [o.token_ids for o in greedy] == long_reference["greedy"]
        if name == "colocated":  # seeded samples depend on the seed and step alone: one placement shows it
            assert [o.token_ids for o in _run(engine, PROMPTS, LONG_SAMPLED, "s")] == long_reference["sampled"]
        assert sum(w.batch.preemptions for w in engine.decode_workers + engine.colocated_workers) > 0
        _assert_only_the_prefix_cache_holds_pages(engine)
    finally:
        engine.shutdown()


SHARED = [(13 * j) % 3000 + 5 for j in range(40)]  # a 40-token system prompt: two full pages of 16, and 8 tokens more


PREFIX_PLACEMENTS = {  # pages of 16, so that these short prompts fill several
    "whole-prompts": {"instances": {"devices": [0], "slots": 4, "page_size": 16}},
    "chunked": {"instances": {"devices": [0], "slots": 4, "page_size": 16, "chunked_prefill": 16}},
    "disaggregated": {"mode": "disaggregated", "prefill": {"devices": [0, 1], "tp": 2}, "decode": {"devices": [2, 3], "pp": 2, "slots": 4, "page_size": 16}},
}


def _with_prefix_caching(placement: dict, on: bool) -> dict:
    where = "prefill" if placement.get("mode") == "disaggregated" else "instances"
    return {**placement, where: {**placement[where], "enable_prefix_caching": on}}


@pytest.mark.parametrize("name", PREFIX_PLACEMENTS)
def test_a_prefix_hit_gives_the_tokens_of_a_miss_and_reports_its_cached_tokens(tiny, name):
    prompts = [SHARED + [7 + i] * (3 + 5 * i) for i in range(3)] + [SHARED]
    outputs = {}
    for caching in (False, True):
        engine = _engine(tiny, _with_prefix_caching(PREFIX_PLACEMENTS[name], caching))
        try:
            (first,) = _run(engine, prompts[:1], LONG_GREEDY)  # a miss: computes, then caches, the shared pages
            rest = _run(engine, prompts[1:], LONG_GREEDY, "rest")
            # The next turn of the first conversation: its prompt, the answer, a new message.
            turn = prompts[0] + first.token_ids + [11, 12, 13]
            (second,) = _run(engine, [turn], LONG_GREEDY, "turn")
            outputs[caching] = [first, *rest, second]
            assert engine.prefix_cache_usage()[1] == sum(o.timings.cached_tokens for o in outputs[caching])
            if caching:
                if name == "disaggregated":  # the prompts' full pages, kept by the prefill instance's cache
                    assert engine.prefill_page_usage()[0] == len({(tuple(p[: 16 * (k + 1)])) for p in prompts + [turn] for k in range(len(p) // 16)})
                _assert_only_the_prefix_cache_holds_pages(engine)
        finally:
            engine.shutdown()
    assert [o.token_ids for o in outputs[True]] == [o.token_ids for o in outputs[False]]
    assert [o.timings.cached_tokens for o in outputs[False]] == [0] * 5
    # A colocated instance caches the answer's pages too (it decoded them); a prefill instance
    # caches the prompts it computed, so the next turn reuses the first prompt's full pages.
    answered = len(prompts[0]) + len(first.token_ids) - 1 if name != "disaggregated" else len(prompts[0])
    assert [o.timings.cached_tokens for o in outputs[True]] == [0, 32, 32, 32, 16 * (answered // 16)]


def test_aborts_among_preemptions_leave_no_page_held(tiny):
    engine = _engine(tiny, TIGHT["colocated"])
    rng = np.random.default_rng(0)
    try:
        streams = [engine.submit(Request(f"a{i}", tuple(PROMPTS[i % len(PROMPTS)]), LONG_GREEDY, i)) for i in range(36)]
        for i in rng.permutation(36)[:18]:
            threading.Event().wait(rng.uniform(0, 0.02))  # aborts land while waiting, prefilling and decoding
            engine.abort(f"a{i}")
        reasons = {s.result().finish_reason for s in streams}
        assert reasons == {"abort", "length"}
        assert engine.colocated_workers[0].batch.preemptions > 0
        _assert_only_the_prefix_cache_holds_pages(engine)
    finally:
        engine.shutdown()


def test_a_request_that_could_not_finish_even_alone_is_refused_naming_max_tokens(tiny):
    engine = _engine(tiny, {"instances": {"devices": [0], "slots": 2, "kv_pages": 2, "page_size": 16}})  # 32 positions
    try:
        with pytest.raises(ValueError, match="max_tokens: the prompt's 58 tokens and max_tokens 10 need 68 KV positions"):
            engine.submit(Request("too-long", tuple(PROMPTS[5]), GREEDY, 0))
        assert engine.submit(Request("fits", tuple(PROMPTS[1]), GREEDY, 0)).result().finish_reason == "length"  # 14 + 10
    finally:
        engine.shutdown()


@pytest.mark.parametrize("where", ["waiting", "prefill", "transfer", "decode"])
def test_abort_anywhere_frees_slot_and_kv(tiny, monkeypatch, where):
    engine = _engine(tiny, DISAGG)
    try:
        _run(engine, PROMPTS[:2])  # compile, so the wait below is about the request itself
        before, before_kv = len(jax.live_arrays()), _kv_arrays()
        long_run = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
        if where in ("prefill", "waiting"):
            gate = _Gate(engine.prefill_workers[0].program.run)
            monkeypatch.setattr(engine.prefill_workers[0].program, "run", gate)
        elif where == "transfer":
            gate = _Gate(prefill_module.send_pages)
            monkeypatch.setattr(prefill_module, "send_pages", gate)
        blocker = engine.submit(Request("blocker", tuple(PROMPTS[1]), long_run, 0)) if where == "waiting" else None
        stream = engine.submit(Request("victim", tuple(PROMPTS[3]), long_run, 0))
        if where == "decode":
            it = iter(stream)
            assert next(it).token_ids and next(it).token_ids  # first token from prefill, then decode steps
        else:
            assert gate.entered.wait(30)
        assert engine.abort("victim") and not engine.abort("no-such-request")
        if where in ("prefill", "transfer", "waiting"):
            gate.release.set()
        if blocker is not None:
            engine.abort("blocker")
            assert blocker.result().finish_reason == "abort"
        out = stream.result()
        assert out.finish_reason == "abort" and len(out.token_ids) < 400
        _wait_until(lambda: engine.slot_usage()[0] == 0 and engine.num_running == 0)
        assert engine.slot_usage() == (0, 4)
        _wait_until(lambda: _kv_arrays() <= before_kv and len(jax.live_arrays()) <= before, timeout=30)
        assert _kv_arrays() <= before_kv and len(jax.live_arrays()) <= before
        # The engine keeps serving.
        assert _run(engine, PROMPTS[:1], tag="after")[0].finish_reason == "length"
    finally:
        engine.shutdown()


def _wait_until(cond, timeout: float = 10.0) -> None:
    import time

    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)


def test_transfer_time_is_recorded_and_logged(tiny, caplog):
    engine = _engine(tiny, {**DISAGG, "decode": {**DISAGG["decode"], "page_size": 16}})  # pages smaller than a bucket
    try:
        with caplog.at_level(logging.DEBUG, logger="jds.requests"):
            out = _run(engine, [PROMPTS[4]])[0]
        # The pages its 47-token prompt fills (three of 16 positions, not its 64-position bucket):
        # K and V, 4 layers, 4 KV heads, head_dim 16, f32.
        assert len(PROMPTS[4]) == 47
        expected_bytes = 2 * 4 * 3 * 16 * 4 * 16 * 4
        assert out.timings.transfer_bytes == expected_bytes and out.timings.transfer_seconds > 0
        assert out.timings.route == ["prefill0", "decode0"]
        line = next(r.getMessage() for r in caplog.records if "r0 finished" in r.getMessage())
        assert f"({expected_bytes} bytes)" in line and "transfer" in line
    finally:
        engine.shutdown()


def test_bad_requests_are_refused_with_the_field_named(tiny):
    engine = _engine(tiny, SINGLE)
    try:
        with pytest.raises(ValueError, match="prompt is empty"):
            engine.submit(Request("a", (), GREEDY, 0))
        with pytest.raises(ValueError, match=r"max_seq_len is 512"):
            engine.submit(Request("b", (1,) * 512, GREEDY, 0))
        with pytest.raises(ValueError, match="stop_token_ids"):
            engine.submit(Request("c", (1,), SamplingParams(stop_token_ids=list(range(9))), 0))
        stream = engine.submit(Request("d", (1, 2), SamplingParams(max_tokens=200, temperature=0, ignore_eos=True), 0))
        with pytest.raises(ValueError, match="request_id 'd' is already running"):
            engine.submit(Request("d", (1, 2), GREEDY, 0))
        engine.abort("d")
        assert stream.result().finish_reason == "abort"
    finally:
        engine.shutdown()


def test_shutdown_ends_running_requests(tiny):
    engine = _engine(tiny, DISAGG)
    stream = engine.submit(Request("x", (1, 2, 3), SamplingParams(max_tokens=500, temperature=0, ignore_eos=True), 0))
    engine.shutdown()
    assert stream.result().finish_reason == "abort"
    with pytest.raises(RuntimeError, match="shut down"):
        engine.submit(Request("y", (1,), GREEDY, 0))


_COMPILES: list[str] = []  # programs compiled, or loaded from the compile cache the tests share
jax.monitoring.register_event_duration_secs_listener(
    lambda event, *_, **__: _COMPILES.append(event) if event == "/jax/core/compile/backend_compile_duration" else None
)
jax.monitoring.register_event_listener(
    lambda event, **__: _COMPILES.append(event) if event == "/jax/compilation_cache/cache_hits" else None
)


@pytest.mark.parametrize(
    "placement",
    [
        {
            "mode": "disaggregated",
            "prefill": {"devices": [0, 1], "tp": 2, "max_batch": 2, "max_batch_tokens": 64},
            # two decode instances, so the handoff cuts its pages for two stage layouts
            "decode": [{"devices": [2, 3], "pp": 2, "slots": 2, "max_seq_len": 64}, {"devices": [4], "slots": 2, "max_seq_len": 64}],
        },
        {"instances": {"devices": [0], "slots": 2, "max_seq_len": 64, "max_batch": 2, "max_batch_tokens": 64, "chunked_prefill": 32}},
        {"instances": {"devices": [0], "slots": 2, "max_seq_len": 64, "max_batch": 2, "max_batch_tokens": 64}},
    ],
    ids=["disaggregated-pp2-pp1", "colocated-chunked", "colocated"],
)
def test_after_warmup_serving_compiles_nothing(tiny, placement):
    engine = Engine(tiny, Placement.model_validate(placement), warmup=True)
    try:
        program = (engine.prefill_workers or engine.colocated_workers)[0].program
        assert program.shapes() == [(1, 16), (2, 16), (1, 32), (2, 32), (1, 64)]
        compiled = len(_COMPILES)
        prompts = [list(range(1, n + 1)) for n in (3, 20, 5, 40, 17, 60, 2, 9)]
        outs = _run(engine, prompts, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
        assert all(o.finish_reason == "length" for o in outs)
        assert len(_COMPILES) == compiled, "a request compiled a program that warm-up missed"
    finally:
        engine.shutdown()


POISONED = {"prefill": 666, "decode": 667}  # seeds of requests whose row breaks the program they are batched into


def _poison(fn, seed: int, seeds_of):
    """``fn`` that raises before running whenever one of its rows is the poisoned request."""

    def call(*args):
        if seed in seeds_of(*args):
            raise ValueError("injected bad row")
        return fn(*args)

    return call


CHUNKED = {"instances": {"devices": [0], "slots": 4, "chunked_prefill": 16}}


@pytest.mark.parametrize("placement", [DISAGG, SINGLE, CHUNKED], ids=["disaggregated", "colocated", "chunked"])
def test_a_request_that_breaks_its_batch_fails_alone_and_its_neighbours_get_their_tokens(tiny, reference, monkeypatch, placement):
    engine = _engine(tiny, placement)
    try:
        pipeline = (engine.decode_workers or engine.colocated_workers)[0].pipeline
        monkeypatch.setattr(pipeline, "forward", _poison(pipeline.forward, POISONED["decode"], lambda *args: list(args[4].seed)))
        program = (engine.prefill_workers or engine.colocated_workers)[0].program
        monkeypatch.setattr(program, "run", _poison(program.run, POISONED["prefill"], lambda seqs: [s.request.seed for s in seqs]))
        requests = [Request(f"r{i}", tuple(p), GREEDY, 1000 + i) for i, p in enumerate(PROMPTS)]
        requests[2:2] = [Request(f"poisoned-{where}", tuple(PROMPTS[1]), GREEDY, seed) for where, seed in POISONED.items()]
        outs = [s.result() for s in [engine.submit(r) for r in requests]]
        prefill_poisoned, decode_poisoned = outs.pop(2), outs.pop(2)
        assert decode_poisoned.finish_reason == "error" and "injected bad row" in decode_poisoned.error
        if placement is CHUNKED:  # prompts go through forward, chunk by chunk: the prefill program never runs
            assert prefill_poisoned.token_ids == reference["greedy"][1]
        else:
            assert prefill_poisoned.finish_reason == "error" and "injected bad row" in prefill_poisoned.error
        assert [o.token_ids for o in outs] == reference["greedy"]
        assert all(o.finish_reason == "length" for o in outs)
        _wait_until(lambda: engine.slot_usage()[0] == 0)
        assert engine.slot_usage() == (0, 4) and engine.num_running == 0
    finally:
        engine.shutdown()


class _RaiseOnce:
    """A method that raises the first time it is called, before doing anything: a host-side fault."""

    def __init__(self, fn):
        self.fn, self.raised = fn, False

    def __call__(self, *args, **kwargs):
        if not self.raised:
            self.raised = True
            raise RuntimeError("injected host fault")
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize(
    "placement, where",
    [(SINGLE, "prompts._insert"), (CHUNKED, "pool.register")],
    ids=["colocated-batch-insert", "chunked-after-last-chunk"],
)
def test_a_fault_while_admitting_prompts_gives_back_their_slots_and_prefills_them_again(tiny, reference, monkeypatch, placement, where):
    """The fault escapes after slots were taken for the prompts being written and before they
    joined the decode batch (between the last chunk and joining, for chunked prefill)."""
    engine = _engine(tiny, placement)
    try:
        worker = engine.colocated_workers[0]
        owner, name = where.split(".")
        target = getattr(worker, owner)
        fault = _RaiseOnce(getattr(target, name))
        monkeypatch.setattr(target, name, fault)
        assert [o.token_ids for o in _run(engine, PROMPTS)] == reference["greedy"]
        assert fault.raised
        _wait_until(lambda: engine.slot_usage()[0] == 0)
        _assert_only_the_prefix_cache_holds_pages(engine)
    finally:
        engine.shutdown()


def test_a_request_goes_to_an_instance_whose_pages_hold_it_alone(tiny, reference, monkeypatch):
    """Two colocated instances of different KV sizes: the smaller (two pages of 16) takes only the
    requests it could finish alone; admitted by the pages of its prompt, a longer one would
    preempt itself there at its third page, again and again."""
    small = {"devices": [0], "slots": 2, "kv_pages": 2, "page_size": 16}
    engine = _engine(tiny, {"instances": [small, {"devices": [1], "slots": 2, "kv_pages": 8, "page_size": 16}]})
    try:
        worker, needs = engine.colocated_workers[0], []
        take = worker._take

        def recorded(*args):
            seqs = take(*args)
            needs.extend(s.prompt_len + s.limit for s in seqs)
            return seqs

        monkeypatch.setattr(worker, "_take", recorded)
        assert [o.token_ids for o in _run(engine, PROMPTS)] == reference["greedy"]
        assert all(n <= 2 * 16 for n in needs), needs
        short, long = (Sequence(Request(f"r{n}", tuple(PROMPTS[n]), GREEDY, 0), None, (), 512) for n in (1, 2))  # 24 and 35 positions
        assert [w._accepts(short) for w in engine.colocated_workers] == [True, True]
        assert [w._accepts(long) for w in engine.colocated_workers] == [False, True]
    finally:
        engine.shutdown()


def test_a_prefilled_request_goes_to_a_decode_instance_whose_pages_hold_it_alone():
    """In one process, the router of prefilled requests skips a decode instance too small for the
    request alone, even one with more room just now."""
    import threading
    from types import SimpleNamespace

    from jds.engine.kv_pool import KVPool

    cond, stop = threading.Condition(), threading.Event()
    small, large = (SimpleNamespace(max_seq_len=512, pool=KVPool(4, pages, 16, 512, cond)) for pages in (2, 8))
    assert large.pool.try_reserve(10, 7 * 16) is not None  # commits 7 of its 8 pages: less room than the small one
    router = prefill_module.DecodeRouter([small, large], cond, stop)
    short, long = (Sequence(Request(f"r{n}", tuple(PROMPTS[n]), GREEDY, 0), None, (), 512) for n in (0, 2))  # 13 and 35 positions
    assert router.reserve(short)[0] is small
    assert router.reserve(long)[0] is large


def test_a_request_that_outgrows_every_page_of_its_instance_fails_instead_of_preempting_itself(tiny, monkeypatch):
    """Admission refuses such a request (test_a_request_that_could_not_finish_even_alone_is_refused_naming_max_tokens);
    should one get past it, the decode batch ends it with an error naming max_tokens."""
    engine = _engine(tiny, {"instances": {"devices": [0], "slots": 2, "kv_pages": 2, "page_size": 16}})
    try:
        worker = engine.colocated_workers[0]
        monkeypatch.setattr(engine._running, "_kv_positions", lambda: None)
        monkeypatch.setattr(worker, "_accepts", lambda seq: True)
        out = _run(engine, [PROMPTS[2]], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
        assert out.finish_reason == "error" and "max_tokens" in out.error
        assert worker.batch.preemptions == 0
        _wait_until(lambda: engine.slot_usage()[0] == 0)
        assert engine.slot_usage()[0] == 0 and worker.pool.pages.used == worker.pool.pages.cached
        monkeypatch.undo()
        assert _run(engine, [PROMPTS[0]])[0].finish_reason == "length"
    finally:
        engine.shutdown()


class _DeviceFault:
    """``Pipeline.forward`` (or another of its calls: ``method``) that, on the calls numbered in
    ``faults``, runs and then loses every stage's cache and raises, as a step failing on the
    device after consuming its donated cache."""

    def __init__(self, pipeline, faults: set[int], method: str = "forward"):
        self.pipeline, self.forward, self.faults, self.calls = pipeline, getattr(pipeline, method), faults, 0

    def __call__(self, *args):
        self.calls += 1
        out = self.forward(*args)
        if self.calls in self.faults:
            jax.block_until_ready(out)
            for stage in self.pipeline.stages:
                for leaf in jax.tree.leaves(stage.cache):
                    leaf.delete()
            raise RuntimeError("injected device fault")
        return out


def test_a_fault_that_takes_a_prefill_instances_pool_sends_its_prompts_back_to_prefill_once(tiny, reference, monkeypatch):
    engine = _engine(tiny, DISAGG)
    try:
        worker = engine.prefill_workers[0]
        fault = _DeviceFault(worker.prompts.pipeline, {1}, "insert")  # the first batch's pages are written, then lost
        monkeypatch.setattr(worker.prompts.pipeline, "insert", fault)
        assert [o.token_ids for o in _run(engine, PROMPTS)] == reference["greedy"]
        assert fault.calls > 1
        _wait_until(lambda: engine.slot_usage()[0] == 0)
        _assert_only_the_prefix_cache_holds_pages(engine)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("placement", [DISAGG, SINGLE, CHUNKED], ids=["disaggregated", "colocated", "chunked"])
def test_a_device_fault_sends_running_requests_back_to_prefill_once(tiny, reference, monkeypatch, placement):
    engine = _engine(tiny, placement)
    try:
        pipeline = (engine.decode_workers or engine.colocated_workers)[0].pipeline
        fault = _DeviceFault(pipeline, {6})
        monkeypatch.setattr(pipeline, "forward", fault)
        # Recomputed requests continue with the tokens they would have had, greedy and seeded alike.
        assert [o.token_ids for o in _run(engine, PROMPTS)] == reference["greedy"]
        assert fault.calls > 6
        if placement is DISAGG:
            fault.calls = 0
            assert [o.token_ids for o in _run(engine, PROMPTS, SAMPLED, "s")] == reference["sampled"]
            assert fault.calls > 6

        # A request the device fails a second time ends with an error; its slot is freed and the engine goes on.
        fault.calls, fault.faults = 0, set(range(3, 60))
        out = _run(engine, PROMPTS[:1], tag="twice")[0]
        assert out.finish_reason == "error" and "injected device fault" in out.error
        _wait_until(lambda: engine.slot_usage()[0] == 0)
        assert engine.slot_usage() == (0, 4) and engine.num_running == 0
        fault.faults = set()
        assert [o.token_ids for o in _run(engine, PROMPTS[:2], tag="after")] == reference["greedy"][:2]
    finally:
        engine.shutdown()
