"""Per-request latency records and what a run is judged by: percentiles, SLO attainment, goodput.

Definitions (as DistServe and vLLM's benchmark use them):
- TTFT: send to first token. TPOT: (end - first token) / (output tokens - 1), so TTFT is not part
  of it; undefined for one-token outputs, which then meet any TPOT SLO. Inter-token latencies: the
  gaps between consecutive tokens.
- SLO attainment: the fraction of requests meeting every SLO given; a failed request meets none.
- Goodput: the highest request rate whose attainment reaches the target (0.9 by default).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from jds.bench.workloads import SLO


@dataclasses.dataclass
class RequestRecord:
    """What the client saw of one request, in seconds from the start of the run."""

    input_len: int
    output_len: int  # requested
    sent: float
    token_times: list[float] = dataclasses.field(default_factory=list)  # arrival time of each output token
    end: float | None = None
    error: str | None = None
    server: dict[str, float] = dataclasses.field(default_factory=dict)  # queue, prefill, transfer, ... as reported

    @property
    def ok(self) -> bool:
        return self.error is None and self.end is not None and bool(self.token_times)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.sent if self.ok else None

    @property
    def tpot(self) -> float | None:
        if not self.ok or len(self.token_times) < 2:
            return None
        return (self.end - self.token_times[0]) / (len(self.token_times) - 1)

    @property
    def itl(self) -> list[float]:
        return list(np.diff(self.token_times)) if self.ok else []

    @property
    def e2e(self) -> float | None:
        return self.end - self.sent if self.ok else None

    def meets(self, slo: SLO) -> bool:
        if not self.ok:
            return False
        if slo.ttft is not None and self.ttft > slo.ttft:
            return False
        tpot = self.tpot
        return slo.tpot is None or tpot is None or tpot <= slo.tpot


def attainment(records: Sequence[RequestRecord], slo: SLO) -> float:
    return sum(r.meets(slo) for r in records) / len(records) if records else 0.0


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not len(values):
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99))}


def summarize(records: Sequence[RequestRecord], slo: SLO) -> dict:
    """Everything a run is reported by: latency percentiles, attainment, throughput."""
    ok = [r for r in records if r.ok]
    first_sent = min((r.sent for r in records), default=0.0)
    last_end = max((r.end for r in ok), default=first_sent)
    span = max(last_end - first_sent, 1e-9)
    summary = {
        "requests": len(records),
        "failed": len(records) - len(ok),
        "attainment": attainment(records, slo),
        "attainment_ttft": attainment(records, SLO(ttft=slo.ttft)) if slo.ttft else None,
        "attainment_tpot": attainment(records, SLO(tpot=slo.tpot)) if slo.tpot else None,
        "throughput_rps": len(ok) / span,
        "output_tokens_per_s": sum(len(r.token_times) for r in ok) / span,
        "ttft": percentiles([r.ttft for r in ok]),
        "tpot": percentiles([t for r in ok if (t := r.tpot) is not None]),
        "itl": percentiles([x for r in ok for x in r.itl]),
        "e2e": percentiles([r.e2e for r in ok]),
        "peak_decoding": peak_decoding(ok),
        "cached_prompt_share": sum(r.server.get("cached_tokens", 0) for r in ok) / max(1, sum(r.input_len for r in ok)),
    }
    for key in ("queue", "prefill", "transfer"):
        summary[f"server_{key}"] = percentiles([r.server[key] for r in ok if key in r.server])
    return summary


def peak_decoding(records: Sequence[RequestRecord]) -> int:
    """The most requests decoding at once (between their first token and their end), as the client
    saw them: how many requests the server ran together at its busiest."""
    events = sorted([(r.token_times[0], 1) for r in records] + [(r.end, -1) for r in records], key=lambda e: (e[0], e[1]))
    peak = running = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak


def goodput(attainments: dict[float, float], target: float = 0.9) -> float:
    """The highest measured rate whose attainment reaches ``target`` (0 if none does).

    Rates above the first one that misses are not trusted to pass: attainment falls with load, so
    a later pass is noise.
    """
    best = 0.0
    for rate in sorted(attainments):
        if attainments[rate] < target:
            break
        best = rate
    return best


def search_goodput(measure: Callable[[float], float], low: float, high: float, target: float = 0.9, steps: int = 6) -> tuple[float, dict[float, float]]:
    """Bisect for the highest rate meeting ``target``, assuming attainment falls as the rate grows.

    ``measure(rate)`` runs the workload at ``rate`` and returns the attainment. Returns the goodput
    and every measurement made.
    """
    seen: dict[float, float] = {}

    def at(rate: float) -> float:
        if rate not in seen:
            seen[rate] = measure(rate)
        return seen[rate]

    if at(low) < target:
        return 0.0, seen
    if at(high) >= target:
        return high, seen
    for _ in range(steps):
        middle = (low + high) / 2
        low, high = (middle, high) if at(middle) >= target else (low, middle)
    return low, seen
