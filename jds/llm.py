"""The offline API: load a config, generate for a list of prompts, get ids, text and finish reasons."""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jds.config import Config, ConfigError, load_config
from jds.config.fit import claim_device_memory
from jds.config.placement import Placement
from jds.engine.engine import Engine
from jds.engine.request import CompletionOutput, Request, RequestOutput
from jds.intake import InvalidRequest, check_token_ids, encode_chat, encode_text
from jds.model.loader import LoadedModel, check_config, load_model
from jds.model.tokenizer import Tokenizer
from jds.sampling_params import SamplingParams

Prompt = str | Sequence[int]
Messages = list[dict[str, str]]


class LLM:
    """``LLM("configs/smollm2-135m.yaml").generate(["Hello"], SamplingParams(max_tokens=32))``.

    Prompts are strings (encoded with the model's tokenizer) or lists of token ids. Requests run
    on the config's placement (or ``placement``, a mapping like the config's section), with
    continuous batching. ``close()`` (or a ``with`` block) stops the engine's threads.
    """

    def __init__(
        self,
        config: str | os.PathLike | Config | None = None,
        *,
        placement: Placement | dict[str, Any] | None = None,
        warmup: bool = False,
        progress: bool = True,
    ):
        claim_device_memory()
        self.config = config if isinstance(config, Config) else load_config(config)
        if placement is not None and not isinstance(placement, Placement):
            try:
                placement = Placement.model_validate(placement)
            except ValueError as exc:
                raise ConfigError(f"invalid placement: {exc}") from None
        placement = placement or self.config.placement
        check_config(self.config, placement)
        self.engine = Engine(load_model(self.config, progress), placement, warmup=warmup, progress=progress)
        self.model: LoadedModel = self.engine.model  # without weights: the engine's instances hold them
        self._ids = itertools.count()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.engine.shutdown()

    @property
    def tokenizer(self) -> Tokenizer:
        if self.model.tokenizer is None:
            raise ValueError(f"model {self.model.name} has no tokenizer (model.tokenizer is null); pass token ids")
        return self.model.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One output per prompt, in order. One SamplingParams for all, or one per prompt. A bad
        prompt of several is named by its place (``prompts[3]: ...``); none runs until all pass."""
        batch = _prompt_list(prompts)
        fields = _fields("prompt", "prompts", len(batch))
        return self._run([self._encode(p, f) for p, f in zip(batch, fields)], sampling_params, fields)

    def chat(
        self,
        messages: Messages | Sequence[Messages],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], Mapping) else list(messages)
        fields = _fields("messages", "messages", len(conversations))
        return self._run([encode_chat(self.engine, c, f) for c, f in zip(conversations, fields)], sampling_params, fields)

    def _encode(self, prompt: Prompt, field: str) -> tuple[int, ...]:
        """The same checks as the servers' (``jds.intake``); a too-long prompt is refused by the engine."""
        if isinstance(prompt, str):
            return encode_text(self.engine, prompt, field)
        if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, Sequence | np.ndarray):
            raise InvalidRequest(field, f"must be a string or a list of token ids; got {type(prompt).__name__}")
        return check_token_ids(self.engine, tuple(prompt), field)

    def _run(
        self, prompt_ids: list[tuple[int, ...]], sampling_params: SamplingParams | Sequence[SamplingParams] | None, fields: list[str]
    ) -> list[RequestOutput]:
        """Each prompt's ``n`` samples run as requests of their own, gathered into one output."""
        params = _params_list(sampling_params, len(prompt_ids))
        samples = [[self._request(ids, p, j) for j in range(p.n)] for ids, p in zip(prompt_ids, params)]
        for requests, field in zip(samples, fields):
            try:
                self.engine.validate(requests[0])  # refuse a bad request before any of them starts
            except ValueError as exc:
                if len(samples) == 1:
                    raise
                raise InvalidRequest(field, str(exc)) from None
        streams = [[self.engine.submit(r) for r in requests] for requests in samples]
        return [_gathered([s.result() for s in group]) for group in streams]

    def _request(self, ids: tuple[int, ...], params: SamplingParams, sample: int) -> Request:
        """Sample ``sample`` of a prompt: with a seed, drawn with ``seed + sample`` (as the OpenAI API's choices)."""
        return Request(f"offline-{next(self._ids)}", ids, dataclasses.replace(params, n=1), params.resolved_seed(sample))


def _gathered(results: list[RequestOutput]) -> RequestOutput:
    """A prompt's samples as one output: the first's fields, every sample in ``outputs``."""
    first = results[0]
    if len(results) == 1:
        return first
    outputs = [CompletionOutput(j, r.text, r.token_ids, r.finish_reason, r.logprobs, r.error) for j, r in enumerate(results)]
    return dataclasses.replace(first, outputs=outputs)


def _prompt_list(prompts: object) -> list:
    """The prompts of a call: one prompt (a string, or token ids) or a list of them."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, np.ndarray):
        if prompts.ndim not in (1, 2):
            raise InvalidRequest("prompts", f"an array of token ids has 1 dimension (a prompt) or 2 (prompts); got {prompts.ndim}")
        return [prompts] if prompts.ndim == 1 else list(prompts)
    if isinstance(prompts, (bytes, bytearray)) or not isinstance(prompts, Sequence):
        raise InvalidRequest("prompts", f"must be a string, a list of token ids, or a list of those; got {type(prompts).__name__}")
    return [prompts] if prompts and _is_token(prompts[0]) else list(prompts)


def _fields(one: str, many: str, n: int) -> list[str]:
    """How errors name each of ``n`` inputs: by the field's name alone, or by their place among several."""
    return [one] if n == 1 else [f"{many}[{i}]" for i in range(n)]


def _params_list(sampling_params: object, n: int) -> list[SamplingParams]:
    """One ``SamplingParams`` per prompt: the default, one shared, or the list given."""
    if sampling_params is None:
        return [SamplingParams()] * n
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * n
    if not isinstance(sampling_params, Sequence) or isinstance(sampling_params, str):
        raise TypeError(f"sampling_params: must be a SamplingParams or a list of them, one per prompt; got {type(sampling_params).__name__}")
    for i, p in enumerate(sampling_params):
        if not isinstance(p, SamplingParams):
            raise TypeError(f"sampling_params[{i}]: must be a SamplingParams; got {type(p).__name__}")
    if len(sampling_params) != n:
        raise ValueError(f"sampling_params: got {len(sampling_params)} SamplingParams for {n} prompts")
    return list(sampling_params)


def _is_token(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)
