"""``python -m jds.plan calibrate``: how much slower prefill and decode run in a real server.

A profile times the programs alone. The same programs in a server also pay for streaming each
token, the Python loop between steps, moving KV and, on a small machine, the router and clients
sharing the cores; disaggregated phases on one host also slow each other through its caches and
memory bandwidth. None of that is in the profile, and how much of it there is depends on the load
and on the host of the day.

So calibration starts the config's server, sends it a workload at one rate for as long as a
validation run lasts, and simulates the very same requests. It then looks for the two factors,
one per phase, by which the profile's times must be stretched for the simulation to show the
mean TTFT and the mean TPOT the client saw (``fit``). Sustained load is the point: earlier
calibrations timed bursts of a few seconds, and servers kept busy for minutes ran slower than
those bursts said (at the knee, attainment came out 5 to 15 points optimistic).

The calibration run is one rate with its own seed; ``validate`` then checks the factors on other
rates and other requests.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

from jds.bench.metrics import RequestRecord
from jds.bench.workloads import PlannedRequest, Workload, plan
from jds.config.placement import Placement
from jds.planner.profile import Profile, Serving
from jds.planner.simulator import simulate

RATE, NUM_REQUESTS, SEED = 0.6, 48, 1
FACTOR_RANGE = (0.25, 4.0)
ROUNDS, HALVINGS = 4, 16


def _means(records: Sequence[RequestRecord]) -> tuple[float, float]:
    """Mean TTFT and mean TPOT of the requests that finished: means, not medians, because a median
    stands still while the factors move the requests around it, and the fit needs a slope."""
    ok = [r for r in records if r.ok]
    tpots = [t for r in ok if (t := r.tpot) is not None]
    if not ok or not tpots:
        raise RuntimeError("calibration needs finished requests with two tokens or more")
    return statistics.fmean(r.ttft for r in ok), statistics.fmean(tpots)


def _solve(seconds: Callable[[float], float], target: float) -> float:
    """The factor in ``FACTOR_RANGE`` at which ``seconds`` (nondecreasing in it) reaches ``target``,
    by halving the interval in log space; an end of the range when the target lies beyond it."""
    lo, hi = (math.log(f) for f in FACTOR_RANGE)
    if seconds(math.exp(hi)) <= target:
        return math.exp(hi)
    if seconds(math.exp(lo)) >= target:
        return math.exp(lo)
    for _ in range(HALVINGS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if seconds(math.exp(mid)) < target else (lo, mid)
    return math.exp((lo + hi) / 2)


def fit(
    placement: Placement, profile: Profile, requests: Sequence[PlannedRequest], measured: Sequence[RequestRecord], max_seq_len: int, link: str
) -> Serving:
    """The serving factors with which ``simulate`` reproduces ``measured``'s mean TTFT and TPOT.

    TTFT moves mostly with the prefill factor and TPOT with the decode one, but each also moves
    with the other (colocated rounds wait for prefills; prefill waits for slots), so the two are
    solved in turn until they settle.
    """
    ttft_target, tpot_target = _means(measured)

    def means(prefill: float, decode: float) -> tuple[float, float]:
        scaled = profile.model_copy(update={"serving": Serving(prefill=prefill, decode=decode)})
        return _means(simulate(placement, scaled, requests, max_seq_len, link))

    prefill = decode = 1.0
    for _ in range(ROUNDS):
        decode = _solve(lambda d: means(prefill, d)[1], tpot_target)
        prefill = _solve(lambda p: means(p, decode)[0], ttft_target)
    return Serving(prefill=prefill, decode=decode)


def calibrate(
    config_path: Path, profile: Profile, workload: Workload, log_dir: Path, rate: float = RATE, num_requests: int = NUM_REQUESTS, seed: int = SEED
) -> Serving:
    from jds.bench.loadgen import model_info, run_load
    from jds.bench.server_process import ServerProcess
    from jds.config import load_config
    from jds.planner.validate import link_of

    config = load_config(config_path)
    server = ServerProcess(config_path.resolve(), log_dir / f"calibrate-{config_path.stem}.log")
    try:
        info = model_info(server.address)
        requests = plan(workload, rate, info.max_seq_len, seed, num_requests)
        records = run_load(server.address, requests, info, seed, desc=f"calibrating at {rate:g} req/s")
    finally:
        server.stop()
    failed = [r.error or "no tokens" for r in records if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} calibration request(s) failed, the first with: {failed[0]}")
    bare = profile.model_copy(update={"serving": Serving()})
    serving = fit(config.placement, bare, requests, records, info.max_seq_len, link_of(config))
    return serving.model_copy(update={"calibrated_with": f"{config_path} at {rate:g} req/s of the {workload.name} workload, seed {seed}"})
