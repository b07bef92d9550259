"""How a decode instance's layers are split into pipeline stages: contiguous ranges, the first
stage holding the token embedding, the last one the final norm and output projection. Plain
numbers, read by the fit check as much as by the programs that place each stage's weights."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class StageSpan:
    index: int
    start: int  # first layer
    stop: int  # one past the last layer
    first: bool
    last: bool

    @property
    def num_layers(self) -> int:
        return self.stop - self.start


def stage_spans(num_layers: int, pp: int, layers_per_stage: list[int] | None = None) -> list[StageSpan]:
    """Split ``num_layers`` into ``pp`` stages: as given, or as evenly as possible (earlier stages larger)."""
    if pp > num_layers:
        raise ValueError(f"pp {pp} is larger than the model's {num_layers} layers")
    if layers_per_stage is None:
        base, extra = divmod(num_layers, pp)
        layers_per_stage = [base + (i < extra) for i in range(pp)]
    elif sum(layers_per_stage) != num_layers:
        raise ValueError(f"layers_per_stage {layers_per_stage} sums to {sum(layers_per_stage)}, the model has {num_layers} layers")
    spans, start = [], 0
    for i, n in enumerate(layers_per_stage):
        spans.append(StageSpan(i, start, start + n, first=i == 0, last=i == pp - 1))
        start += n
    return spans
