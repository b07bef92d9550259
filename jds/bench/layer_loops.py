"""``python -m jds.bench layers``: the forms the layer loop can take, measured side by side.

A decode step is memory-bound, and how the loop over layers reaches each layer's weights decides
whether a step reads them once or copies each layer out of the stack first. On an H200 the scan
over stacked weights read 32 layers in 10.6 ms against 4.2 ms for a loop over per-layer arrays,
while a fully unrolled decode step compiled in about 30 s a shape. Each form here is timed on the
model's real shapes: the first call of a decode step (its compile, mostly) and its steady time
against the bandwidth floor, and a prompt's prefill against the matrix-product rate.

Every form runs in its own process: one of them is an XLA flag, which the backend reads when it
starts, and a process's peak device memory should be one form's.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

from jds.bench import micro
from jds.config import load_config
from jds.model import llama
from jds.model.loader import LoadedModel, load_model

# The plain scan with the backend's own decode attention, whatever the environment the study was
# started from says (None: unset)
PLAIN: dict[str, str | None] = {"JDS_LAYER_FORM": "stacked", "JDS_LAYER_UNROLL": "1", "JDS_DECODE_ATTENTION": None}
# form -> how it differs from the plain scan: environment set before the backend starts
FORMS: dict[str, dict] = {  # in the order a run short of time should measure them
    "scan": {},
    "per-layer": {"env": {"JDS_LAYER_FORM": "per-layer"}},
    # Decode attention by a Pallas kernel reading the pages where they lie in the pool (on a CPU,
    # through Pallas's interpreter: slow, for checking only)
    "attention-kernel": {"env": {"JDS_DECODE_ATTENTION": "kernel"}},
    # Decode attention read page by page where the pages landed, as on a CPU (the CPU's own choice)
    "attention-by-page": {"env": {"JDS_DECODE_ATTENTION": "by-page"}},
    # XLA's GPU backend hands a matrix product the slice's offset in the stacked buffer instead of a
    # copy of the slice (a no-op elsewhere)
    "scan-slice-fusion": {"env": {"XLA_FLAGS": "--xla_gpu_enable_dynamic_slice_fusion=true"}},
    "scan-unroll-4": {"env": {"JDS_LAYER_UNROLL": "4"}},
}


def prefill_timings(model: LoadedModel, tokens: int) -> tuple[float, float]:
    prefill = jax.jit(functools.partial(llama.prefill, arch=model.arch))
    ids = jnp.full((1, tokens), 100, jnp.int32)
    lengths = jnp.array([tokens], jnp.int32)
    return micro.first_and_steady(lambda: jax.block_until_ready(prefill(model.params, ids, lengths)))


def measure_form(config_path: str, form: str, spec: dict, batches: list[int], context: int, prompt: int) -> dict:
    """One form's figures (``spec``: its entry of ``FORMS``); run it in a fresh process
    (``micro.in_own_process``)."""
    from jax._src import xla_bridge

    started = xla_bridge.backends_are_initialized()
    for name, value in {**PLAIN, **spec.get("env", {})}.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = f"{os.environ.get(name, '')} {value}".strip() if name == "XLA_FLAGS" else value
    model = load_model(load_config(config_path), progress=False)
    bandwidth, flops = micro.memory_bandwidth(), micro.matmul_flops(model.dtype)
    kv_per_token = model.arch.kv_bytes_per_token(model.dtype.itemsize)
    floors = {b: (micro.decode_weight_bytes(model, b) + b * context * kv_per_token) / bandwidth for b in batches}
    decode = []
    for batch in batches:
        first, seconds = micro.decode_step_timings(model, batch, context)
        decode.append({"batch": batch, "first_call_seconds": first, "seconds": seconds, "over_floor": seconds / floors[batch]})
    first, seconds = prefill_timings(model, prompt)
    return {
        "form": form,
        "backend": jax.default_backend(),
        "set_before_the_backend_started": not started,
        "unroll": llama.layer_unroll(),
        "layer_form": micro.layer_form(model),
        "decode_attention": micro.decode_attention(),
        "prompt_attention": micro.prompt_attention(model),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "memory_bandwidth_gb_per_s": bandwidth / 1e9,
        "matmul_gflop_per_s": flops / 1e9,
        "decode": decode,
        "prefill": {"tokens": prompt, "first_call_seconds": first, "seconds": seconds,
                    "of_matmul_peak": micro.prefill_flops(model, prompt) / seconds / flops},  # fmt: skip
    }


def run(
    config_path: Path, forms: dict[str, dict], batches: list[int], context: int, prompt: int, done: Callable[[dict], None] = lambda _: None
) -> dict:
    """Every form, each in its own process, one after another; ``done`` gets the result so far
    after each. A form whose process fails (XLA ends a process at once over a flag its build does
    not know) is reported with its error, and the others still run."""
    result: dict = {"config": str(config_path), "context": context, "forms": []}
    for form, spec in forms.items():
        try:
            measured = micro.in_own_process(measure_form, str(config_path), form, spec, batches, context, prompt)[0]
        except Exception as exc:  # noqa: BLE001 - any failure of one form is that form's result
            measured = {"form": form, "error": f"{type(exc).__name__}: {exc}"}
        result["forms"].append(measured)
        done(result)
    return result


def markdown(result: dict) -> str:
    ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
    measured = [f for f in result["forms"] if "error" not in f]
    lines = [f"# Layer-loop forms ({measured[0]['backend'] if measured else 'none measured'}, {result['config']})", ""]
    if measured:
        bandwidths = ", ".join(f"{f['memory_bandwidth_gb_per_s']:.0f}" for f in measured)
        lines += [
            f"Decode steps over {result['context']} cache positions, against the floor of the bytes they read at each "
            f"process's measured bandwidth ({bandwidths} GB/s); "
            f"one prompt of {measured[0]['prefill']['tokens']} tokens against the matrix-product rate. The first call compiles.",
            "",
            "| form | batch | first call s | ms | / floor |",
            "|---|---:|---:|---:|---:|",
        ]
        for form in measured:
            lines += [f"| {form['form']} | {d['batch']} | {d['first_call_seconds']:.1f} | {ms(d['seconds'])} | {d['over_floor']:.2f} |" for d in form["decode"]]
        lines += ["", "| form | prompt attention | prefill first call s | prefill ms | of matmul peak |", "|---|---|---:|---:|---:|"]
        for form in measured:
            p = form["prefill"]
            lines.append(
                f"| {form['form']} | {form['prompt_attention']} | {p['first_call_seconds']:.1f} | {ms(p['seconds'])} | {p['of_matmul_peak']:.0%} |"
            )
    lines += [f"\nNot measured: {f['form']}: {f['error']}" for f in result["forms"] if "error" in f]
    return "\n".join(lines) + "\n"
