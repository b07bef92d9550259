"""``python -m jds.plan calibrate``: how much slower prefill and decode run in a real server.

A profile times the programs alone. The same programs in a server also pay for streaming each
token, the Python loop between steps, moving KV and, on a small machine, the router and clients
sharing the cores. Calibration starts the config's server, sends fixed loads through gRPC, and
divides what the client saw by what the profile predicts for the very same shapes:

- prefill: prompts of a few lengths, one at a time (TTFT);
- decode: the slots busy with equal requests, gaps between tokens once all have joined, at two
  prompt lengths so that rounds read two context buckets.

How the phases are loaded depends on what the simulator already models. A colocated instance
interleaves prefill and decode on the same devices, and the simulator replays that interleaving,
so each phase is measured with the other idle. Disaggregated phases run at the same time on their
own devices, and the simulator treats them as independent; what one costs the other through the
shared host (caches and memory bandwidth, KV pulls, the router streaming tokens, clients) is only
seen when both run. So there, prompts keep prefill about ``PREFILL_BUSY`` of the time while decode
is measured (a typical share near the knee, where attainment is decided), each asking for two
tokens so that its KV moves and lands in the slot left free for it; their TTFT gives the prefill
factor.

The medians become the profile's ``serving`` factors. The loads are fixed bursts, not a
workload's arrivals, so a later ``validate`` on a workload remains an independent check.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from jds.bench.metrics import RequestRecord
from jds.bench.workloads import PlannedRequest
from jds.engine.programs import length_buckets
from jds.planner.profile import DecodeEntry, PrefillEntry, Profile, Serving
from jds.planner.simulator import bucket

PROMPT_LENGTHS = (100, 200, 400)
PROMPT_GAP_SECONDS = 4.0
DECODE_PROMPTS, DECODE_TOKENS, SKIP_TOKENS = (120, 320), 64, 16
PREFILL_BUSY = 0.6


def _all_ok(records: list[RequestRecord]) -> list[RequestRecord]:
    """The records, if every request finished: a ratio over failed requests would mean nothing."""
    failed = [r.error or "no tokens" for r in records if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} calibration request(s) failed, the first with: {failed[0]}")
    return records


def _prefill_ratios(records: list[RequestRecord], prefill: PrefillEntry, buckets: list[int]) -> list[float]:
    return [r.ttft / prefill.batch_seconds(1, bucket(buckets, r.input_len)) for r in records]


def _decode_ratios(records: list[RequestRecord], decode: DecodeEntry, slots: int, buckets: list[int], since: float) -> list[float]:
    """Gaps between tokens, from the ``SKIP_TOKENS``-th and from ``since`` on, over the profile's round."""
    ratios = []
    for r in records:
        for k in range(SKIP_TOKENS, len(r.token_times)):
            if r.token_times[k - 1] < since:
                continue
            position = r.input_len + k - 1  # the cache position the round that made token k wrote
            ratios.append((r.token_times[k] - r.token_times[k - 1]) / decode.seconds(slots, bucket(buckets, position)))
    return ratios


def _probes(start: float, end: float, lengths: list[int], prefill: PrefillEntry, buckets: list[int]) -> list[PlannedRequest]:
    """Two-token prompts from ``start`` to ``end``, each followed by a pause that keeps prefill ``PREFILL_BUSY``."""
    probes, t = [], start
    while t < end:
        n = lengths[len(probes) % len(lengths)]
        probes.append(PlannedRequest(t, n, 2))
        t += prefill.batch_seconds(1, bucket(buckets, n)) / PREFILL_BUSY
    return probes


def calibrate(config_path: Path, profile: Profile, log_dir: Path) -> Serving:
    from jds.bench.loadgen import model_info, run_load
    from jds.bench.server_process import ServerProcess
    from jds.config import load_config

    placement = load_config(config_path).placement
    disaggregated = placement.mode == "disaggregated"
    prefill_spec = placement.prefill[0] if disaggregated else placement.instances[0]
    decode_spec = placement.decode[0] if disaggregated else placement.instances[0]
    slots = decode_spec.slots
    bare = profile.model_copy(update={"serving": Serving()})
    prefill = bare.prefill_latency(prefill_spec.tp)
    decode = bare.decode_latency(decode_spec.tp, getattr(decode_spec, "pp", 1))
    server = ServerProcess(config_path.resolve(), log_dir / f"calibrate-{config_path.stem}.log")
    prefill_ratios: list[float] = []
    decode_ratios: list[float] = []
    try:
        info = model_info(server.address)
        buckets = length_buckets(info.max_seq_len)
        if not disaggregated:
            alone = [PlannedRequest(PROMPT_GAP_SECONDS * i, n, 1) for i, n in enumerate(PROMPT_LENGTHS * 2)]
            prefill_ratios = _prefill_ratios(_all_ok(run_load(server.address, alone, info, desc="calibrating prefill")), prefill, buckets)
        for prompt in DECODE_PROMPTS:
            held, tokens, probes, start = slots, DECODE_TOKENS, [], 0.0
            if disaggregated:
                # One slot is left to the prompts, which fit the burst's context bucket so that
                # rounds keep the shape predicted for them. They start well after the burst should be
                # prefilled (a prompt batched with the burst would time the burst), and the burst
                # decodes for DECODE_TOKENS rounds beside them, the rounds that count.
                held = slots - 1
                lengths = [n for n in PROMPT_LENGTHS if bucket(buckets, n + 1) <= bucket(buckets, prompt + SKIP_TOKENS)]
                round_seconds = decode.seconds(slots, bucket(buckets, prompt + SKIP_TOKENS))
                start = 2.5 * held * prefill.batch_seconds(1, bucket(buckets, prompt))
                tokens = math.ceil(start / round_seconds) + DECODE_TOKENS
                probes = _probes(start, start + DECODE_TOKENS * round_seconds, lengths, prefill, buckets)
            burst = [PlannedRequest(0.0, prompt, tokens) for _ in range(held)]
            records = _all_ok(run_load(server.address, burst + probes, info, desc="calibrating decode"))
            decode_ratios += _decode_ratios(records[:held], decode, slots, buckets, since=start)
            prefill_ratios += _prefill_ratios(records[held:], prefill, buckets)
    finally:
        server.stop()
    return Serving(prefill=statistics.median(prefill_ratios), decode=statistics.median(decode_ratios), calibrated_with=str(config_path))
