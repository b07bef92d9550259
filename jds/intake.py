"""What every front end accepts: the gRPC service, the OpenAI API and ``jds.LLM`` turn prompts
(text, chat messages or token ids) and sampling options into engine ``Request``s here, and only
here, so the three cannot drift apart.

Each refusal is an ``InvalidRequest`` whose message starts with the offending field in the
caller's own vocabulary (a gRPC client reads ``max_tokens`` where an OpenAI chat client reads
``max_completion_tokens``). Value rules that do not depend on the model live in
``SamplingParams``; the engine checks again what only it knows (the stop id table, its context).
"""

from __future__ import annotations

import operator
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from jds.engine.interface import ServingEngine
from jds.engine.request import Request
from jds.model.tokenizer import Tokenizer
from jds.sampling_params import SamplingParams, is_unicode

ROLES = ("system", "developer", "user", "assistant")  # OpenAI's developer is the older system (what templates know)
MAX_REQUEST_ID_CHARS = 256


class InvalidRequest(ValueError):
    """A request field the server cannot accept; the message starts with the field's name."""

    def __init__(self, field: str, detail: str):
        super().__init__(f"{field}: {detail}")
        self.field = field


def encode_text(engine: ServingEngine, text: str, field: str, add_special: bool = True, prompt: bool = True) -> tuple[int, ...]:
    """Prompt ids of a text, refusing one that is not Unicode or could never fit the context.
    ``prompt=False`` only counts (``/tokenize``): any length, empty too."""
    _check_unicode(text, field)
    return _encode(engine, _tokenizer(engine, field), text, field, add_special, prompt)


def decode_ids(engine: ServingEngine, ids: Sequence[int], field: str) -> str:
    """The text of token ids, special tokens written out (what ``/detokenize`` answers)."""
    tokenizer = _tokenizer(engine, field)
    return tokenizer.decode(check_token_ids(engine, ids, field) if ids else (), skip_special=False)


def encode_chat(
    engine: ServingEngine,
    messages: Sequence[Mapping[str, str]],
    field: str = "messages",
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    template_kwargs: Mapping[str, Any] | None = None,
    prompt: bool = True,
) -> tuple[int, ...]:
    """Prompt ids of a conversation, through the model's own chat template (its options as
    ``Tokenizer.apply_chat_template`` takes them); ``prompt`` as ``encode_text`` takes it."""
    tokenizer = _tokenizer(engine, field)
    if not messages:
        raise InvalidRequest(field, "a conversation needs at least one message")
    conversation = [_message(m, f"{field}[{i}]") for i, m in enumerate(messages)]
    # The rendered conversation holds every message's content, so it is at least their length:
    # one far beyond the context is refused before the template runs (0.4 s for 130,000 messages).
    if prompt:
        _refuse_beyond_context(engine, tokenizer, sum(len(m["content"]) for m in conversation), field)
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt, continue_final_message, template_kwargs)
    except ValueError as exc:  # the template refuses the conversation (e.g. roles out of order)
        raise InvalidRequest(field, str(exc)) from None
    return _encode(engine, tokenizer, text, field, False, prompt)  # the template writes any BOS itself


def _message(m: object, field: str) -> dict[str, str]:
    """One message as the chat template takes it. What OpenAI's own replies carry is taken as a
    saved history holds it: an assistant's null content (its reply was a tool call or a refusal)
    is empty, and ``tool_calls``, ``function_call`` and ``audio`` are refused unless empty, since
    no tool calling is served."""
    if not isinstance(m, Mapping):
        raise InvalidRequest(field, f"must be a mapping with a role and a content; got {type(m).__name__}")
    role = m.get("role")
    if role not in ROLES:
        raise InvalidRequest(f"{field}.role", f"must be one of {', '.join(ROLES)}; got {role!r}")
    for key in ("tool_calls", "function_call", "audio"):
        if m.get(key):
            raise InvalidRequest(f"{field}.{key}", "tool calls and audio are not supported")
    return {"role": "system" if role == "developer" else role, "content": _content(m.get("content"), role, f"{field}.content")}


def _content(content: object, role: str, field: str) -> str:
    """A message's text: a string, or OpenAI's list of content parts, whose text parts are joined
    by newlines (images and audio are refused: the models served read text only)."""
    if content is None and role == "assistant":
        return ""
    if isinstance(content, (list, tuple)):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping):
                raise InvalidRequest(f"{field}[{j}]", f"must be a content part (a mapping with a type); got {type(part).__name__}")
            if part.get("type") != "text":
                raise InvalidRequest(f"{field}[{j}].type", f"only text parts are supported; got {str(part.get('type'))[:40]!r}")
            if not isinstance(part.get("text"), str):
                got = "nothing" if part.get("text") is None else type(part["text"]).__name__
                raise InvalidRequest(f"{field}[{j}].text", f"a text part's text must be a string; got {got}")
            _check_unicode(part["text"], f"{field}[{j}].text")
            texts.append(part["text"])
        return "\n".join(texts)
    if not isinstance(content, str):
        got = "null" if content is None else type(content).__name__
        raise InvalidRequest(field, f"must be a string or a list of text parts (only an assistant's may be null); got {got}")
    _check_unicode(content, field)
    return content


def check_token_ids(engine: ServingEngine, ids: Sequence[int], field: str) -> tuple[int, ...]:
    """The ids as Python ints (NumPy's integers are taken too: tokenizers and arrays hand them out),
    each in the vocabulary."""
    vocab = engine.model.arch.vocab_size
    whole = [_integer(t) for t in ids]
    bad = [t for t, w in zip(ids, whole) if w is None or not 0 <= w < vocab]
    if bad:
        raise InvalidRequest(field, f"ids must be in [0, {vocab}); got {[_plain(t) for t in bad[:8]]}")
    if not ids:
        raise InvalidRequest(field, "is empty")
    return tuple(whole)


def _integer(value: object) -> int | None:
    """``value`` as an int if it is an integer of any kind but a bool, else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _plain(value: object) -> object:
    """A NumPy scalar as the Python value it holds, so a message shows ``7``, not ``np.int64(7)``."""
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", None) == 0 else value


def build_request(
    engine: ServingEngine,
    prompt_ids: tuple[int, ...],
    prompt_field: str,
    options: Mapping[str, Any],
    request_id: str | None = None,
    names: Mapping[str, str] | None = None,
) -> Request:
    """Check the prompt against the context and ``options`` (``SamplingParams`` fields; absent
    means the default) against their rules; ``names`` maps a field to the caller's name for it.

    A ``max_tokens`` beyond the context left is refused (OpenAI's and vLLM's servers do too);
    ``jds.LLM`` instead ends such a request at the context with finish reason ``length``.
    """
    name = lambda field: (names or {}).get(field, field)  # noqa: E731
    max_seq_len = engine.max_seq_len
    room = max_seq_len - len(prompt_ids)
    if room < 1:
        raise InvalidRequest(
            prompt_field,
            f"the prompt has {len(prompt_ids)} tokens; max_seq_len is {max_seq_len} (prompt plus at least one output token)",
        )
    max_tokens = options.get("max_tokens", SamplingParams.max_tokens)
    if isinstance(max_tokens, int) and max_tokens > room:
        raise InvalidRequest(
            name("max_tokens"),
            f"{max_tokens} is beyond the limit: the prompt has {len(prompt_ids)} tokens and max_seq_len is "
            f"{max_seq_len}, so at most {room} can be generated",
        )
    params = sampling_params(options, name)
    if params.stop_token_ids:
        check_token_ids(engine, params.stop_token_ids, name("stop_token_ids"))
    if params.logit_bias:
        check_token_ids(engine, [token for token, _ in params.logit_bias], name("logit_bias"))
    return Request(check_request_id(request_id, name("request_id")), prompt_ids, params, params.resolved_seed())


def sampling_params(options: Mapping[str, Any], name=lambda field: field) -> SamplingParams:
    """``SamplingParams(**options)``, its refusal re-raised as ``InvalidRequest`` under the caller's name."""
    try:
        return SamplingParams(**options)
    except ValueError as exc:  # "SamplingParams.top_p must be in (0, 1], got 2.0"
        field, _, rule = str(exc).removeprefix("SamplingParams.").partition(" ")
        base, bracket, index = field.partition("[")  # "stop[3]": the caller's name for stop, same index
        raise InvalidRequest(name(base) + bracket + index, rule) from None


def check_request_id(request_id: str | None, field: str = "request_id") -> str:
    """The caller's id, checked, or a fresh one."""
    if request_id is None:
        return uuid.uuid4().hex
    if not request_id:
        raise InvalidRequest(field, "must not be empty when given")
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequest(field, f"at most {MAX_REQUEST_ID_CHARS} characters, got {len(request_id)}")
    _check_unicode(request_id, field)
    return request_id


def _encode(engine: ServingEngine, tokenizer: Tokenizer, text: str, field: str, add_special: bool, prompt: bool) -> tuple[int, ...]:
    """Ids of a text; for a prompt, refusing without encoding it one that could never fit the
    context, and refusing one of no tokens."""
    if not prompt:
        return tuple(tokenizer.encode(text, add_special=add_special))
    _refuse_beyond_context(engine, tokenizer, len(text), field)
    return _non_empty(tuple(tokenizer.encode(text, add_special=add_special)), field)


def _refuse_beyond_context(engine: ServingEngine, tokenizer: Tokenizer, chars: int, field: str) -> None:
    fewest = tokenizer.fewest_tokens(chars)
    if fewest >= engine.max_seq_len:
        raise InvalidRequest(field, f"{chars} characters make at least {fewest} tokens; max_seq_len is {engine.max_seq_len}")


def _check_unicode(text: str, field: str) -> None:
    if not is_unicode(text):
        raise InvalidRequest(field, "is not valid Unicode (it holds a lone surrogate)")


def _tokenizer(engine: ServingEngine, field: str) -> Tokenizer:
    tokenizer = engine.model.tokenizer
    if tokenizer is None:
        raise InvalidRequest(field, "this model serves token ids only (it has no tokenizer); send token ids")
    return tokenizer


def _non_empty(ids: tuple[int, ...], field: str) -> tuple[int, ...]:
    if not ids:
        raise InvalidRequest(field, "encodes to no tokens")
    return ids
