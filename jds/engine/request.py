"""What a request is and what it becomes, independent of how the engine runs it."""

from __future__ import annotations

import dataclasses
from typing import Literal

from jds.sampling_params import SamplingParams

FinishReason = Literal["stop", "length"]


@dataclasses.dataclass(frozen=True)
class Request:
    """A validated prompt with its settings; ``seed`` is fixed at creation so retries reproduce."""

    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    seed: int


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """A finished request: the generated ids (a stop token included), their text, and why it ended."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: FinishReason


def validate_prompt(prompt_ids: tuple[int, ...], vocab_size: int, max_seq_len: int) -> None:
    """Refuse prompts the model cannot run, with the reason in the message."""
    if not prompt_ids:
        raise ValueError("prompt is empty")
    bad = [t for t in prompt_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token ids must be integers in [0, {vocab_size}); got {bad[:5]}")
    if len(prompt_ids) >= max_seq_len:
        raise ValueError(
            f"prompt has {len(prompt_ids)} tokens, but max_seq_len is {max_seq_len} (prompt plus at least one output token)"
        )
