"""``python -m jds.plan profile``: measure one device kind's latencies and fit the planner's models.

Each measurement runs in its own process that sees exactly the devices it measures. On a CPU
machine a "device" is ``cores_per_device`` cores: the process is pinned to ``devices x cores``
cores and XLA is given that many virtual devices, so "tp 2 on two one-core devices" and "tp 1 on
one two-core device" are measured as what they are rather than as threads of one process that
competes with itself. The programs timed are the engine's own (``PrefillProgram.call``,
``Pipeline.forward``), at the padded shapes the engine runs, host round trip included.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from jds.planner.latency import DecodeModel, PrefillModel, TransferModel
from jds.planner.profile import DecodeEntry, ModelFacts, PrefillEntry, Profile
from jds.scheduling import policy

TRANSFER_MEGABYTES = (1, 4, 16, 64)
DECODE_REPEATS = 7  # a round is short and its median noisy; more samples cost little


@dataclasses.dataclass(frozen=True)
class Job:
    """One measuring process: a phase at one parallel shape."""

    phase: str  # prefill, decode or transfer
    tp: int = 1
    pp: int = 1

    @property
    def devices(self) -> int:
        return 2 if self.phase == "transfer" else self.tp * self.pp

    @property
    def label(self) -> str:
        return {"prefill": f"prefill tp{self.tp}", "decode": f"decode tp{self.tp} pp{self.pp}"}.get(self.phase, "transfer")


@dataclasses.dataclass(frozen=True)
class Grid:
    """What each job measures."""

    max_tokens: int  # largest padded prefill batch (batch x length) measured
    slots: tuple[int, ...]
    contexts: tuple[int, ...]
    repeats: int


def parallel_shapes(num_heads: int, num_kv_heads: int, num_layers: int, devices: int) -> tuple[list[int], list[tuple[int, int]]]:
    """The prefill tp degrees and decode (tp, pp) pairs that fit ``devices`` and divide the model."""
    tps = [t for t in (1, 2, 4, 8, 16) if t <= devices and num_heads % t == 0 and num_kv_heads % t == 0]
    pairs = [(t, p) for t in tps for p in (1, 2, 4, 8) if t * p <= devices and p <= num_layers]
    return tps, pairs


# -- inside a measuring process ---------------------------------------------------------------------


def _measure(config_path: str, job: Job, grid: Grid) -> dict:
    import jax

    from jds.bench.timing import timed
    from jds.config import load_config
    from jds.config.placement import DEFAULT_PAGE_SIZE, DecodeInstance, PrefillInstance
    from jds.engine import builders
    from jds.engine.programs import empty_rows
    from jds.model.loader import load_model

    model = load_model(load_config(config_path), progress=False)
    devices = jax.devices()[: job.devices]
    if job.phase == "prefill":
        spec = PrefillInstance(devices=list(range(job.devices)), tp=job.devices)
        program = builders.prefill_instance(model, spec, devices, model.max_seq_len, DEFAULT_PAGE_SIZE)
        shapes = [s for s in program.shapes() if s[0] * s[1] <= grid.max_tokens]
        points = []
        for batch, length in tqdm(shapes, desc=job.label, unit="shape"):
            inputs = program.inputs(batch, length)
            points.append((batch, length, timed(lambda: jax.block_until_ready(program.call(*inputs)), grid.repeats, 1)))
        return {"points": points}
    if job.phase == "decode":
        points = []
        contexts = [c for c in grid.contexts if c <= model.max_seq_len]
        for slots in tqdm(grid.slots, desc=job.label, unit="slot count"):
            spec = DecodeInstance(devices=list(range(job.devices)), tp=job.tp, pp=job.pp, slots=slots).resolved(model.max_seq_len)
            pipeline = builders.decode_instance(model, spec, devices)
            n = slots // pipeline.microbatches
            tokens, zeros, rows = np.zeros((n, 1), np.int32), np.zeros(n, np.int32), empty_rows(n)
            for context in contexts:
                positions = np.full(n, context - 1, np.int32)
                per_row = policy.pages_for(context, pipeline.pool.page_size)  # each row's own pages, in order
                tables = np.arange(n * per_row, dtype=np.int32).reshape(n, per_row)

                def round_trip() -> None:  # every microbatch dispatched, then every token read back
                    outs = [
                        pipeline.forward(tokens, positions, lo, zeros, rows, zeros, tables, tables[:, -1:]) for lo, _ in pipeline.microbatch_bounds
                    ]
                    for out in outs:
                        jax.device_get(out)  # as the engine reads a step

                points.append((slots, context, timed(round_trip, max(grid.repeats, DECODE_REPEATS), 1)))
            del pipeline
        return {"points": points}
    return {"device": _device_transfer(devices, grid.repeats), "process": _process_transfer(devices, grid.repeats)}


def _device_transfer(devices, repeats: int) -> list[tuple[int, float]]:
    import jax

    from jds.bench.timing import timed

    points = []
    for mb in TRANSFER_MEGABYTES:
        x = jax.device_put(np.ones(mb * 2**18, np.float32), devices[0])
        points.append((x.nbytes, timed(lambda: jax.device_put(x, devices[-1]).block_until_ready(), repeats, 1)))
    return points


def _process_transfer(devices, repeats: int) -> list[tuple[int, float]]:
    """An offer pulled through the transfer server over loopback: the path between processes."""
    import jax

    from jds.bench.timing import timed
    from jds.transfer.remote import KVTransfer

    kv = KVTransfer()
    points = []
    for mb in TRANSFER_MEGABYTES:
        x = jax.device_put(np.ones(mb * 2**18, np.float32), devices[0])
        points.append((x.nbytes, timed(lambda: kv.pull(kv.offer([x]), devices[-1], 60.0), repeats, 1)))
    return points


# -- the orchestrating process --------------------------------------------------------------------


def _run_job(config_path: str, job: Job, grid: Grid, cpus: list[int] | None) -> dict:
    env = dict(os.environ)
    if cpus is not None:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={job.devices}".strip()
        env["JAX_PLATFORMS"] = "cpu"
    spec = json.dumps({"config": config_path, "job": dataclasses.asdict(job), "grid": dataclasses.asdict(grid), "cpus": cpus})
    proc = subprocess.run([sys.executable, "-m", "jds.planner.profiler", spec], env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {job.label} failed (exit {proc.returncode}); its output is above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def profile(config_path: str, cores_per_device: int, grid: Grid, source: str) -> Profile:
    """Measure every shape this machine allows and fit the models (a progress bar per job)."""
    import jax

    from jds.config import load_config
    from jds.config.fit import HOST_MEMORY_FRACTION
    from jds.model.loader import load_model

    config = load_config(config_path)
    model = load_model(config, progress=False, weights=False)
    arch = model.arch
    itemsize = np.dtype(model.dtype).itemsize
    cpu = jax.default_backend() == "cpu"
    if cpu:
        cores = sorted(os.sched_getaffinity(0))
        devices = len(cores) // cores_per_device
        if devices < 1:
            raise ValueError(f"--cores-per-device {cores_per_device}: this process may use only {len(cores)} cores")
        memory = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * HOST_MEMORY_FRACTION) // devices
        device = f"CPU ({platform.processor() or platform.machine()}), {cores_per_device} core(s) per device"
    else:
        devices = jax.device_count()
        memory = jax.devices()[0].memory_stats().get("bytes_limit", 0)
        device = jax.devices()[0].device_kind
    tps, pairs = parallel_shapes(arch.num_heads, arch.num_kv_heads, arch.num_layers, devices)
    jobs = [Job("prefill", t) for t in tps] + [Job("decode", t, p) for t, p in pairs]
    if devices >= 2:
        jobs.append(Job("transfer"))
    results = {}
    for job in tqdm(jobs, desc="profiling", unit="job"):
        cpus = cores[: job.devices * cores_per_device] if cpu else None
        results[job] = _run_job(str(Path(config_path).resolve()), job, grid, cpus)
    prefill = [PrefillEntry(tp=j.tp, model=PrefillModel.fit(r["points"]), points=r["points"]) for j, r in results.items() if j.phase == "prefill"]
    decode = [DecodeEntry(tp=j.tp, pp=j.pp, model=DecodeModel.fit(r["points"]), points=r["points"]) for j, r in results.items() if j.phase == "decode"]
    transfer = {link: TransferModel.fit(points) for j, r in results.items() if j.phase == "transfer" for link, points in r.items()}
    facts = ModelFacts(
        name=model.name,
        num_layers=arch.num_layers,
        weight_bytes=arch.num_params() * itemsize,
        kv_bytes_per_token=arch.kv_bytes_per_token(itemsize),
        max_seq_len=model.max_seq_len,
    )
    return Profile(
        source=source,
        device=device,
        devices_per_node=devices,
        device_memory_bytes=max(memory, 1),
        model=facts,
        prefill=prefill,
        decode=decode,
        transfer=transfer,
        pulls_wait_for_prefill=cpu,
    )


def _worker_main(spec_text: str) -> None:
    spec = json.loads(spec_text)
    if spec["cpus"] is not None:
        os.sched_setaffinity(0, spec["cpus"])  # before XLA sizes its thread pool from the affinity
    grid = spec["grid"]
    grid = Grid(grid["max_tokens"], tuple(grid["slots"]), tuple(grid["contexts"]), grid["repeats"])
    result = _measure(spec["config"], Job(**spec["job"]), grid)
    print(json.dumps(result))


if __name__ == "__main__":
    _worker_main(sys.argv[1])
