"""Latency models of the two phases and of the KV handoff, fitted by least squares.

The forms follow DistServe's section 4.1. Prefill is compute-bound: its time grows with the
tokens in the batch (the linear layers) and with the sum of squared prompt lengths (attention).
Decode is memory-bound: a step reads every weight once, plus each row's context, so its time
grows with the batch size and the total context read. A handoff is a fixed latency plus bytes
over a bandwidth. Each model is linear in its coefficients, so ordinary least squares fits it.

Shapes are the ones the engine really runs: prompts padded to their length bucket and the batch
to a power of two, decode steps over a row bucket of a microbatch at the context bucket. The
simulator asks for those same shapes, so padding costs appear in predictions as they do in
reality.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def least_squares(features: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """Coefficients minimising squared *relative* error, clipped at zero.

    Relative error, because measured times span three orders of magnitude and a short step
    matters as much to TPOT as a long prefill does to TTFT. A negative coefficient would predict
    faster runs for more work outside the measured range, so any that comes out negative is
    dropped and the rest refitted.
    """
    weights = 1.0 / np.maximum(seconds, 1e-9)
    keep = np.ones(features.shape[1], bool)
    while True:
        coef = np.zeros(features.shape[1])
        a = features[:, keep] * weights[:, None]
        coef[keep] = np.linalg.lstsq(a, seconds * weights, rcond=None)[0]
        if (coef >= 0).all():
            return coef
        keep &= coef > 0


class PrefillModel(_Model):
    """Seconds of one prefill call: ``base + per_token * tokens + per_square * sum(length^2)``.

    A chunk of ``c`` tokens attending to ``context`` cached positions contributes ``c`` tokens
    and ``c * context`` to the squared term: the attention area it computes.
    """

    base: float
    per_token: float
    per_square: float

    def seconds(self, tokens: float, square: float) -> float:
        return self.base + self.per_token * tokens + self.per_square * square

    def batch_seconds(self, batch: int, length: int) -> float:
        """A padded batch of ``batch`` rows of ``length`` tokens each."""
        return self.seconds(batch * length, batch * length * length)

    @classmethod
    def fit(cls, points: Sequence[tuple[int, int, float]]) -> PrefillModel:
        """From (batch, length, seconds) measurements of padded batches."""
        b, n, t = (np.asarray(c, float) for c in zip(*points))
        coef = least_squares(np.stack([np.ones_like(b), b * n, b * n * n], 1), t)
        return cls(base=coef[0], per_token=coef[1], per_square=coef[2])


class DecodeModel(_Model):
    """Seconds of one decode round: ``base + per_row * batch + per_context * batch * context``.

    ``batch`` is the rows a step computes (up to the highest slot in use, free ones among them too) and
    ``context`` the cache positions each reads. ``base`` is the weights' read time plus the fixed
    cost of a step (dispatch, sampling, the host loop).
    """

    base: float
    per_row: float
    per_context: float

    def seconds(self, batch: int, context: int) -> float:
        return self.base + self.per_row * batch + self.per_context * batch * context

    @classmethod
    def fit(cls, points: Sequence[tuple[int, int, float]]) -> DecodeModel:
        """From (batch, context, seconds) measurements."""
        b, c, t = (np.asarray(x, float) for x in zip(*points))
        coef = least_squares(np.stack([np.ones_like(b), b, b * c], 1), t)
        return cls(base=coef[0], per_row=coef[1], per_context=coef[2])


class TransferModel(_Model):
    """Seconds to move ``bytes`` of KV over one kind of link: ``latency + bytes / bandwidth``."""

    latency: float
    bandwidth: float  # bytes per second

    def seconds(self, nbytes: float) -> float:
        return self.latency + nbytes / self.bandwidth

    @classmethod
    def fit(cls, points: Sequence[tuple[int, float]]) -> TransferModel:
        """From (bytes, seconds) measurements."""
        n, t = (np.asarray(x, float) for x in zip(*points))
        coef = least_squares(np.stack([np.ones_like(n), n], 1), t)
        return cls(latency=coef[0], bandwidth=1.0 / max(coef[1], 1e-15))


def relative_errors(predict, points: Sequence[tuple]) -> list[float]:
    """|predicted - measured| / measured for each (inputs..., seconds) point: how well a fit holds."""
    return [abs(predict(*p[:-1]) - p[-1]) / p[-1] for p in points]
