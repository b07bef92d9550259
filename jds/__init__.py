"""jds: disaggregated prefill/decode LLM serving in JAX.

``from jds import LLM, SamplingParams`` is the offline API. The names are looked up on first
use, so that importing a JAX-free part of the package (the config schema, the scheduling policy,
the planner's simulator) does not import JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jds.engine.request import CompletionOutput, RequestOutput
    from jds.llm import LLM
    from jds.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
_HOMES = {
    "LLM": "jds.llm",
    "CompletionOutput": "jds.engine.request",
    "RequestOutput": "jds.engine.request",
    "SamplingParams": "jds.sampling_params",
}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'jds' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
