"""Admission, shared by every front end (gRPC and the OpenAI HTTP API): checks, then submit.

A prompt (text, chat messages or token ids) and sampling options become an engine ``Request``, or
``InvalidRequest`` naming the offending field in the caller's own vocabulary, so a gRPC client
reads ``max_tokens`` where an OpenAI chat client reads ``max_completion_tokens``. ``admit`` turns
every way a request can be refused into one ``Refused`` that each front end maps to its own status
codes, and counts it, so both front ends refuse the same requests for the same reasons.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from jds.engine.engine import Engine
from jds.engine.running import QueueFull
from jds.engine.request import Request
from jds.engine.sequence import RequestStream
from jds.sampling_params import SamplingParams
from jds.serving.metrics import Metrics

ROLES = ("system", "user", "assistant")


class InvalidRequest(ValueError):
    """A request field the server cannot accept; the message starts with the field's name."""

    def __init__(self, field: str, detail: str):
        super().__init__(f"{field}: {detail}")
        self.field = field


RefusalKind = Literal["invalid", "not_found", "busy", "unavailable"]
GRPC_CODES: dict[RefusalKind, str] = {
    "invalid": "INVALID_ARGUMENT",
    "not_found": "NOT_FOUND",
    "busy": "RESOURCE_EXHAUSTED",
    "unavailable": "UNAVAILABLE",
}


class Refused(Exception):
    """A request turned away before it ran; ``field`` is set when one field is to blame."""

    def __init__(self, kind: RefusalKind, message: str, field: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.field = field


def admit(engine: Engine, accepting: threading.Event, metrics: Metrics, build: Callable[[], Request]) -> tuple[Request, RequestStream]:
    """Build the request (``build`` runs every check) and submit it, or raise a counted ``Refused``."""
    try:
        if not accepting.is_set():
            raise Refused("unavailable", "server is shutting down")
        try:
            request = build()
            return request, engine.submit(request)
        except InvalidRequest as exc:
            raise Refused("invalid", str(exc), exc.field) from None
        except QueueFull as exc:
            raise Refused("busy", f"server is busy: {exc}") from None
        except RuntimeError as exc:  # the engine has shut down
            raise Refused("unavailable", str(exc)) from None
        except ValueError as exc:  # the engine's own checks (stop ids, a request id already running)
            raise Refused("invalid", str(exc), str(exc).partition(" ")[0].rstrip(":")) from None
    except Refused as refusal:
        metrics.rejected.labels(GRPC_CODES[refusal.kind]).inc()
        raise


def encode_text(engine: Engine, text: str, field: str) -> tuple[int, ...]:
    tokenizer = _tokenizer(engine, field)
    return _non_empty(tuple(tokenizer.encode(text)), field)


def encode_chat(engine: Engine, messages: Sequence[Mapping[str, str]], field: str = "messages") -> tuple[int, ...]:
    """Prompt ids of a conversation, through the model's own chat template."""
    tokenizer = _tokenizer(engine, field)
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise InvalidRequest(f"{field}[{i}].role", f"must be one of {', '.join(ROLES)}; got {m['role']!r}")
    try:
        ids = tuple(tokenizer.encode_chat([{"role": m["role"], "content": m["content"]} for m in messages]))
    except ValueError as exc:  # the template refuses the conversation (e.g. no messages)
        raise InvalidRequest(field, str(exc)) from None
    return _non_empty(ids, field)


def check_token_ids(engine: Engine, ids: Sequence[int], field: str) -> tuple[int, ...]:
    vocab = engine.model.arch.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise InvalidRequest(field, f"ids must be in [0, {vocab}); got {bad[:8]}")
    return _non_empty(tuple(ids), field)


def build_request(
    engine: Engine,
    prompt_ids: tuple[int, ...],
    prompt_field: str,
    options: Mapping[str, Any],
    request_id: str | None = None,
    names: Mapping[str, str] | None = None,
) -> Request:
    """Check the prompt against the context and ``options`` (``SamplingParams`` fields; absent
    means the default) against their rules; ``names`` maps a field to the caller's name for it."""
    name = lambda field: (names or {}).get(field, field)  # noqa: E731
    max_seq_len = engine.max_seq_len
    room = max_seq_len - len(prompt_ids)
    if room < 1:
        raise InvalidRequest(
            prompt_field,
            f"the prompt has {len(prompt_ids)} tokens; max_seq_len is {max_seq_len} (prompt plus at least one output token)",
        )
    if options.get("stop_token_ids"):
        check_token_ids(engine, options["stop_token_ids"], name("stop_token_ids"))
    max_tokens = options.get("max_tokens", SamplingParams.max_tokens)
    if isinstance(max_tokens, int) and max_tokens > room:
        raise InvalidRequest(
            name("max_tokens"),
            f"{max_tokens} is beyond the limit: the prompt has {len(prompt_ids)} tokens and max_seq_len is "
            f"{max_seq_len}, so at most {room} can be generated",
        )
    try:
        params = SamplingParams(**options)
    except ValueError as exc:  # "SamplingParams.top_p must be in (0, 1], got 2.0"
        field, _, rule = str(exc).removeprefix("SamplingParams.").partition(" ")
        raise InvalidRequest(name(field), rule) from None
    if request_id is None:
        request_id = uuid.uuid4().hex
    elif not request_id:
        raise InvalidRequest(name("request_id"), "must not be empty when given")
    return Request(request_id, prompt_ids, params, params.resolved_seed())


def _tokenizer(engine: Engine, field: str):
    tokenizer = engine.model.tokenizer
    if tokenizer is None:
        raise InvalidRequest(field, "this model serves token ids only (it has no tokenizer); send token ids")
    return tokenizer


def _non_empty(ids: tuple[int, ...], field: str) -> tuple[int, ...]:
    if not ids:
        raise InvalidRequest(field, "encodes to no tokens")
    return ids
