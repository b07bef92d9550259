"""What a request is and what it becomes, independent of how the engine runs it."""

from __future__ import annotations

import dataclasses
from typing import Literal

from jds.sampling_params import SamplingParams

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclasses.dataclass(frozen=True)
class Request:
    """A validated prompt with its settings; ``seed`` is fixed at creation so retries reproduce."""

    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    seed: int


@dataclasses.dataclass
class RequestTimings:
    """Wall-clock marks of one request (``time.perf_counter`` seconds), its KV handoff and route.

    TTFT is ``first_token - arrival``; TPOT is ``(finished - first_token) / (tokens - 1)``, as
    DistServe and vLLM define them (TTFT is not part of TPOT).
    """

    arrival: float
    prefill_start: float | None = None
    first_token: float | None = None
    transfer_seconds: float = 0.0  # prefill KV to the decode devices (0 when colocated)
    transfer_bytes: int = 0  # of the KV pages its prompt fills, moved from prefill to decode
    finished: float | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)  # one mark per generated token
    route: list[str] = dataclasses.field(default_factory=list)  # the instances that served it, in order
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache instead of being computed

    @property
    def queue(self) -> float | None:
        return None if self.prefill_start is None else self.prefill_start - self.arrival

    @property
    def prefill(self) -> float | None:
        return None if self.first_token is None or self.prefill_start is None else self.first_token - self.prefill_start

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        if self.finished is None or self.first_token is None or len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.first_token) / (len(self.token_times) - 1)


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model, and the likeliest tokens at its position."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token, log-probability), most likely first


PromptLogprobs = list[TokenLogprob | None]  # one per prompt token; the first has none


@dataclasses.dataclass(frozen=True)
class StreamOutput:
    """One message of a request's stream: the tokens and text since the previous message.

    The last message has ``finish_reason`` set (and ``error`` when it is ``"error"``).
    """

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None
    error: str | None = None
    timings: RequestTimings | None = None
    unavailable: bool = False  # the error is a serving process that went away: a retry may succeed
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when the request asked
    prompt_logprobs: PromptLogprobs | None = None  # on the first message, when the request asked

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass(frozen=True)
class CompletionOutput:
    """One sample of a prompt (vLLM's name): what ``RequestOutput.outputs`` lists, one per ``n``."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """A finished request: the generated ids (a stop token included), their text, and why it ended.

    ``outputs`` lists every sample of the prompt as vLLM's ``RequestOutput`` does (``jds.LLM``
    with ``SamplingParams(n=...)``); the fields above it are the first sample's."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    timings: RequestTimings | None = None
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: PromptLogprobs | None = None
    outputs: list[CompletionOutput] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.outputs:
            first = CompletionOutput(0, self.text, self.token_ids, self.finish_reason, self.logprobs, self.error)
            object.__setattr__(self, "outputs", [first])

    @property
    def finished(self) -> bool:
        return True


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
