"""One builder per role: an instance's programs on its devices, and what warm-up compiles for it.

The in-process ``Engine`` and the role processes of a cluster (leaders and followers alike)
build instances only through these, from a resolved placement (``Placement.resolved``: every
instance's ``max_seq_len`` filled in), so an instance is the same program wherever it runs.
``devices`` are an instance's own, in the order of its ``devices`` list.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from collections.abc import Sequence as Seq

import jax

from jds.config.fit import instance_pages
from jds.config.placement import ColocatedInstance, DecodeInstance, PrefillInstance
from jds.config.stages import stage_spans
from jds.engine.kv_pool import KVPool
from jds.engine.programs import Pipeline, PoolShape, PrefillProgram, place_params
from jds.engine.prompt_pages import REUSE_CHUNK
from jds.model.loader import LoadedModel
from jds.transfer.handoff import compile_take, compile_take_from_pool, group_sizes

Job = Callable[[], object]  # one ahead-of-time compile


def prefill_instance(
    model: LoadedModel, spec: PrefillInstance, devices: Seq[jax.Device], longest: int, page_size: int, cuts: tuple[int, ...] = (),
    gather_kv: bool = False,
) -> PrefillProgram:  # fmt: skip
    """A prefill instance for prompts up to ``longest`` (the placement's ``max_seq_len``), its KV
    as pages of ``page_size`` (the decode instances'), cut at ``cuts`` (every decode stage start of
    the placement, in one process) or gathered whole (``gather_kv``: for an offer to another
    process)."""
    return PrefillProgram(model.arch, place_params(model.params, devices), longest, spec, page_size, cuts, gather_kv)


def decode_instance(model: LoadedModel, spec: DecodeInstance, devices: Seq[jax.Device]) -> Pipeline:
    """A decode instance: its stages, each on its ``tp`` devices."""
    spans = stage_spans(model.arch.num_layers, spec.pp, spec.layers_per_stage)
    stages = [list(devices[i * spec.tp : (i + 1) * spec.tp]) for i in range(spec.pp)]
    microbatches = spec.num_microbatches(devices[0].platform == "cpu")
    return Pipeline(model.arch, model.params, spans, stages, spec.slots, spec.max_seq_len, microbatches, pool_shape(model, spec))


def colocated_instance(model: LoadedModel, spec: ColocatedInstance, devices: Seq[jax.Device]) -> tuple[PrefillProgram, Pipeline]:
    """A colocated instance: its prefill program and its one-stage decode pipeline, sharing one
    copy of the weights on its devices."""
    placed = place_params(model.params, devices)
    spans = stage_spans(model.arch.num_layers, 1)
    pipeline = Pipeline(model.arch, placed, spans, [list(devices)], spec.slots, spec.max_seq_len, 1, pool_shape(model, spec))
    return PrefillProgram(model.arch, placed, spec.max_seq_len, spec, spec.page_size), pipeline


def pool_shape(model: LoadedModel, spec: DecodeInstance | ColocatedInstance) -> PoolShape:
    """The KV pages of a decode or colocated instance (``kv_pages``, ``kv_memory_gb``, or the default)."""
    return PoolShape(instance_pages(spec, model.arch, model.dtype.itemsize, spec.page_size), spec.page_size)


def prefill_pool(
    model: LoadedModel, spec: PrefillInstance, program: PrefillProgram, cond: threading.Condition
) -> tuple[Pipeline, KVPool] | None:
    """A prefill instance's pool of pages, with its prefix cache, and the one-stage pipeline that
    computes a prompt's rest over its cached pages (sharing the program's weights); None where
    the instance keeps no prefix cache. Slots: the most prompts one prefill call takes."""
    if not spec.prefix_caching:
        return None
    devices = list(program.mesh.devices.flat)
    shape = PoolShape(instance_pages(spec, model.arch, model.dtype.itemsize, program.page_size), program.page_size)
    slots = max(batch for batch, _ in program.shapes())
    pipeline = Pipeline(model.arch, program.params, stage_spans(model.arch.num_layers, 1), [devices], slots, program.max_len, 1, shape)
    return pipeline, kv_pool(pipeline, cond, prefix_caching=True)


def kv_pool(pipeline: Pipeline, cond: threading.Condition, prefix_caching: bool = False) -> KVPool:
    """The slots and pages that hand out a pipeline's rows and KV, behind ``cond`` (the engine's)."""
    return KVPool(pipeline.slots, pipeline.pool.pages, pipeline.pool.page_size, pipeline.max_seq_len, cond, prefix_caching)


def prefill_warmup(program: PrefillProgram, hands_off: bool, pipeline: Pipeline | None = None) -> list[Job]:
    """Compiles of every prefill shape, and where its KV is handed off (``hands_off``: a prefill
    instance, not a colocated one) every take of a group of pages from it: from the instance's
    pool where it has one (``pipeline``, with its inserts and prompt chunks), else from the
    program's KV."""
    jobs = [functools.partial(program.compile, *shape) for shape in program.shapes()]
    if pipeline is not None:
        jobs += pipeline.compile(program.page_counts(), program.starts, REUSE_CHUNK, steps=False)
        cache = pipeline.stages[0].cache
        jobs += [functools.partial(compile_take_from_pool, cache, g, program.starts) for g in pipeline.insert_sizes()]
    elif hands_off:
        takes = {(spec, g) for n in program.page_counts() for spec in program.page_specs(n) for g in group_sizes() if g <= n}
        jobs += [functools.partial(compile_take, spec, g) for spec, g in takes]
    return jobs
