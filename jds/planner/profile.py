"""A profile: one device kind's measured (or hand-written) latencies for one model, as JSON.

The planner never touches hardware itself; it reads a profile. ``python -m jds.plan profile``
writes one from measurements on this machine, and a profile can equally be written by hand from
another machine's figures, so placements for hardware we do not have can be planned too. Each
entry keeps the points it was fitted from, so a fit can be checked against its data.

The parallel shapes a profile lists are the ones the planner may choose: a ``tp`` degree that
the model's heads do not divide, or a pipeline split the profiler did not run, simply has no
entry.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, PrivateAttr, ValidationError

from jds.planner.latency import DecodeModel, PrefillModel, TransferModel

LINKS = ("device", "process", "network")  # same process; processes of one node; different nodes


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelFacts(_Section):
    """What memory limits and transfer sizes need to know about the model."""

    name: str
    num_layers: PositiveInt
    weight_bytes: PositiveInt = Field(description="one whole copy of the weights")
    kv_bytes_per_token: PositiveInt = Field(description="K and V of one token over all layers")
    max_seq_len: PositiveInt


class _Measured(_Section):
    """An entry's latency: a shape it was measured at is predicted by its measurement, any other
    by the fitted model. The engine only runs bucketed shapes, which a profile measures on a grid,
    so a measured profile mostly predicts from its own data and the fit covers the rest (and
    hand-written profiles, which have only a model)."""

    _measured: dict[tuple[int, int], float] = PrivateAttr(default_factory=dict)

    def model_post_init(self, context: object) -> None:
        self._measured = {(a, b): t for a, b, t in self.points}


class PrefillEntry(_Measured):
    tp: PositiveInt
    model: PrefillModel
    points: list[tuple[int, int, float]] = Field(default_factory=list, description="(batch, padded length, seconds)")

    def scaled(self, factor: float) -> PrefillEntry:
        m = self.model
        model = PrefillModel(base=m.base * factor, per_token=m.per_token * factor, per_square=m.per_square * factor)
        return PrefillEntry(tp=self.tp, model=model, points=[(b, n, t * factor) for b, n, t in self.points])

    def batch_seconds(self, batch: int, length: int) -> float:
        """A padded batch of ``batch`` prompts of ``length`` tokens."""
        return self._measured.get((batch, length)) or self.model.batch_seconds(batch, length)

    def chunk_seconds(self, chunk: int, context: int) -> float:
        """One prompt chunk of ``chunk`` tokens over ``context`` cached positions (always from the model)."""
        return self.model.seconds(chunk, chunk * context)


class DecodeEntry(_Measured):
    tp: PositiveInt
    pp: PositiveInt
    model: DecodeModel = Field(description="one round: every microbatch of the instance advances one token")
    points: list[tuple[int, int, float]] = Field(default_factory=list, description="(slots, context, seconds)")

    def scaled(self, factor: float) -> DecodeEntry:
        m = self.model
        model = DecodeModel(base=m.base * factor, per_row=m.per_row * factor, per_context=m.per_context * factor)
        return DecodeEntry(tp=self.tp, pp=self.pp, model=model, points=[(b, c, t * factor) for b, c, t in self.points])

    def seconds(self, slots: int, context: int) -> float:
        """One round of ``slots`` slots reading ``context`` cache positions."""
        return self._measured.get((slots, context)) or self.model.seconds(slots, context)


class Serving(_Section):
    """How much slower the phases run inside a serving process than alone (``python -m jds.plan calibrate``).

    The profiler times programs alone. A server also streams every token, runs its Python loop
    between steps, and (on a small machine) shares its cores with its clients; calibration
    measures that on a real server of one config and keeps it as a factor per phase.
    """

    prefill: PositiveFloat = 1.0
    decode: PositiveFloat = 1.0
    calibrated_with: str | None = None


class Profile(_Section):
    source: str = Field(description="where the figures come from: the machine measured, or the references of a hand-written one")
    device: str = Field(description="what one device is, e.g. 'NVIDIA H100 SXM 80GB' or 'CPU, 1 core'")
    devices_per_node: PositiveInt
    device_memory_bytes: PositiveInt
    memory_fraction: PositiveFloat = Field(default=0.9, le=1.0, description="share of device memory weights and KV may use")
    model: ModelFacts
    prefill: list[PrefillEntry]
    decode: list[DecodeEntry]
    transfer: dict[str, TransferModel] = Field(description=f"KV handoff per link kind: {', '.join(LINKS)}")
    pulls_wait_for_prefill: bool = Field(
        default=False,
        description="a prefill process serves KV pulls from the cores that compute its prefills (a CPU device), so a pull "
        "asked for while a prefill runs is answered after it",
    )
    serving: Serving = Field(default_factory=Serving)

    @property
    def cpu(self) -> bool:
        """Whether the devices are CPU cores (the profiler names them so)."""
        return self.device.startswith("CPU")

    def prefill_latency(self, tp: int) -> PrefillEntry:
        for entry in self.prefill:
            if entry.tp == tp:
                return entry.scaled(self.serving.prefill) if self.serving.prefill != 1 else entry
        raise KeyError(f"the profile has no prefill entry for tp {tp} (it has {sorted(e.tp for e in self.prefill)})")

    def decode_latency(self, tp: int, pp: int) -> DecodeEntry:
        for entry in self.decode:
            if (entry.tp, entry.pp) == (tp, pp):
                return entry.scaled(self.serving.decode) if self.serving.decode != 1 else entry
        have = sorted((e.tp, e.pp) for e in self.decode)
        raise KeyError(f"the profile has no decode entry for tp {tp}, pp {pp} (it has (tp, pp) {have})")

    def link(self, kind: str) -> TransferModel:
        if kind not in self.transfer:
            raise KeyError(f"the profile has no transfer entry for link {kind!r} (it has {sorted(self.transfer)})")
        return self.transfer[kind]

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """The profile in the JSON file ``path``; a ValueError that names the file and says in one
        line what is wrong with it (pydantic's own report runs to a line per field)."""
        try:
            return cls.model_validate_json(Path(path).read_text())
        except OSError as exc:
            raise ValueError(f"{path}: cannot read it ({exc.strerror})") from None
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            more = f", and {exc.error_count() - 1} more" if exc.error_count() > 1 else ""
            raise ValueError(f"{path}: not a profile ({where + ': ' if where else ''}{first['msg']}{more})") from None
