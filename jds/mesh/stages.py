"""Each pipeline stage's own weights: a contiguous range of the layers (the split is
``jds.config.stages``), the embedding on the first stage, the final norm and output projection
(and the embedding again when the output is tied to it) on the last."""

from __future__ import annotations

import jax

from jds.config.stages import StageSpan
from jds.model.params import Params


def stage_params(params: Params, span: StageSpan) -> Params:
    """The parameters a stage needs; the others are None (absent from the pytree)."""
    tied = params.lm_head is None
    return Params(
        embed=params.embed if span.first or (span.last and tied) else None,
        layers=(
            params.layers[span.start : span.stop]
            if isinstance(params.layers, tuple)
            else jax.tree.map(lambda a: a[span.start : span.stop], params.layers)
        ),
        final_norm=params.final_norm if span.last else None,
        lm_head=params.lm_head if span.last else None,
    )
