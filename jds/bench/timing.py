"""Timing one blocking call: warm-up runs, then the median of several, so one slow spell of a
shared host moves the figure less. Used by the micro-benchmark and the planner's profiler."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timed(fn: Callable[[], object], repeats: int = 5, warmup: int = 2) -> float:
    """Median wall seconds of ``fn`` (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)
