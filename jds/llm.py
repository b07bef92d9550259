"""The offline API: load a config, generate for a list of prompts, get ids, text and finish reasons."""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence

from jds.config import Config, load_config
from jds.engine.generator import Generator
from jds.engine.request import Request, RequestOutput, validate_prompt
from jds.model.loader import LoadedModel, load_model
from jds.model.tokenizer import Tokenizer
from jds.sampling_params import SamplingParams

Prompt = str | Sequence[int]
Messages = list[dict[str, str]]


class LLM:
    """``LLM("configs/smollm2-135m.yaml").generate(["Hello"], SamplingParams(max_tokens=32))``.

    Prompts are strings (encoded with the model's tokenizer) or lists of token ids. Requests run
    together with continuous batching over ``slots`` decode slots.
    """

    def __init__(self, config: str | os.PathLike | Config | None = None, *, slots: int = 8, progress: bool = True):
        self.config = config if isinstance(config, Config) else load_config(config)
        self.model: LoadedModel = load_model(self.config, progress)
        self.generator = Generator(self.model, slots)
        self._ids = itertools.count()

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
        return self._run([tuple(self.tokenizer.encode_chat(c)) for c in conversations], sampling_params)

    def _encode(self, prompt: Prompt) -> tuple[int, ...]:
        if isinstance(prompt, str):
            return tuple(self.tokenizer.encode(prompt))
        return tuple(prompt)

    def _run(
        self, prompt_ids: list[tuple[int, ...]], sampling_params: SamplingParams | Sequence[SamplingParams] | None
    ) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompt_ids)
        if len(sampling_params) != len(prompt_ids):
            raise ValueError(f"got {len(sampling_params)} SamplingParams for {len(prompt_ids)} prompts")
        requests = []
        for ids, params in zip(prompt_ids, sampling_params):
            validate_prompt(ids, self.model.arch.vocab_size, self.model.max_seq_len)
            requests.append(Request(str(next(self._ids)), ids, params, params.resolved_seed()))
        return self.generator.generate(requests)


def _is_token(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
