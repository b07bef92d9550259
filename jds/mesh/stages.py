"""Pipeline stages: contiguous slices of the stacked layers, each on its own devices.

The first stage also holds the token embedding, the last one the final norm and output
projection (and the embedding again when the output is tied to it).
"""

from __future__ import annotations

import dataclasses

import jax

from jds.model.params import Params


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


def stage_params(params: Params, span: StageSpan) -> Params:
    """The parameters a stage needs; the others are None (absent from the pytree)."""
    tied = params.lm_head is None
    return Params(
        embed=params.embed if span.first or (span.last and tied) else None,
        layers=jax.tree.map(lambda a: a[span.start : span.stop], params.layers),
        final_norm=params.final_norm if span.last else None,
        lm_head=params.lm_head if span.last else None,
    )
