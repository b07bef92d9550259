"""Request bodies of the OpenAI-compatible API, as strict pydantic models.

Fields follow OpenAI's API reference. A field we do not know is refused (as OpenAI itself does:
"Unrecognized request argument"), and a known field we cannot honour is refused when set to
anything but its neutral value, rather than being silently ignored; both name the field. Beside
OpenAI's fields we accept the extensions of vLLM that clients and benchmarking tools send through
``extra_body`` (``top_k``, ``min_p``, ``min_tokens``, ``repetition_penalty``, ``ignore_eos``,
``stop_token_ids``, ``include_stop_str_in_output``, ``skip_special_tokens``,
``return_token_ids``, ``stream_options.continuous_usage_stats``; for chat
``add_generation_prompt``, ``continue_final_message`` and ``chat_template_kwargs``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from jds.intake import InvalidRequest


MAX_CHOICES = 64  # choices one request may ask for, over all its prompts (prompts x n)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage (so far) on every chunk


class _Generation(_Strict):
    """What completions and chat share."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    return_token_ids: bool = Field(default=False, description="add the prompt's and the output's token ids")

    def prompts(self) -> int:
        """How many prompts the request carries; each gets ``n`` choices."""
        return 1

    def unsupported(self) -> None:
        """Refuse, naming the field, what is set to a value this server cannot honour."""
        _refuse_if(self.n < 1, "n", f"must be at least 1; got {self.n}")
        _refuse_if(self.prompts() > MAX_CHOICES, "prompt", f"at most {MAX_CHOICES} prompts per request; got {self.prompts()}")
        _refuse_if(
            self.prompts() * self.n > MAX_CHOICES,
            "n",
            f"at most {MAX_CHOICES} choices per request (prompts x n); got {self.prompts()} x {self.n}",
        )
        _refuse_if(self.stream_options is not None and not self.stream, "stream_options", "is only allowed when stream is true")

    def sampling_options(self, max_tokens: int | None, choice: int = 0) -> dict[str, Any]:
        """``SamplingParams`` fields that were given; the rest keep their defaults. With a ``seed``,
        choice j of a prompt samples with ``seed + j``: its n choices differ, and each repeats."""
        seed = self.seed
        if seed is not None and choice and -(2**63) <= seed < 2**63:  # a seed out of range is refused as given
            seed = (seed + choice) % 2**32  # what the request's own seed folds to, plus the choice
        options: dict[str, Any] = {
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": seed,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "min_p": self.min_p,
            "min_tokens": self.min_tokens,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
        }
        if self.logit_bias:
            options["logit_bias"] = {_token_id(key): bias for key, bias in self.logit_bias.items()}
        options = {k: v for k, v in options.items() if v is not None}
        options.update(
            ignore_eos=self.ignore_eos, include_stop_str_in_output=self.include_stop_str_in_output, skip_special_tokens=self.skip_special_tokens
        )
        return {**options, **self.logprob_options()}

    def logprob_options(self) -> dict[str, Any]:
        """``SamplingParams``' ``logprobs`` and ``prompt_logprobs``, from this API's fields."""
        return {}

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous_usage_stats


class CompletionRequest(_Generation):
    """``POST /v1/completions``: a prompt as text or token ids, or a batch of them."""

    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> None:
        super().unsupported()
        _refuse_if(self.best_of not in (None, 1), "best_of", "is not supported")
        _refuse_if(self.suffix is not None, "suffix", "is not supported")

    def logprob_options(self) -> dict[str, Any]:
        """``logprobs: N``: each token's and the N likeliest; with ``echo``, the prompt's too."""
        if self.logprobs is None:
            return {}
        return {"logprobs": self.logprobs, **({"prompt_logprobs": self.logprobs} if self.echo else {})}

    def prompt_list(self) -> list[str | list[int]]:
        """The prompts: one, or a batch (a list of texts or of token id lists)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            return list(prompt)
        return [prompt]

    def prompts(self) -> int:
        return len(self.prompt_list())


class ContentPart(BaseModel):
    """One part of a message's content. Any type parses, so that ``intake`` refuses an image or
    audio part as unsupported rather than pydantic as a malformed text part."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    # What OpenAI's own assistant messages carry, so a history saved from its replies is taken as
    # it is (``intake.encode_chat`` decides what each may hold); a refusal's text is not part of
    # the conversation.
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    function_call: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None


class ResponseFormat(BaseModel):
    """Its other fields (a JSON schema) are not read: any type but text is refused whole."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str


class ChatTemplated(_Strict):
    """A request rendered by the chat template (a chat completion, or ``/tokenize`` of messages)."""

    messages: list[ChatMessage] | None = None
    # vLLM's extensions
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    def template_flags(self) -> None:
        """Take the template's two flags from ``chat_template_kwargs`` where given there (they
        override the fields, as in vLLM)."""
        for flag in ("add_generation_prompt", "continue_final_message"):
            if flag in (self.chat_template_kwargs or {}):
                value = self.chat_template_kwargs.pop(flag)
                _refuse_if(not isinstance(value, bool), f"chat_template_kwargs.{flag}", f"must be a boolean; got {value!r}")
                setattr(self, flag, value)


class ChatCompletionRequest(_Generation, ChatTemplated):
    """``POST /v1/chat/completions``: a conversation rendered by the model's chat template."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None

    def unsupported(self) -> None:
        super().unsupported()
        self.template_flags()
        _refuse_if(self.top_logprobs is not None and not self.logprobs, "top_logprobs", "needs logprobs: true")
        _refuse_if(bool(self.tools), "tools", "tool calling is not supported")
        _refuse_if(self.tool_choice not in (None, "none"), "tool_choice", "tool calling is not supported")
        _refuse_if(
            self.response_format is not None and self.response_format.type != "text",
            "response_format",
            "only type 'text' is supported",
        )
        _refuse_if(
            self.continue_final_message and self.add_generation_prompt,
            "continue_final_message",
            "cannot be true while add_generation_prompt is (set add_generation_prompt: false)",
        )
        _refuse_if(
            self.continue_final_message and self.messages[-1:] and self.messages[-1].role != "assistant",
            "continue_final_message",
            "the final message must be the assistant's to continue it",
        )
        _refuse_if(
            self.max_tokens is not None and self.max_completion_tokens is not None,
            "max_completion_tokens",
            "give max_completion_tokens or max_tokens, not both",
        )

    def logprob_options(self) -> dict[str, Any]:
        """``logprobs: true``: each generated token's, with the ``top_logprobs`` likeliest."""
        return {"logprobs": self.top_logprobs or 0} if self.logprobs else {}

    def conversation(self) -> list[dict[str, str]]:
        return conversation(self.messages)


def conversation(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as ``intake.encode_chat`` takes them (it checks and joins the content parts)."""
    return [
        {
            "role": m.role,
            "content": [part.model_dump() for part in m.content] if isinstance(m.content, list) else m.content,
            "tool_calls": m.tool_calls,
            "function_call": m.function_call,
            "audio": m.audio,
        }
        for m in messages
    ]


def _token_id(key: str) -> int:
    """A ``logit_bias`` key: JSON object keys are strings, OpenAI's are token ids written out."""
    if not (key.isascii() and key.isdigit() and len(key) <= 10):
        raise InvalidRequest("logit_bias", f"keys must be token ids, got {key[:20]!r}")
    return int(key)


def _refuse_if(condition: bool, field: str, detail: str) -> None:
    if condition:
        raise InvalidRequest(field, detail)


class TokenizeRequest(ChatTemplated):
    """vLLM's ``POST /tokenize``: a prompt's ids, or a conversation's through the chat template."""

    model: str | None = None
    prompt: str | None = None
    add_special_tokens: bool = True  # a prompt's BOS

    def check(self) -> None:
        _refuse_if((self.prompt is None) == (self.messages is None), "prompt", "give exactly one of prompt or messages")
        self.template_flags()


class DetokenizeRequest(_Strict):
    """vLLM's ``POST /detokenize``."""

    model: str | None = None
    tokens: list[int]
