"""Request lengths and arrival times: named synthetic workloads, Poisson or gamma arrivals, traces.

Everything is drawn from a seeded generator, so a workload, a rate and a seed always give the same
requests: placements are compared on identical traffic.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, PositiveFloat, PositiveInt, model_validator

WORKLOADS_FILE = Path(__file__).with_name("workloads.yaml")
REFERENCE_CONTEXT = 2048  # the lengths in workloads.yaml are for this context


class LengthDist(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["lognormal", "uniform"]
    median: PositiveFloat | None = None
    sigma: PositiveFloat | None = None
    min: PositiveInt
    max: PositiveInt

    @model_validator(mode="after")
    def _complete(self) -> LengthDist:
        if self.kind == "lognormal" and (self.median is None or self.sigma is None):
            raise ValueError("a lognormal length needs median and sigma")
        if self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self

    def sample(self, rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
        lo, hi = max(1, round(self.min * scale)), max(1, round(self.max * scale))
        if self.kind == "uniform":
            return rng.integers(lo, hi + 1, size=n)
        values = rng.lognormal(math.log(self.median * scale), self.sigma, size=n)
        return np.clip(np.rint(values), lo, hi).astype(np.int64)


class SLO(BaseModel):
    """Per-request targets in seconds; None means not required."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ttft: PositiveFloat | None = None
    tpot: PositiveFloat | None = None

    @classmethod
    def parse(cls, text: str) -> SLO:
        """From ``ttft=SECONDS,tpot=SECONDS`` (either part may be left out)."""
        values = {}
        for part in text.split(","):
            key, _, value = part.partition("=")
            try:
                if key not in ("ttft", "tpot") or not 0 < float(value) < math.inf:
                    raise ValueError
            except ValueError:
                raise ValueError(f"expected ttft=SECONDS,tpot=SECONDS with positive, finite seconds, got {part!r}") from None
            values[key] = float(value)
        return cls(**values)

    def scaled(self, factor: float) -> SLO:
        """Tighter (factor < 1) or looser SLOs, as in DistServe's SLO-scale plots."""
        return SLO(ttft=self.ttft and self.ttft * factor, tpot=self.tpot and self.tpot * factor)


class SharedPrefix(BaseModel):
    """Conversations behind one system prompt: every request starts with the same ``system``
    tokens, and turn k of a conversation repeats everything of its turns before (their messages
    and answers) before its own message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    system: PositiveInt
    turns: PositiveInt


class Workload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = ""
    description: str = ""
    input: LengthDist  # with a shared prefix: each turn's own new message
    output: LengthDist
    slo: SLO
    prefix: SharedPrefix | None = None


def load_workloads(path: Path = WORKLOADS_FILE) -> dict[str, Workload]:
    data = yaml.safe_load(path.read_text())
    return {name: Workload.model_validate({**spec, "name": name}) for name, spec in data.items()}


def get_workload(name: str) -> Workload:
    workloads = load_workloads()
    if name not in workloads:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(workloads)}")
    return workloads[name]


@dataclasses.dataclass(frozen=True)
class PlannedRequest:
    """One request of a run: when to send it (seconds from the start) and its exact lengths.

    With a shared prefix, the prompt is the workload's first ``system`` tokens, then the first
    ``input_len - system`` tokens of its conversation's token stream (earlier turns, then its own
    message; ``loadgen.prompt_ids``)."""

    arrival: float
    input_len: int
    output_len: int
    system: int = 0
    conversation: int | None = None


def arrival_times(rate: float, seed: int, num: int | None = None, duration: float | None = None, burstiness: float = 1.0) -> np.ndarray:
    """Arrival offsets for ``rate`` requests per second: gamma gaps with shape ``1 / burstiness``.

    Burstiness 1 is Poisson; larger values are burstier at the same mean rate (the gaps' squared
    coefficient of variation equals the burstiness).
    """
    if rate <= 0 or burstiness <= 0:
        raise ValueError("rate and burstiness must be positive")
    if (num is None) == (duration is None):
        raise ValueError("give exactly one of num and duration")
    rng = np.random.default_rng([seed, 1])
    shape = 1.0 / burstiness
    if num is not None:
        gaps = rng.gamma(shape, 1.0 / (rate * shape), size=num)
        return np.cumsum(gaps) - gaps[0]  # the first request at time 0
    times, t = [], 0.0
    while t < duration:
        times.append(t)
        t += rng.gamma(shape, 1.0 / (rate * shape))
    return np.array(times)


def plan(
    workload: Workload,
    rate: float,
    max_seq_len: int,
    seed: int = 0,
    num: int | None = None,
    duration: float | None = None,
    burstiness: float = 1.0,
) -> list[PlannedRequest]:
    """The requests of one run: arrivals at ``rate`` and lengths scaled to ``max_seq_len``.

    Lengths depend on the seed and request index only, not on the rate, so every rate of a sweep
    sends the same requests, just closer together.
    """
    times = arrival_times(rate, seed, num, duration, burstiness)
    rng = np.random.default_rng([seed, 2])
    scale = max_seq_len / REFERENCE_CONTEXT
    inputs = workload.input.sample(rng, len(times), scale)
    outputs = workload.output.sample(rng, len(times), scale)
    if workload.prefix is not None:
        return _conversations(workload.prefix, times, inputs, outputs, scale, max_seq_len)
    inputs = np.minimum(inputs, max_seq_len - 2)
    outputs = np.maximum(1, np.minimum(outputs, max_seq_len - 1 - inputs))
    return [PlannedRequest(float(t), int(i), int(o)) for t, i, o in zip(times, inputs, outputs)]


def _conversations(
    prefix: SharedPrefix, times: np.ndarray, messages: np.ndarray, outputs: np.ndarray, scale: float, max_seq_len: int
) -> list[PlannedRequest]:
    """Request i is turn ``i % turns`` of conversation ``i // turns``: the system prompt, the
    conversation so far (earlier messages and answers), its message. A conversation that would
    outgrow ``max_seq_len`` starts over after the system prompt."""
    system = min(max(1, round(prefix.system * scale)), max_seq_len // 2)
    out, history = [], 0
    for i, (t, message, answer) in enumerate(zip(times, messages, outputs)):
        if i % prefix.turns == 0:
            history = 0
        message = int(min(message, max_seq_len // 4))
        answer = int(max(1, min(answer, max_seq_len // 4)))
        if system + history + message + answer >= max_seq_len:
            history = 0
        out.append(PlannedRequest(float(t), system + history + message, answer, system, i // prefix.turns))
        history += message + answer
    return out


def load_trace(path: str | Path, max_seq_len: int | None = None) -> list[PlannedRequest]:
    """Requests from JSONL lines ``{"timestamp": ms, "input_length": n, "output_length": m}``."""
    requests = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            item = PlannedRequest(row["timestamp"] / 1000.0, int(row["input_length"]), int(row["output_length"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: expected timestamp, input_length, output_length ({exc})") from None
        if item.input_len < 1 or item.output_len < 1:
            raise ValueError(f"{path}:{number}: lengths must be >= 1")
        if max_seq_len is not None and item.input_len + item.output_len > max_seq_len:
            raise ValueError(f"{path}:{number}: {item.input_len} + {item.output_len} tokens exceed max_seq_len {max_seq_len}")
        requests.append(item)
    if not requests:
        raise ValueError(f"{path}: no requests")
    start = min(r.arrival for r in requests)
    return sorted((dataclasses.replace(r, arrival=r.arrival - start) for r in requests), key=lambda r: r.arrival)
