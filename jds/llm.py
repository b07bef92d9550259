"""The offline API: load a config, generate for a list of prompts, get ids, text and finish reasons."""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Any

from jds.config import Config, ConfigError, load_config
from jds.config.fit import claim_device_memory
from jds.config.placement import Placement
from jds.engine.engine import Engine
from jds.engine.request import Request, RequestOutput
from jds.intake import check_token_ids, encode_chat, encode_text
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
        """One output per prompt, in order. One SamplingParams for all, or one per prompt."""
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and _is_token(prompts[0])):
            prompts = [prompts]
        return self._run([self._encode(p) for p in prompts], sampling_params)

    def chat(
        self,
        messages: Messages | Sequence[Messages],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        return self._run([encode_chat(self.engine, c) for c in conversations], sampling_params)

    def _encode(self, prompt: Prompt) -> tuple[int, ...]:
        """The same checks as the servers' (``jds.intake``); a too-long prompt is refused by the engine."""
        if isinstance(prompt, str):
            return encode_text(self.engine, prompt, "prompt")
        return check_token_ids(self.engine, tuple(prompt), "prompt")

    def _run(
        self, prompt_ids: list[tuple[int, ...]], sampling_params: SamplingParams | Sequence[SamplingParams] | None
    ) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompt_ids)
        if len(sampling_params) != len(prompt_ids):
            raise ValueError(f"got {len(sampling_params)} SamplingParams for {len(prompt_ids)} prompts")
        requests = [
            Request(f"offline-{next(self._ids)}", ids, params, params.resolved_seed())
            for ids, params in zip(prompt_ids, sampling_params)
        ]
        for r in requests:
            self.engine.validate(r)  # refuse a bad request before any of them starts
        streams = [self.engine.submit(r) for r in requests]
        return [s.result() for s in streams]


def _is_token(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
