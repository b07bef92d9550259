"""jds: disaggregated prefill/decode LLM serving in JAX."""

from jds.engine.request import RequestOutput
from jds.llm import LLM
from jds.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
