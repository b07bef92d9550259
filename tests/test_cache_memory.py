"""No program copies the KV page pool whole.

A copy of the cache (XLA transposing it for a scatter, or copying it because a write was not in
place) is what made a 64-slot cache fail every step on a GPU. Whether a compiled program holds
one shows in the memory it needs beyond its arguments: its temporaries, and whatever of its
output does not reuse a donated argument's buffer. With the rows, new tokens and positions read
held fixed, that must not grow with the cache. Each program is compiled for two pools that
differ only in how many pages they hold, and its new memory may differ by less than one
layer's share of that difference. The pools hold the default number of pages, as many as
``SLOTS`` rows of their positions fill, so the long pool has four times the pages. (XLA's CPU
backend is the one these tests run on; it kept the cache in place even where a GPU copied it, so
this guards the programs' form: donation, writes that can happen in place, reads of the pages in
use only; the GPU itself must be measured.)
"""

from __future__ import annotations

import math

import jax
import jax.extend.core
import pytest

from jds.config import load_config
from jds.config.placement import DecodeInstance
from jds.engine.builders import decode_instance
from jds.model import kv_cache
from jds.model.loader import load_model
from tests_paths import CONFIGS

SLOTS = 8
SHORT, LONG = 256, 1024  # cache positions of the two pipelines


def _pipelines() -> dict:
    model = load_model(load_config(CONFIGS / "tiny.yaml"), progress=False)
    devices = jax.devices()[:2]  # a first stage and a last (sampling) one
    return {seq: decode_instance(model, DecodeInstance(devices=[0, 1], pp=2, slots=SLOTS).resolved(seq), devices) for seq in (SHORT, LONG)}


@pytest.fixture(scope="module")
def pipelines():
    return _pipelines()


@pytest.fixture(scope="module")
def apart_pipelines():
    """Stages holding each layer's weights apart (``llama.layers_apart``), run as a Python loop."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JDS_LAYER_FORM", "per-layer")
        return _pipelines()


def _cache_bytes(stage) -> int:
    return stage.cache.k.nbytes + stage.cache.v.nbytes


def _new_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes


def _growth_allowed(pipelines, index: int) -> int:
    short, long = pipelines[SHORT].stages[index], pipelines[LONG].stages[index]
    return (_cache_bytes(long) - _cache_bytes(short)) // short.span.num_layers


@pytest.mark.parametrize("stage", [0, 1], ids=["first-stage", "last-stage"])
@pytest.mark.parametrize(("rows", "tokens", "context"), [(SLOTS, 1, 256), (1, 1, 16), (1, 32, 128)], ids=["decode-all-rows", "decode-one-row", "prompt-chunk"])
def test_a_step_writes_the_cache_in_place(pipelines, stage, rows, tokens, context):
    new = {seq: _new_bytes(p.stages[stage].compile_run(rows, tokens, context)) for seq, p in pipelines.items()}
    assert new[LONG] - new[SHORT] < _growth_allowed(pipelines, stage), new


@pytest.mark.parametrize("stage", [0, 1], ids=["first-stage", "last-stage"])
@pytest.mark.parametrize(("rows", "tokens", "context"), [(SLOTS, 1, 256), (1, 32, 128)], ids=["decode-all-rows", "prompt-chunk"])
def test_a_step_over_per_layer_weights_writes_the_cache_in_place(apart_pipelines, stage, rows, tokens, context):
    assert all(isinstance(p.stages[stage].params.layers, tuple) for p in apart_pipelines.values())
    new = {seq: _new_bytes(p.stages[stage].compile_run(rows, tokens, context)) for seq, p in apart_pipelines.items()}
    assert new[LONG] - new[SHORT] < _growth_allowed(apart_pipelines, stage), new


@pytest.mark.parametrize("stage", [0, 1], ids=["first-stage", "last-stage"])
@pytest.mark.parametrize("pages", [1, 32])
def test_an_insert_writes_the_cache_in_place(pipelines, stage, pages):
    new = {seq: _new_bytes(p.stages[stage].compile_insert(pages, (0, 2))) for seq, p in pipelines.items()}
    assert new[LONG] - new[SHORT] < _growth_allowed(pipelines, stage), new


def _indexing(jaxpr: jax.extend.core.Jaxpr, size: int) -> list[tuple[str, tuple, tuple]]:
    """Every gather from and scatter into an array of ``size`` elements (the pool, whatever shape
    it is viewed in) in ``jaxpr`` and the programs it calls (a scan's body, a nested jit): the
    primitive, the operand axes its index vector addresses, in order, and those it batches over."""
    found = []
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if (name == "gather" or name.startswith("scatter")) and math.prod(eqn.invars[0].aval.shape) == size:
            numbers = eqn.params["dimension_numbers"]
            indexed = numbers.start_index_map if name == "gather" else numbers.scatter_dims_to_operand_dims
            found.append((name, tuple(indexed), tuple(numbers.operand_batching_dims)))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    found += _indexing(sub.jaxpr, size)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    found += _indexing(sub, size)
    return found


@pytest.mark.parametrize("form", ["stacked", "per-layer"])
def test_every_program_indexes_the_pool_by_its_leading_axes_in_order(pipelines, apart_pipelines, form, monkeypatch):
    """XLA's GPU compiler brings every gather and scatter to one form before it emits them: the
    axes the index vector addresses first, in order, the others after. For an index on a later
    axis of the pool (the offset within a page, or the page axis with the layer axis left whole)
    that is a transposed copy of the whole pool, the likeliest cause of the one that made a
    64-slot cache fail every step on an H200. XLA's CPU backend leaves such a scatter in place, so the memory tests above cannot see
    it there; this checks the form itself, in every program that reads or writes the pool, traced
    as for a GPU (a CPU keeps a write of its own, ``kv_cache.write``): each index addresses the
    pool's leading axes in order (layer, page, ...), and nothing batches."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    jax.clear_caches()  # a program's trace is kept without the backend in its key
    try:
        _check_indexing((pipelines if form == "stacked" else apart_pipelines)[SHORT].stages)
    finally:
        jax.clear_caches()  # not to leave GPU-form traces to later CPU calls


def _check_indexing(stages) -> None:
    for stage in stages:
        programs = {
            "decode-all-rows": (stage.trace_run(SLOTS, 1, 256), {"gather", "scatter"}),
            "decode-one-row": (stage.trace_run(1, 1, 16), {"gather", "scatter"}),
            "prompt-chunk": (stage.trace_run(1, 32, 128), {"gather", "scatter"}),
            "insert": (stage.trace_insert(32, (0, 2)), {"scatter"}),
            "handoff-take": (jax.jit(kv_cache.take).trace(stage.cache, jax.ShapeDtypeStruct((8,), "int32")), {"gather"}),
        }
        for program, (traced, kinds) in programs.items():
            found = _indexing(traced.jaxpr.jaxpr, stage.cache.k.size)
            assert {name for name, _, _ in found} == kinds, (program, found)
            for name, indexed, batched in found:
                assert indexed == tuple(range(len(indexed))) and not batched, (program, name, indexed, batched)
