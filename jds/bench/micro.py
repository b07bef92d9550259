"""``python -m jds.bench micro``: jds' programs against the machine's measured limits and peers.

All figures come from one run on one machine: the limits (memory bandwidth, matmul FLOP/s) are
sampled before and between the measurements, and each jds program is reported as a ratio to the
floor the limits' medians imply.
Decode is memory-bound, so its floor is (weight bytes + KV bytes read) / bandwidth; prefill is
compute-bound, so its ceiling is the FLOP/s of a matrix product in the model's dtype. The KV
handoff is reported as bytes, time and a fraction of the prefill time of the same prompt.
Installed peers run the same shapes, each in its own process so that every peak resident memory
reported is one model's: transformers on torch (the GGUF dequantised, or random weights when
there is no GGUF; on the GPU when torch sees one) and, given a GGUF, llama.cpp through
``llama-cpp-python`` (the file's own quantised blocks, the CPU speed reference users know).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import importlib.util
import logging
import multiprocessing
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jds.bench.server_process import ServerProcess
from jds.bench.timing import timed
from jds.config import Config
from jds.config.placement import DEFAULT_PAGE_SIZE, DEFAULT_SLOTS, Placement, PrefillBatching
from jds.config.stages import stage_spans
from jds.engine.programs import PrefillProgram, empty_rows, page_shardings, place_params
from jds.engine.request import Request
from jds.engine.sequence import Sequence
from jds.mesh.rules import make_mesh
from jds.model import flash, llama
from jds.model.architecture import Architecture
from jds.model.kv_cache import KVPages
from jds.model.loader import LoadedModel
from jds.model.params import MatrixWeight
from jds.model.sampling import sample
from jds.model.weights.gguf_file import open_gguf
from jds.sampling_params import SamplingParams
from jds.scheduling import policy
from jds.scheduling.policy import length_buckets
from jds.transfer.handoff import StageTarget, send_pages

log = logging.getLogger(__name__)


def on_accelerator() -> bool:
    """Whether the limits' samples must be larger: an H200 reads 512 MB in 0.15 ms and multiplies
    two 2,048-square matrices in 30 us, too short to time against the dispatch around them."""
    return jax.default_backend() != "cpu"


def memory_bandwidth(megabytes: int | None = None) -> float:
    """Bytes per second of reading one large float32 array (a reduction reads each byte once)."""
    megabytes = megabytes or (4096 if on_accelerator() else 512)
    x = jnp.ones(megabytes * 2**20 // 4, jnp.float32)
    total = jax.jit(jnp.sum)
    seconds = timed(lambda: total(x).block_until_ready())
    return x.nbytes / seconds


def matmul_flops(dtype: jnp.dtype, n: int | None = None) -> float:
    """FLOP/s of an n x n matrix product in ``dtype`` (the model's: bfloat16 on an accelerator)."""
    n = n or (8192 if on_accelerator() else 2048)
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    mm = jax.jit(jnp.matmul)
    return 2 * n**3 / timed(lambda: mm(a, b).block_until_ready())


def layer_form(model: LoadedModel) -> str:
    """How ``model`` holds its layers' weights (``llama.layers_apart``), for a result to record."""
    return "per-layer" if isinstance(model.params.layers, tuple) else "stacked"


def decode_attention() -> str:
    """How decode steps traced now read their rows' KV pages (``llama.decode_attention_form``),
    for a result to record."""
    return llama.decode_attention_form()


def prompt_attention(model: LoadedModel) -> str:
    """The kernel prompts and prompt chunks attend through (``flash.implementation``): cuDNN's
    fused one where the backend compiles it, else XLA's form; for a result to record."""
    arch = model.arch
    return flash.implementation("prompt", model.dtype, arch.num_heads, arch.num_kv_heads, arch.head_dim) or "xla"


def decode_weight_bytes(model: LoadedModel, batch: int = 1) -> int:
    """Weight bytes one decode step of ``batch`` rows reads: every weight once, a ``MatrixWeight``
    in the layout products of that many rows read, except an untied input embedding, of which it
    reads only the rows of the batch's tokens."""
    params = model.params

    def read(w) -> int:
        if not isinstance(w, MatrixWeight):
            return sum(a.nbytes for a in jax.tree.leaves(w))
        return w.matrix(batch)[0].nbytes + (0 if w.scale is None else w.scale.nbytes)

    head = params.embed if params.lm_head is None else params.lm_head
    layers = params.layers if isinstance(params.layers, tuple) else (params.layers,)
    weights = [getattr(layer, f.name) for layer in layers for f in dataclasses.fields(layer)] + [params.final_norm, head]
    return sum(read(w) for w in weights)


# One jitted step for every shape, so a shape measured again reuses its compiled program.
_decode_step = jax.jit(llama.decode_step, static_argnames="arch", donate_argnums=1)
DECODE_PASSES = 5


def paged_cache(model: LoadedModel, batch: int, context: int) -> tuple[KVPages, np.ndarray]:
    """A page pool holding ``batch`` rows of ``context`` positions, and their block tables: the
    pages of each row scattered over the pool, as a server's are after a while."""
    per_row = policy.pages_for(context, DEFAULT_PAGE_SIZE)
    tables = np.random.default_rng(0).permutation(batch * per_row).astype(np.int32).reshape(batch, per_row)
    return KVPages.zeros(model.arch, batch * per_row, DEFAULT_PAGE_SIZE, model.dtype), tables


def decode_step_seconds(model: LoadedModel, batch: int, context: int) -> float:
    """One jitted decode step of ``batch`` rows over a cache of ``context`` positions (in pages)."""
    return decode_step_timings(model, batch, context)[1]


def first_and_steady(run: Callable[[], None]) -> tuple[float, float]:
    """Seconds of the first call (its compile included, for a new shape) and the median of the calls after it."""
    begin = time.perf_counter()
    run()
    return time.perf_counter() - begin, timed(run)


def decode_step_timings(model: LoadedModel, batch: int, context: int) -> tuple[float, float]:
    """``first_and_steady`` of ``decode_step_seconds``' step."""
    step = functools.partial(_decode_step, arch=model.arch)
    cache, tables = paged_cache(model, batch, context)
    state = {"cache": cache}
    tokens = np.full(batch, 100, np.int32)
    positions = np.full(batch, context // 2, np.int32)

    def run() -> None:
        logits, state["cache"] = step(model.params, state["cache"], tokens, positions, tables)
        logits.block_until_ready()

    return first_and_steady(run)


# How a decode step samples, each timed against greedy at the same batch and cache
SAMPLERS = {
    "greedy": {},
    "temperature 1": {"temperature": 1.0},
    "top-p 0.9": {"temperature": 1.0, "top_p": 0.9},
    "top-k 50": {"temperature": 1.0, "top_k": 50},
}


def _sampled_step(params, cache, tokens, positions, tables, rows, steps, *, arch):
    logits, cache = llama.decode_step(params, cache, tokens, positions, tables, arch)
    return sample(logits, rows, steps), cache


_sampled = jax.jit(_sampled_step, static_argnames="arch", donate_argnums=1)


def sampled_steps_seconds(model: LoadedModel, batch: int, context: int, rounds: int) -> dict[str, float]:
    """Each sampler's decode step and its sampling at these shapes (median seconds): the samplers
    take turns call by call, in rotating order, on one cache, so a slow spell of a shared host
    falls on all of them alike instead of on whichever ran then."""
    step = functools.partial(_sampled, arch=model.arch)
    cache, tables = paged_cache(model, batch, context)
    state = {"cache": cache}
    tokens = np.full(batch, 100, np.int32)
    positions = np.full(batch, context // 2, np.int32)
    steps = np.ones(batch, np.int32)
    rows = {}
    for name, settings in SAMPLERS.items():
        rows[name] = empty_rows(batch)
        for field, value in settings.items():
            getattr(rows[name], field)[:] = value
        rows[name].seed[:] = np.arange(batch)

    def run(name: str) -> float:
        begin = time.perf_counter()
        sampled, state["cache"] = step(model.params, state["cache"], tokens, positions, tables, rows[name], steps)
        sampled.tokens.block_until_ready()
        return time.perf_counter() - begin

    names = list(SAMPLERS)
    for name in names * 2:  # compile, then warm
        run(name)
    seconds = collections.defaultdict(list)
    for i in range(rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            seconds[name].append(run(name))
    return {name: statistics.median(seconds[name]) for name in names}


def prefill_flops(model: LoadedModel, tokens: int) -> float:
    """FLOPs of one prompt as jds computes it: 2 per layer weight per token, the full T x T
    attention scores and values (the causal mask is applied, not skipped), one token's logits."""
    arch = model.arch
    d, f, hd = arch.hidden_size, arch.intermediate_size, arch.head_dim
    layer_weights = d * hd * (2 * arch.num_heads + 2 * arch.num_kv_heads) + 3 * d * f
    attention = 2 * 2 * tokens * tokens * arch.num_heads * hd
    return arch.num_layers * (2 * layer_weights * tokens + attention) + 2 * arch.vocab_size * d


def prefill_and_handoff(model: LoadedModel, tokens: int, devices: list[jax.Device]) -> tuple[float, float, int]:
    """(prefill seconds, handoff seconds, handoff bytes) for one prompt: prefill on devices[0], its
    KV handed to devices[1] (to devices[0] itself when there is only one)."""
    params = place_params(model.params, devices[:1])
    program = PrefillProgram(model.arch, params, tokens, PrefillBatching(max_batch=1, max_batch_tokens=tokens), DEFAULT_PAGE_SIZE)
    request = Request("micro", tuple(range(100, 100 + tokens)), SamplingParams(temperature=0), 0)
    seqs = [Sequence(request, None, (), tokens + 1)]
    kv = {}

    def prefill() -> None:
        kv["pieces"] = program.run(seqs)[1]  # run() returns host tokens, so it has waited

    prefill_seconds = timed(prefill)
    destination = devices[1] if len(devices) > 1 else devices[0]
    target = StageTarget(stage_spans(model.arch.num_layers, 1)[0], page_shardings(model.arch, make_mesh([destination])))
    rows = [(0, policy.pages_for(tokens, DEFAULT_PAGE_SIZE))]  # the pages its prompt fills
    handoffs = sorted((send_pages(kv["pieces"], rows, [target]) for _ in range(5)), key=lambda h: h.seconds)
    return prefill_seconds, handoffs[2].seconds, handoffs[2].bytes


COMPILED = re.compile(r"compiled (\d+) programs in")


def server_startup(config_path: Path) -> dict:
    """Seconds from starting ``python -m jds.server`` to SERVING, warm-up compile included: first
    with an empty compile cache (a first start on a machine), then again with the cache it filled
    (every later start); how many programs each start's warm-up prepared, how many the first
    wrote into the cache, and how many the restart had to add (none, when the cache covers it)."""
    seconds, programs, entries = [], [], []
    with tempfile.TemporaryDirectory() as folder:
        cache = Path(folder) / "compiled"
        for run in ("cold", "warm"):
            begin = time.monotonic()
            proc = ServerProcess(config_path, Path(folder) / f"{run}.log", "--compile-cache", str(cache))
            seconds.append(time.monotonic() - begin)
            if proc.stop() != 0:
                raise RuntimeError(f"the {run} server did not stop cleanly: {proc.text()[-2000:]}")
            programs.append(int(COMPILED.search(proc.text()).group(1)))
            entries.append({p.name for p in cache.iterdir()})
    return {
        "cold_seconds": seconds[0],
        "warm_seconds": seconds[1],
        "programs": programs[0],
        "warm_programs": programs[1],
        "cache_entries": len(entries[0]),
        "restart_new_entries": len(entries[1] - entries[0]),
    }


def attempt(fn: Callable[[], dict]) -> dict:
    """``fn()``, or a note of why it failed: a part of the benchmark that fails (a server that
    cannot start, an engine out of memory) leaves the other parts' figures standing."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - the failure is that part's result
        log.exception("a part of the micro-benchmark failed")
        return {"note": f"not measured: {type(exc).__name__}: {str(exc)[:300]}"}


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far.

    On Linux from ``VmHWM``, which starts afresh in a new program; ``ru_maxrss`` would carry the
    parent's peak over into a spawned child and report a small peer as large as its parent.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, the others KiB


def _with_peak_rss(fn: Callable, *args) -> tuple[object, int]:
    return fn(*args), peak_rss_bytes()


def in_own_process(fn: Callable, *args) -> tuple[object, int]:
    """``fn(*args)`` in a fresh (spawned) process, and that process's peak resident memory."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_with_peak_rss, fn, *args).result()


@dataclasses.dataclass(frozen=True)
class PeerModel:
    """What the peers load: the GGUF file jds serves, or without one (random weights) the same
    shapes, which transformers builds at random. ``dtype`` is the config's (``auto`` too): the
    parent resolves nothing, so that it touches no accelerator before the peers' processes run."""

    arch: Architecture
    dtype: str
    gguf: str | None = None


CPU_PEER_PARAMS = 2e9  # the largest random-weight model the transformers peer runs on a CPU


def transformers_peer(model: PeerModel, batches: list[int], prompts: list[int], steps: int = 16) -> dict:
    """Decode step and prefill seconds through transformers (torch, SDPA attention): on the GPU when
    torch sees one, in jds' dtype there, else on every core in float32; the note says which."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and model.gguf is None and model.arch.num_params() > CPU_PEER_PARAMS:
        return {"note": f"not measured: torch sees no GPU, and {model.arch.num_params() / 1e9:.1f}B parameters would take minutes on the CPU"}
    dtype = torch.float32 if device == "cpu" else getattr(torch, "bfloat16" if model.dtype == "auto" else model.dtype)
    with torch.device(device):
        if model.gguf is not None:
            path = Path(model.gguf)
            peer = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
            note = f"{dtype}, dequantised from the GGUF, on {device}"
        else:
            a = model.arch
            shapes = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
                                 num_hidden_layers=a.num_layers, num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads,
                                 head_dim=a.head_dim, rms_norm_eps=a.rms_norm_eps, tie_word_embeddings=a.tie_embeddings,
                                 max_position_embeddings=a.max_position_embeddings, attn_implementation="sdpa")  # fmt: skip
            peer = LlamaForCausalLM._from_config(shapes, dtype=dtype)
            note = f"random weights at the same shapes, {dtype}, on {device}"
    peer = peer.to(device).eval()

    def blocking(fn: Callable[[], object]) -> Callable[[], None]:
        return lambda: (fn(), torch.cuda.synchronize() if device == "cuda" else None)

    out: dict = {"note": note.replace("torch.", ""), "decode": {}, "prefill": {}}
    with torch.no_grad():
        for tokens in prompts:
            ids = torch.full((1, tokens), 100, device=device)
            out["prefill"][tokens] = timed(blocking(lambda: peer(ids, use_cache=True)), repeats=3, warmup=1)
        for batch in batches:
            first = peer(torch.full((batch, 16), 100, device=device), use_cache=True)
            state = {"past": first.past_key_values, "token": first.logits[:, -1:].argmax(-1)}

            def step() -> None:
                result = peer(state["token"], past_key_values=state["past"], use_cache=True)
                state["past"], state["token"] = result.past_key_values, result.logits[:, -1:].argmax(-1)

            out["decode"][batch] = timed(blocking(step), repeats=steps, warmup=2)
    return out


def llama_cpp_peer(model: PeerModel, batches: list[int], prompts: list[int], steps: int = 16) -> dict:
    """Batch-1 decode step and prefill seconds of the same GGUF through llama.cpp on every core.

    llama.cpp computes with the file's own quantised blocks, so it reads fewer weight bytes per
    step than float32 jds. Its Python API runs one sequence, so only batch 1 is measured.
    """
    from llama_cpp import Llama

    gguf = model.gguf
    threads = len(os.sched_getaffinity(0))
    longest = max(prompts)
    llm = Llama(model_path=gguf, n_ctx=max(longest, 16 + 2 * steps), n_batch=longest, n_ubatch=longest,
                n_threads=threads, n_threads_batch=threads, verbose=False)  # fmt: skip
    out: dict = {"note": f"the GGUF's own blocks ({gguf_tensor_types(gguf)})", "decode": {}, "prefill": {}}
    for tokens in prompts:
        ids = [100] * tokens

        def prefill() -> None:
            llm.reset()
            llm.eval(ids)

        out["prefill"][tokens] = timed(prefill, repeats=3, warmup=1)
    if 1 in batches:
        llm.reset()
        llm.eval([100] * 16)
        out["decode"][1] = timed(lambda: llm.eval([100]), repeats=steps, warmup=2)
    return out


def gguf_tensor_types(gguf: str) -> str:
    """How the file stores its tensors, e.g. ``Q4_1 x210, F32 x61``: what llama.cpp computes with."""
    counts = collections.Counter(t.tensor_type.name for t in open_gguf(gguf).tensors)
    return ", ".join(f"{name} x{n}" for name, n in counts.most_common())


# peer name -> (the module it needs, how it is measured, whether it needs the GGUF file)
PEERS: dict[str, tuple[str, Callable, bool]] = {
    "transformers": ("transformers", transformers_peer, False),
    "llama.cpp": ("llama_cpp", llama_cpp_peer, True),
}


def measure_peers(model: PeerModel, batches: list[int], prompts: list[int], wanted: bool) -> dict[str, dict]:
    """Each peer's times and peak resident memory, or why it was not measured. Run it before this
    process touches an accelerator: each peer's own process then has the device to itself."""
    peers = {}
    for name, (module, measure, needs_gguf) in PEERS.items():
        if not wanted:
            peers[name] = {"note": "not measured: --no-peer"}
        elif needs_gguf and model.gguf is None:
            peers[name] = {"note": "not measured: the checkpoint is not a GGUF file"}
        elif importlib.util.find_spec(module) is None:
            peers[name] = {"note": f"not measured: {module} is not installed"}
        else:
            try:
                times, rss = in_own_process(measure, model, batches, prompts)
                peers[name] = {**times, "peak_rss_bytes": rss} if "decode" in times else times  # else a note why not
            except Exception as exc:  # noqa: BLE001 - a peer that fails leaves a note, and jds is still measured
                log.exception("peer %s failed", name)
                peers[name] = {"note": f"not measured: {type(exc).__name__}: {str(exc)[:300]}"}
    return peers


# Slots of each decoding instance in the engine measurement, at most: this process already holds
# the model once, so the KV of every slot a config sizes for a server alone (52 x 4,096 positions
# of Llama-2-7B on an H200) would not fit beside it. A lone request's steps have the same shapes
# with fewer slots.
ENGINE_SLOTS = 8


def with_few_slots(placement: Placement) -> dict:
    """The placement as a mapping, each decoding instance with at most ``ENGINE_SLOTS`` slots and
    the KV pages those fill."""
    section = placement.model_dump(exclude_none=True)
    for instance in section.get("instances" if placement.mode == "colocated" else "decode", []):
        instance["slots"] = min(instance.get("slots", DEFAULT_SLOTS), ENGINE_SLOTS)
        instance.pop("kv_pages", None)
        instance.pop("kv_memory_gb", None)
    return section


def engine_decode(config: Config, model: LoadedModel, prompt: int = 64, tokens: int = 64) -> dict:
    """One request's decode through the engine, against the bare jitted step at the same shapes.

    The request holds slot 0 alone, so each decode round computes one row at the context bucket
    of its length: the bare figure is ``decode_step_seconds`` at batch 1, averaged over the
    buckets the request's rounds read; what the engine adds is its Python loop, sampling and
    streaming. A pipelined decode instance runs other programs, so it is not compared.
    """
    from jds.llm import LLM

    placement = config.placement
    spec = placement.instances[0] if placement.mode == "colocated" else placement.decode[0]
    if getattr(spec, "pp", 1) > 1:
        return {"note": "not measured: the decode instance is pipelined"}
    if max(placement.devices) >= len(jax.devices()):
        return {"note": f"not measured: the placement uses device {max(placement.devices)}, this run has {len(jax.devices())}"}
    params = SamplingParams(max_tokens=tokens + 1, temperature=0, ignore_eos=True)
    with LLM(config, placement=with_few_slots(placement), progress=False) as llm:
        llm.generate([[100] * prompt], params)  # compiles the context buckets this request reads
        out = llm.generate([[100] * prompt], params)[0]
        slots = llm.engine.slot_usage()[1]
    per_token = (out.timings.finished - out.timings.first_token) / (len(out.token_ids) - 1)
    buckets = length_buckets(model.max_seq_len)
    reads = collections.Counter(next(c for c in buckets if c >= p) for p in range(prompt, prompt + tokens))
    bare = sum(n * decode_step_seconds(model, 1, c) for c, n in reads.items()) / tokens
    return {"slots": slots, "prompt": prompt, "tokens": tokens, "seconds_per_token": per_token,
            "bare_seconds": bare, "over_bare": per_token / bare}  # fmt: skip


def run(
    model: LoadedModel,
    int8_model: LoadedModel | None,
    batches: list[int],
    contexts: list[int],
    prompts: list[int],
    peers: dict[str, dict],
    sampling: bool = True,
) -> dict:
    """Every measurement of the micro-benchmark, as one JSON-ready dict (``peers`` from ``measure_peers``).

    Decode is measured over the grid with the model's float weights and, unless ``int8_model`` is
    None, with the same weights loaded as int8 (``model.quantization: int8``), the form to hold
    against llama.cpp's 8-bit file; with ``sampling``, each sampler against greedy."""
    # The limits are sampled before and between the measurements they judge, and each is the
    # median of its samples: on a shared host one sample caught in a fast or slow spell moved
    # every ratio of a run by a third.
    bandwidths, flops_samples = [memory_bandwidth()], [matmul_flops(model.dtype)]
    models = {"float": model} if int8_model is None else {"float": model, "int8": int8_model}
    weights = {(kind, batch): decode_weight_bytes(m, batch) for kind, m in models.items() for batch in batches}
    kv_per_token = model.arch.kv_bytes_per_token(model.dtype.itemsize)

    def peer_times(phase: str, key: int) -> dict[str, float]:
        return {name: p[phase][key] for name, p in peers.items() if key in p.get(phase, {})}

    # The whole grid, DECODE_PASSES times over (every other pass in reverse, so no shape always
    # follows the same one), and each shape's median pass: on a shared host a shape caught in a
    # slow spell (a second or two) otherwise reads up to 3x slow in one run.
    grid = [(kind, batch, context) for kind in models for context in contexts for batch in batches]
    passes = collections.defaultdict(list)
    for n in range(DECODE_PASSES):
        for kind, batch, context in grid if n % 2 == 0 else reversed(grid):
            passes[kind, batch, context].append(decode_step_seconds(models[kind], batch, context))
        bandwidths.append(memory_bandwidth())
    bandwidth = statistics.median(bandwidths)
    # Sampling, at the middle cache length: the samplers of a batch interleaved call by call.
    context = contexts[len(contexts) // 2]
    samplers = []
    for batch in batches if sampling else []:
        seconds = sampled_steps_seconds(model, batch, context, rounds=5 * DECODE_PASSES)
        samplers += [
            {"batch": batch, "context": context, "sampler": name, "seconds": seconds[name], "over_greedy": seconds[name] / seconds["greedy"]}
            for name in SAMPLERS
        ]
    decode = []
    for kind, batch, context in grid:
        seconds = statistics.median(passes[kind, batch, context])
        read = weights[kind, batch] + batch * context * kv_per_token  # the step reads every cache position
        decode.append({"weights": kind, "batch": batch, "context": context, "seconds": seconds, "bytes": read,
                       "gb_per_s": read / seconds / 1e9, "floor_seconds": read / bandwidth,
                       "over_floor": seconds / (read / bandwidth), "peers": peer_times("decode", batch)})  # fmt: skip
    devices = jax.devices()[:2]
    measured = {}
    for tokens in prompts:
        measured[tokens] = prefill_and_handoff(model, tokens, devices)
        flops_samples.append(matmul_flops(model.dtype))
    flops = statistics.median(flops_samples)
    prefill = []
    for tokens, (seconds, handoff_seconds, handoff_bytes) in measured.items():
        work = prefill_flops(model, tokens)
        prefill.append({"tokens": tokens, "seconds": seconds, "flops": work, "flops_per_s": work / seconds,
                        "of_matmul_peak": work / seconds / flops, "handoff_seconds": handoff_seconds, "handoff_bytes": handoff_bytes,
                        "handoff_gb_per_s": handoff_bytes / handoff_seconds / 1e9, "handoff_of_prefill": handoff_seconds / seconds,
                        "handoff_of_prompt_kv": handoff_bytes / (tokens * model.arch.kv_bytes_per_token(model.dtype.itemsize)),
                        "peers": peer_times("prefill", tokens)})  # fmt: skip
    int8 = {} if int8_model is None else {
        "int8_weight_bytes": decode_weight_bytes(int8_model),
        "int8_held_bytes": sum(x.nbytes for x in jax.tree.leaves(int8_model.params)),
    }
    return {
        "model": model.name,
        "dtype": str(model.dtype),
        "layer_form": layer_form(model),
        "decode_attention": decode_attention(),
        "prompt_attention": prompt_attention(model),
        "weight_bytes": decode_weight_bytes(model),
        "held_bytes": sum(x.nbytes for x in jax.tree.leaves(model.params)),
        **int8,
        "devices": [str(d) for d in devices],
        "memory_bandwidth_gb_per_s": bandwidth / 1e9,
        "memory_bandwidth_samples_gb_per_s": [b / 1e9 for b in bandwidths],
        "matmul_gflop_per_s": flops / 1e9,
        "matmul_samples_gflop_per_s": [f / 1e9 for f in flops_samples],
        "decode": decode,
        **({"sampling": samplers} if sampling else {}),
        "prefill": prefill,
        "handoff": "in-process device_put from device 0 to device 1" if len(devices) > 1 else "same device",
        "peers": {name: p["note"] for name, p in peers.items()},
        # jds ran in this process and each peer in its own, so every figure is one model's
        "peak_rss_bytes": {"jds": peak_rss_bytes(), **{name: p["peak_rss_bytes"] for name, p in peers.items() if "peak_rss_bytes" in p}},
    }


def markdown(result: dict) -> str:
    ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
    names = [name for name, note in result["peers"].items() if not note.startswith("not measured")]
    heads = "".join(f" {n} ms | speed vs {n} |" for n in names)
    rules = "---:|---:|" * len(names)

    def as_int8(key: str) -> str:
        return f" ({result[key] / 1e6:.0f} MB as int8)" if key in result else ""

    def peers(row: dict) -> str:
        return "".join(f" {ms(row['peers'][n])} | {row['peers'][n] / row['seconds']:.2f}x |" if n in row["peers"] else " - | - |" for n in names)

    lines = [
        f"# Micro-benchmarks: {result['model']} ({result['dtype']}, {result['layer_form']} layer weights, "
        f"decode attention {result['decode_attention']}, prompt attention {result['prompt_attention']})",
        "",
        f"Machine limits measured in this run, each the median of samples taken before and between the measurements "
        f"it judges: memory bandwidth **{result['memory_bandwidth_gb_per_s']:.1f} GB/s** "
        f"({', '.join(f'{b:.1f}' for b in result['memory_bandwidth_samples_gb_per_s'])}), "
        f"{result['dtype']} matmul **{result['matmul_gflop_per_s']:.0f} GFLOP/s** "
        f"({', '.join(f'{f:.0f}' for f in result['matmul_samples_gflop_per_s'])}). Weights read per decode step: "
        f"{result['weight_bytes'] / 1e6:.0f} MB{as_int8('int8_weight_bytes')} at batch 1; "
        f"held in all, both orientations counted where both are kept: {result['held_bytes'] / 1e6:.0f} MB"
        f"{as_int8('int8_held_bytes')}.",
        "",
        "Peers at the same shapes: " + "; ".join(f"{n}: {note}" for n, note in result["peers"].items())
        + ". Speed vs a peer is its time over jds' (above 1: jds is faster).",
        "",
        "Peak resident host memory: " + ", ".join(f"{n} {b / 2**20:.0f} MiB" for n, b in result["peak_rss_bytes"].items()) + ".",
        "",
        "## Decode step (memory-bound: floor = bytes read / bandwidth)",
        "",
        f"| weights | batch | cache positions | jds ms | GB/s | floor ms | jds / floor |{heads}",
        f"|---|---:|---:|---:|---:|---:|---:|{rules}",
    ]
    for r in result["decode"]:
        weights = result["dtype"] if r["weights"] == "float" else r["weights"]
        lines.append(
            f"| {weights} | {r['batch']} | {r['context']} | {ms(r['seconds'])} | {r['gb_per_s']:.1f} | {ms(r['floor_seconds'])} | "
            f"{r['over_floor']:.2f} |{peers(r)}"
        )
    if "sampling" in result:
        lines += [
            "",
            "## Sampling: a decode step with its sampling, against the greedy one",
            "",
            "| batch | cache positions | sampler | ms | / greedy |",
            "|---:|---:|---|---:|---:|",
        ]
        lines += [f"| {r['batch']} | {r['context']} | {r['sampler']} | {ms(r['seconds'])} | {r['over_greedy']:.2f} |" for r in result["sampling"]]
    lines += [
        "",
        "## Prefill (compute-bound: ceiling = matmul FLOP/s) and KV handoff",
        "",
        f"| prompt tokens | jds ms | GFLOP/s | of matmul peak | handoff MB | of prompt's KV | handoff ms | handoff GB/s | handoff / prefill |{heads}",
        f"|---:|---:|---:|---:|---:|---:|---:|---:|---:|{rules}",
    ]
    for r in result["prefill"]:
        lines.append(
            f"| {r['tokens']} | {ms(r['seconds'])} | {r['flops_per_s'] / 1e9:.0f} | {r['of_matmul_peak']:.0%} | "
            f"{r['handoff_bytes'] / 1e6:.1f} | {r['handoff_of_prompt_kv']:.2f}x | {ms(r['handoff_seconds'])} | {r['handoff_gb_per_s']:.1f} | {r['handoff_of_prefill']:.1%} |{peers(r)}"
        )
    lines += ["", f"Handoff: {result['handoff']}. Peers decode from a 16-token prompt (a short, growing cache)."]
    if "note" in result.get("startup", {}):
        lines += ["", f"Start-up: {result['startup']['note']}."]
    elif "startup" in result:
        s = result["startup"]
        lines += [
            "",
            "## Start-up",
            "",
            f"`python -m jds.server` to SERVING, compiling all {s['programs']} program shapes ahead: "
            f"**{s['cold_seconds']:.1f} s** with an empty compile cache, **{s['warm_seconds']:.1f} s** when restarted with the cache it filled "
            f"({s['cache_entries']} entries written by the first start, {s['restart_new_entries']} more by the restart).",
        ]
    engine = result.get("engine", {})
    if "note" in engine:
        lines += ["", f"Engine decode against the bare step: {engine['note']}."]
    elif engine:
        lines += [
            "",
            "## Engine decode against the bare step",
            "",
            f"One request ({engine['prompt']}-token prompt, {engine['tokens']} tokens) through the engine, alone in one of its "
            f"{engine['slots']} slots, so its rounds compute one row: {ms(engine['seconds_per_token'])} ms per token (Python loop, sampling and streaming "
            f"included) against {ms(engine['bare_seconds'])} ms for the bare jitted step at the same shapes: "
            f"**{engine['over_bare']:.2f}x**.",
        ]
    return "\n".join(lines) + "\n"
