"""DistServe's placement search over a profile: the goodput of every candidate, ranked.

Goodput is the highest rate at which the workload's SLO attainment still reaches the target,
found by simulating the same requests (fixed seed, as the benchmark sends them) at rising rates
and bisecting. Two searches, as in the paper's section 4:

- **High node affinity** (fast links everywhere, or one node): each phase's best parallel shape is
  chosen on its own (prefill by TTFT alone, decode by TPOT alone, goodput per device), then every
  split of the devices between the two is simulated whole: the prefill:decode ratio.
- **Low node affinity** (slow links between nodes): a node holds a whole unit of prefill and
  decode instances, so KV never leaves it; units are searched jointly within one node and
  replicated over the nodes.

Colocated placements (with and without chunked prefill) are searched beside them, so the answer
can be "do not disaggregate".
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence

from jds.bench.metrics import attainment, search_goodput, summarize
from jds.bench.workloads import SLO, PlannedRequest, Workload, plan
from jds.planner.candidates import CHUNK_CHOICES, Candidate, ColocatedShape, colocated_shapes, decode_shapes, prefill_shapes
from jds.planner.latency import PrefillModel, TransferModel
from jds.planner.profile import PrefillEntry, Profile
from jds.planner.simulator import simulate

BISECT_STEPS = 5
MAX_DOUBLINGS = 16
KEEP_PER_PHASE = 3  # per-phase shapes carried into the joint search of a node (low affinity)
RUNS_PER_SLOT = 4  # simulate at least this many requests per decode slot, so slots cannot absorb a whole run
MIN_RUN_SECONDS = 60.0  # and at least this long a run (and ten TTFT SLOs), so a queue cannot hide inside the SLO


@dataclasses.dataclass(frozen=True)
class Scored:
    """A candidate with its goodput and the simulated run at that rate."""

    candidate: Candidate
    goodput: float  # requests per second
    summary: dict | None  # ``summarize`` of the run at the goodput rate (None if no rate passes)
    note: str = ""

    @property
    def per_device(self) -> float:
        return self.goodput / self.candidate.devices


@dataclasses.dataclass
class Search:
    profile: Profile
    workload: Workload
    slo: SLO
    target: float = 0.9
    num_requests: int = 200
    seed: int = 0
    node_size: int | None = None
    log: Callable[[str], None] = print

    def __post_init__(self) -> None:
        self.max_seq_len = self.profile.model.max_seq_len
        self.node_size = self.node_size or self.profile.devices_per_node
        self._median_prompt = sorted(r.input_len for r in self.requests(1.0))[self.num_requests // 2]

    def requests(self, rate: float, num: int | None = None) -> list[PlannedRequest]:
        return plan(self.workload, rate, self.max_seq_len, self.seed, num or self.num_requests)

    def goodput(self, candidate: Candidate, *, slo: SLO | None = None, profile: Profile | None = None,
                first_token_only: bool = False, link: str = "device", note: str = "") -> Scored:  # fmt: skip
        """Bisect for the highest rate ``candidate`` serves within ``slo`` at the target attainment."""
        slo = slo or self.slo
        profile = profile or self.profile
        placement = candidate.placement(self.node_size)
        seconds = max(MIN_RUN_SECONDS, 10 * (slo.ttft or 0))
        runs: dict[float, list] = {}

        def measure(rate: float) -> float:
            if rate in runs:
                return attainment(runs[rate], slo)
            requests = self.requests(rate, max(self.num_requests, RUNS_PER_SLOT * candidate.slots, math.ceil(rate * seconds)))
            if first_token_only:
                requests = [dataclasses.replace(r, output_len=1) for r in requests]
            runs[rate] = simulate(placement, profile, requests, self.max_seq_len, link)
            return attainment(runs[rate], slo)

        rate = highest_rate(measure, self.target, start=self._start_rate(candidate))
        return Scored(candidate, rate, summarize(runs[rate], slo) if rate else None, note)

    def _start_rate(self, candidate: Candidate) -> float:
        """A first guess: the rate at which prefill alone would be busy half the time."""
        shape = candidate.prefill or candidate.colocated
        count = candidate.n_prefill or candidate.n_colocated
        return 0.5 * count / max(self.profile.prefill_latency(shape.tp).batch_seconds(1, self._median_prompt), 1e-6)

    # -- the searches -------------------------------------------------------------------------

    def phase_goodputs(self, devices: int) -> tuple[list[Scored], list[Scored]]:
        """Every prefill shape by TTFT alone (requests end at their first token); every decode
        shape under the whole SLO with prefill and transfer free, so that queueing for its slots
        (which prefill stalls on) shows in TTFT."""
        prefills, decodes = prefill_shapes(self.profile, devices), decode_shapes(self.profile, devices)
        if not prefills or not decodes:
            return [], []
        free_prefill = self.profile.model_copy(update={
            "prefill": [PrefillEntry(tp=e.tp, model=PrefillModel(base=0, per_token=0, per_square=0)) for e in self.profile.prefill],
            "transfer": {k: TransferModel(latency=0, bandwidth=1e30) for k in self.profile.transfer},
        })  # fmt: skip
        p_scores = [
            self.goodput(Candidate(prefill=p, decode=decodes[0], n_prefill=1, n_decode=1), slo=SLO(ttft=self.slo.ttft), first_token_only=True)
            for p in prefills
        ]
        d_scores = []
        for _, shapes in itertools.groupby(decodes, key=lambda d: (d.tp, d.pp)):
            best = 0.0
            for d in shapes:  # slot counts ascending: stop once more slots stop paying
                scored = self.goodput(Candidate(prefill=prefills[0], decode=d, n_prefill=1, n_decode=1), profile=free_prefill)
                d_scores.append(scored)
                if scored.goodput < best:
                    break
                best = scored.goodput
        p_scores.sort(key=lambda s: -s.goodput / s.candidate.prefill.devices)
        d_scores.sort(key=lambda s: -s.goodput / s.candidate.decode.devices)
        return p_scores, d_scores

    def high_affinity(self, devices: int, p_scores: Sequence[Scored], d_scores: Sequence[Scored]) -> list[Scored]:
        """The best prefill and decode shapes, at every prefill:decode split of ``devices``."""
        if not p_scores or not d_scores:
            return []
        p, d = p_scores[0].candidate.prefill, d_scores[0].candidate.decode
        link = "device" if devices <= self.node_size else "network"
        out = []
        for n_p in range(1, devices // p.devices + 1):
            n_d = (devices - n_p * p.devices) // d.devices
            if n_d >= 1:
                out.append(self.goodput(Candidate(prefill=p, decode=d, n_prefill=n_p, n_decode=n_d), link=link, note="high affinity"))
        return out

    def low_affinity(self, devices: int, p_scores: Sequence[Scored], d_scores: Sequence[Scored]) -> list[Scored]:
        """Units of prefill and decode instances inside one node, replicated over the nodes."""
        nodes = devices // self.node_size
        if nodes < 2:
            return []
        out = []
        for ps, ds in itertools.product(p_scores[:KEEP_PER_PHASE], d_scores[:KEEP_PER_PHASE]):
            p, d = ps.candidate.prefill, ds.candidate.decode
            for n_p in range(1, self.node_size // p.devices + 1):
                n_d = (self.node_size - n_p * p.devices) // d.devices
                if n_d < 1:
                    continue
                unit = self.goodput(Candidate(prefill=p, decode=d, n_prefill=n_p, n_decode=n_d))
                whole = Candidate(prefill=p, decode=d, n_prefill=n_p * nodes, n_decode=n_d * nodes)
                out.append(Scored(whole, unit.goodput * nodes, unit.summary, f"low affinity: {nodes} nodes of one unit each"))
        return out

    def colocated(self, devices: int) -> list[Scored]:
        """Each tp degree at every slot count, then chunked prefill at the best slot count."""
        out = []
        for tp, shapes in itertools.groupby(colocated_shapes(self.profile, devices), key=lambda c: c.tp):
            n = devices // tp
            plain = [self.goodput(Candidate(colocated=c, n_colocated=n), note="colocated") for c in shapes]
            best = max(plain, key=lambda s: s.goodput).candidate.colocated
            chunked = [ColocatedShape(tp, best.slots, chunk) for chunk in CHUNK_CHOICES]
            out += plain + [self.goodput(Candidate(colocated=c, n_colocated=n), note="colocated, chunked prefill") for c in chunked]
        return out

    def run(self, devices: int) -> list[Scored]:
        """Every candidate for ``devices`` devices, best goodput per device first."""
        self.log(f"per-phase goodput of every prefill and decode shape on up to {devices} devices")
        p_scores, d_scores = self.phase_goodputs(devices)
        for s in p_scores:
            self.log(f"  {s.candidate.prefill}: {s.goodput:.3g} req/s by TTFT alone")
        for s in d_scores:
            self.log(f"  {s.candidate.decode}: {s.goodput:.3g} req/s with prefill free")
        scored = self.high_affinity(devices, p_scores, d_scores) + self.low_affinity(devices, p_scores, d_scores) + self.colocated(devices)
        return sorted(scored, key=lambda s: (-s.per_device, s.candidate.devices))


def highest_rate(measure: Callable[[float], float], target: float, start: float) -> float:
    """The highest rate meeting ``target``: double (or halve) from ``start`` to bracket it, then bisect."""
    if measure(start) >= target:
        low = start
        for _ in range(MAX_DOUBLINGS):
            if measure(low * 2) < target:
                break
            low *= 2
        else:
            return low
        high = low * 2
    else:
        high = start
        for _ in range(MAX_DOUBLINGS):
            if measure(high / 2) >= target:
                break
            high /= 2
        else:
            return 0.0
        low = high / 2
    return search_goodput(measure, low, high, target, BISECT_STEPS)[0]
