"""``python -m jds.plan calibrate``: how much slower prefill and decode run in a real server.

A profile times the programs alone. The same programs in a server also pay for streaming each
token, the Python loop between steps and, on a small machine, the clients sharing the cores.
Calibration starts the config's server, sends two fixed loads through gRPC, and divides what
the client saw by what the profile predicts for the very same shapes:

- prefill: single prompts of a few lengths, one at a time, one output token each (TTFT);
- decode: every slot busy with equal requests, gaps between tokens once all have joined, at two
  prompt lengths so that rounds read two context buckets.

The medians become the profile's ``serving`` factors. The loads are fixed bursts, not a
workload's arrivals, so a later ``validate`` on a workload remains an independent check.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from jds.bench.workloads import PlannedRequest
from jds.engine.programs import length_buckets
from jds.planner.profile import Profile, Serving
from jds.planner.simulator import bucket

PROMPT_LENGTHS = (100, 200, 400)
PROMPT_GAP_SECONDS = 4.0
DECODE_PROMPTS, DECODE_TOKENS, SKIP_TOKENS = (120, 320), 64, 16


def _all_ok(records: list) -> list:
    """The records, if every request finished: a ratio over failed requests would mean nothing."""
    failed = [r.error or "no tokens" for r in records if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} calibration request(s) failed, the first with: {failed[0]}")
    return records


def calibrate(config_path: Path, profile: Profile, log_dir: Path) -> Serving:
    from jds.bench.loadgen import model_info, run_load
    from jds.bench.server_process import ServerProcess
    from jds.config import load_config

    placement = load_config(config_path).placement
    prefill_spec = placement.prefill[0] if placement.mode == "disaggregated" else placement.instances[0]
    decode_spec = placement.decode[0] if placement.mode == "disaggregated" else placement.instances[0]
    bare = profile.model_copy(update={"serving": Serving()})
    prefill = bare.prefill_latency(prefill_spec.tp)
    decode = bare.decode_latency(decode_spec.tp, getattr(decode_spec, "pp", 1))
    server = ServerProcess(config_path.resolve(), log_dir / f"calibrate-{config_path.stem}.log")
    try:
        info = model_info(server.address)
        buckets = length_buckets(info.max_seq_len)
        alone = [PlannedRequest(PROMPT_GAP_SECONDS * i, n, 1) for i, n in enumerate(PROMPT_LENGTHS * 2)]
        records = _all_ok(run_load(server.address, alone, info, desc="calibrating prefill"))
        prefill_ratio = statistics.median(r.ttft / prefill.batch_seconds(1, bucket(buckets, r.input_len)) for r in records)
        records = []
        for prompt in DECODE_PROMPTS:
            full = [PlannedRequest(0.0, prompt, DECODE_TOKENS) for _ in range(decode_spec.slots)]
            records += _all_ok(run_load(server.address, full, info, desc="calibrating decode"))
    finally:
        server.stop()
    ratios = []
    for r in records:
        for k in range(SKIP_TOKENS, len(r.token_times)):
            position = r.input_len + k - 1  # the cache position the round that made token k wrote
            ratios.append((r.token_times[k] - r.token_times[k - 1]) / decode.seconds(decode_spec.slots, bucket(buckets, position)))
    return Serving(prefill=prefill_ratio, decode=statistics.median(ratios), calibrated_with=str(config_path))
