"""The OpenAI-compatible HTTP API: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``
and ``/health``, on the same engine, admission checks and metrics as the gRPC service; and vLLM's
``/tokenize``, ``/detokenize``, ``/version`` and ``/metrics``.

Response bodies, streamed chunks (server-sent events ending in ``data: [DONE]``), usage and error
bodies have the shapes of OpenAI's API, so its clients parse them. Refusals are 400 (with ``param``
naming the field), 404 for a model this server does not serve, 429 when the waiting queue is full
and 503 while draining. Each streamed chunk carries what one engine step produced, so a client can
time tokens from chunk arrivals. A client that disconnects aborts its request, which frees the slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from jds.engine.interface import ServingEngine
from jds.engine.request import Request as EngineRequest
from jds.engine.request import StreamOutput
from jds.engine.sequence import RequestStream
from jds.intake import (
    MAX_REQUEST_ID_CHARS,
    InvalidRequest,
    build_request,
    check_request_id,
    check_token_ids,
    decode_ids,
    encode_chat,
    encode_text,
)
from jds.serving.admission import Refused, admit_all
from jds.serving.metrics import Metrics
from jds.serving.openai_logprobs import LogprobShapes
from jds.serving.openai_schema import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, conversation

HTTP_STATUS = {"invalid": 400, "not_found": 404, "busy": 429, "unavailable": 503}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    500: "server_error",
}
DISCONNECT_POLL_SECONDS = 0.1
MAX_REQUEST_BYTES = 4 * 1024 * 1024
REQUEST_ID_NAMES = {"request_id": "x-request-id"}  # the header an HTTP client names its request with


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:  # fmt: skip
    return JSONResponse({"error": _error(status, message, param, code)}, status_code=status, headers=headers)


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param, "code": code}


class _Refusal(Exception):
    """A request refused before it reaches admission: its body, its size, or its model."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.response = error_response(status, message, param, code)


def _field_path(loc: tuple) -> str:
    """``("messages", 0, "content")`` → ``messages[0].content``; pydantic's union-member tags
    (``list[int]``, ``ContentPart``) are not fields and are left out."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif "[" in part or part[:1].isupper() or part in ("str", "int", "float", "bool"):
            continue
        else:
            path += f".{part}" if path else part
    return path or "body"


_SEVERAL_FORMS = ("prompt", "stop", "content")  # the fields whose forms _FORMS names
_FORMS = {
    "str": "a string",
    "list[str]": "a list of strings",
    "list[int]": "a list of token ids",
    "list[list[int]]": "a list of lists of token ids",
    "list[ContentPart]": "a list of text parts",
}


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str]:
    """The field and message of pydantic's first error. A field of several forms (``prompt``: a
    string, ids, or lists of either) fails once per form: the form of the value's own JSON type
    speaks for it where there is one, else the message lists what the field takes."""
    first = errors[0]
    loc = tuple(first["loc"])
    tag = next((i for i, part in enumerate(loc) if part in _FORMS and i > 0 and loc[i - 1] in _SEVERAL_FORMS), None)
    forms = []
    if tag is not None:
        prefix = loc[:tag]
        forms = list(dict.fromkeys(e["loc"][tag] for e in errors if tuple(e["loc"][:tag]) == prefix and len(e["loc"]) > tag))
    if forms and all(f in _FORMS for f in forms):
        value = next((e["input"] for e in errors if tuple(e["loc"]) == (*prefix, forms[0])), None)
        kind = "list" if isinstance(value, list) else "str" if isinstance(value, str) else None
        fitting = [f for f in forms if f.partition("[")[0] == kind]
        if len(fitting) == 1:  # named by the field, with where inside it the value went wrong
            inner = next(e for e in errors if tuple(e["loc"][: tag + 1]) == (*prefix, fitting[0]))
            field = _field_path(prefix)
            where = _field_path((field, *inner["loc"][tag + 1 :])).removeprefix(field)
            return field, f"at {where}, {inner['msg']}" if where else inner["msg"]
        if len(forms) > 1:
            names = [_FORMS[f] for f in forms]
            return _field_path(prefix), f"must be {', '.join(names[:-1])} or {names[-1]}; got {_json_kind(value)}"
    field = _field_path(tuple(first["loc"]))
    return field, "is not a supported field" if first["type"] == "extra_forbidden" else first["msg"]


def _json_kind(value: object) -> str:
    """What a JSON value is, for a message: its type and, cut short, the value."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number", type(None): "null"}
    text = json.dumps(value)
    return f"{names.get(type(value), type(value).__name__)} ({text if len(text) <= 40 else text[:37] + '...'})"


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not a JSON value")


def parse_body(raw: bytes, schema: type[BaseModel]) -> BaseModel:
    """The request body as ``schema``; each way it can be malformed is a 400 in OpenAI's shape.

    Parsed here rather than by FastAPI, whose errors have another shape (``{"detail": ...}``) and
    whose JSON reader accepts ``NaN`` and ``Infinity``. Runs off the event loop (a worker thread).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Refusal(400, f"body: is not valid UTF-8 (byte {raw[exc.start]:#04x} at offset {exc.start})") from None
    try:
        data = json.loads(text, parse_constant=_not_json)
    except json.JSONDecodeError as exc:
        raise _Refusal(400, f"body: is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except ValueError as exc:  # NaN or Infinity
        raise _Refusal(400, f"body: is not valid JSON: {exc}") from None
    except RecursionError:
        raise _Refusal(400, "body: is nested too deeply") from None
    if not isinstance(data, dict):
        raise _Refusal(400, f"body: must be a JSON object; got {_json_kind(data)}")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        field, message = _validation_message(exc.errors())
        raise _Refusal(400, f"{field}: {message}", None if field == "body" else field) from None
    except RecursionError:
        raise _Refusal(400, "body: is nested too deeply") from None


class OpenAIFrontend:
    """The FastAPI application and the state its handlers share with the gRPC service."""

    def __init__(self, engine: ServingEngine, metrics: Metrics, accepting: threading.Event, max_request_bytes: int = MAX_REQUEST_BYTES):
        self.engine = engine
        self.metrics = metrics
        self.accepting = accepting
        self.max_request_bytes = max_request_bytes
        self.model_name = engine.model.name
        self.shapes = LogprobShapes(engine.model.tokenizer)
        self.created = int(time.time())  # the model card's: when this server began serving the model
        self.app = self._build_app()

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="jds: OpenAI-compatible API", docs_url=None, redoc_url=None)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
            # an unknown path or method, in OpenAI's shape; a 405 keeps its Allow header
            return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

        @app.exception_handler(Exception)
        async def server_error(_: Request, exc: Exception) -> JSONResponse:  # uvicorn logs the exception
            return error_response(500, f"internal error: {type(exc).__name__}")

        @app.get("/health")
        async def health() -> JSONResponse:
            serving = self.accepting.is_set()
            return JSONResponse({"status": "serving" if serving else "draining"}, status_code=200 if serving else 503)

        @app.get("/v1/models")
        async def models() -> JSONResponse:
            return JSONResponse({"object": "list", "data": [self._model_card()]})

        @app.get("/v1/models/{model_id:path}")
        async def model(model_id: str) -> JSONResponse:
            if model_id != self.model_name:  # a lookup, not a refused generation: not counted
                return error_response(404, *self._unknown_model_error(model_id, counted=False))
            return JSONResponse(self._model_card())

        @app.get("/metrics")
        async def metrics() -> Response:  # as vLLM serves them, beside --metrics-port's
            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        @app.get("/version")
        async def version() -> JSONResponse:
            try:
                return JSONResponse({"version": package_version("jds")})
            except PackageNotFoundError:  # run from a source tree that was never installed
                return JSONResponse({"version": "unknown: jds is not installed"})

        @app.post("/tokenize", openapi_extra=_body_schema(TokenizeRequest))
        async def tokenize(http: Request):
            return await self._utility(http, TokenizeRequest, self._tokenize)

        @app.post("/detokenize", openapi_extra=_body_schema(DetokenizeRequest))
        async def detokenize(http: Request):
            return await self._utility(http, DetokenizeRequest, lambda body: {"prompt": decode_ids(self.engine, body.tokens, "tokens")})

        @app.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest))
        async def completions(http: Request):
            return await self._serve(http, CompletionRequest, self._completion_request)

        @app.post("/v1/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest))
        async def chat_completions(http: Request):
            return await self._serve(http, ChatCompletionRequest, self._chat_request)

        return app

    # -- models -------------------------------------------------------------------------------

    def _model_card(self) -> dict[str, Any]:
        """OpenAI's model object, plus the sizes a load generator needs (as vLLM adds ``max_model_len``)."""
        engine = self.engine
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "jds",
            "max_model_len": engine.max_seq_len,
            "vocab_size": engine.model.arch.vocab_size,
            "devices": len(engine.placement.devices),
        }

    def _unknown_model_error(self, name: str, counted: bool = True) -> tuple[str, str, str]:
        """The 404's message, field and code; ``counted`` among refused requests (a generation's)."""
        if counted:
            self.metrics.rejected.labels("NOT_FOUND").inc()
        return f"model: {name!r} is not served here; this server serves {self.model_name!r}", "model", "model_not_found"

    # -- tokens -------------------------------------------------------------------------------

    def _tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        """The ids a completion's prompt or a chat's messages become (vLLM's answer's shape)."""
        body.check()
        if body.prompt is not None:  # counted whatever its length, as vLLM does: clients ask whether a prompt fits
            ids = encode_text(self.engine, body.prompt, "prompt", add_special=body.add_special_tokens, prompt=False)
        else:
            ids = encode_chat(
                self.engine, conversation(body.messages), "messages", body.add_generation_prompt, body.continue_final_message,
                body.chat_template_kwargs, prompt=False,
            )  # fmt: skip
        return {"count": len(ids), "max_model_len": self.engine.max_seq_len, "tokens": list(ids)}

    async def _utility(self, http: Request, schema: type[BaseModel], answer: Callable[[Any], dict[str, Any]]) -> JSONResponse:
        """A request that runs no model (tokenize, detokenize): parsed and answered on a worker thread."""

        def run() -> dict[str, Any]:
            body = parse_body(raw, schema)
            if body.model is not None and body.model != self.model_name:
                raise _Refusal(404, *self._unknown_model_error(body.model, counted=False))
            return answer(body)

        try:
            raw = await self._read_body(http)
            return JSONResponse(await asyncio.get_running_loop().run_in_executor(None, run))
        except _Refusal as refusal:
            return refusal.response
        except InvalidRequest as exc:
            return error_response(400, str(exc), exc.field)

    # -- requests -----------------------------------------------------------------------------

    def _completion_request(self, body: CompletionRequest, request_id: str | None) -> Callable[[], list[_Choice]]:
        def build() -> list[_Choice]:
            body.unsupported()
            self._check_queue_room(body)
            prompts = body.prompt_list()
            choices = []
            for p, prompt in enumerate(prompts):
                field = "prompt" if len(prompts) == 1 else f"prompt[{p}]"
                ids = encode_text(self.engine, prompt, field) if isinstance(prompt, str) else check_token_ids(self.engine, prompt, field)
                for j in range(body.n):
                    options = body.sampling_options(body.max_tokens, j)
                    index = p * body.n + j
                    request = build_request(self.engine, ids, field, options, _choice_id(request_id, index, body), REQUEST_ID_NAMES)
                    choices.append(_Choice(index, request, prompt))
            return choices

        return build

    def _chat_request(self, body: ChatCompletionRequest, request_id: str | None) -> Callable[[], list[_Choice]]:
        def build() -> list[_Choice]:
            body.unsupported()
            self._check_queue_room(body)
            ids = encode_chat(
                self.engine, body.conversation(), "messages", body.add_generation_prompt, body.continue_final_message, body.chat_template_kwargs
            )
            limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
            name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
            if limit is None:  # as in OpenAI's chat API: until the model stops or the context is full
                limit = max(1, self.engine.max_seq_len - len(ids))
            names = {"max_tokens": name, "logprobs": "top_logprobs", **REQUEST_ID_NAMES}
            return [
                _Choice(j, build_request(self.engine, ids, "messages", body.sampling_options(limit, j), _choice_id(request_id, j, body), names))
                for j in range(body.n)
            ]

        return build

    def _check_queue_room(self, body) -> None:
        """Refuse a call with more choices than may wait at once: admitted all or none, it could
        never be admitted, and a 429 would only make its client retry."""
        limit, wanted = self.engine.max_waiting, body.prompts() * body.n
        if limit is not None and wanted > limit:
            field = "n" if body.n > 1 else "prompt"
            raise InvalidRequest(field, f"{wanted} choices (prompts x n) are more than this server queues at once (server.max_waiting {limit})")

    async def _serve(self, http: Request, schema: type[BaseModel], builder: Callable[[Any, str | None], Callable[[], list[_Choice]]]):
        """Read, parse, check and admit a request; the parsing, tokenizing and template rendering
        run on a worker thread, so that other clients and health checks are answered meanwhile.
        An ``X-Request-Id`` header (as vLLM takes it) names the request, and comes back."""
        request_id = http.headers.get("x-request-id")
        try:
            raw = await self._read_body(http)
            body, choices = await self._off_loop(self._admit, raw, schema, builder, request_id)
        except _Refusal as refusal:
            return refusal.response
        except Refused as refusal:
            return error_response(HTTP_STATUS[refusal.kind], str(refusal), refusal.field)
        reply = _Reply(choices, self.model_name, body, self.shapes, request_id)
        headers = {"x-request-id": request_id or choices[0].request.request_id}
        if body.stream:
            return StreamingResponse(self._events(reply), media_type="text/event-stream", headers=headers)
        response = await self._whole(reply, http)
        response.headers.update(headers)
        return response

    async def _read_body(self, http: Request) -> bytes:
        """The body, or a 413 as soon as it is known to be longer than ``max_request_bytes``."""
        limit = self.max_request_bytes
        declared = http.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise self._too_large(int(declared))
        chunks, size = [], 0
        async for chunk in http.stream():
            size += len(chunk)
            if size > limit:
                raise self._too_large(size)
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self, size: int) -> _Refusal:
        self.metrics.rejected.labels("INVALID_ARGUMENT").inc()
        return _Refusal(413, f"body: {size} bytes is more than this server accepts ({self.max_request_bytes}; server.max_request_bytes)")

    async def _off_loop(self, admit_body: Callable, *args) -> tuple[Any, list[_Choice]]:
        """Run ``admit_body`` on a worker thread. If this handler is cancelled meanwhile (the client
        left), requests the thread still admits are aborted at once instead of running unread."""
        work = asyncio.get_running_loop().run_in_executor(None, admit_body, *args)
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            work.add_done_callback(self._abort_admitted)
            raise

    def _abort_admitted(self, work: asyncio.Future) -> None:
        if not work.cancelled() and work.exception() is None:
            for choice in work.result()[1]:
                self.engine.abort(choice.request.request_id)

    def _admit(self, raw: bytes, schema: type[BaseModel], builder, request_id: str | None) -> tuple[Any, list[_Choice]]:
        try:
            body = parse_body(raw, schema)
        except _Refusal:
            self.metrics.rejected.labels("INVALID_ARGUMENT").inc()
            raise
        if body.model != self.model_name:
            raise _Refusal(404, *self._unknown_model_error(body.model))
        choices = builder(body, request_id)
        built: list[_Choice] = []

        def requests() -> list[EngineRequest]:
            built.extend(choices())
            return [choice.request for choice in built]

        streams = admit_all(self.engine, self.accepting, self.metrics, requests, unique_ids=request_id is not None)
        for choice, (request, stream) in zip(built, streams):
            choice.request, choice.stream = request, stream
        return body, built

    async def _whole(self, reply: _Reply, http: Request) -> JSONResponse:
        """Collect the whole answer, aborting the requests if the client goes away meanwhile, and
        the other choices as soon as one fails."""
        watcher = asyncio.create_task(self._abort_on_disconnect(http, reply.choices))
        messages: dict[int, list[StreamOutput]] = {choice.index: [] for choice in reply.choices}
        failed = None
        try:
            async with contextlib.aclosing(_interleaved(reply.choices)) as outputs:
                async for choice, message in outputs:
                    messages[choice.index].append(message)
                    if message.finish_reason == "error" and failed is None:
                        failed = message
                        self._abort(reply.choices)
        finally:
            watcher.cancel()
        for choice in reply.choices:
            choice.completion_tokens = sum(len(m.token_ids) for m in messages[choice.index])
            self._finished(choice, messages[choice.index][-1])
        if failed is not None:
            return error_response(503 if failed.unavailable else 500, f"generation failed: {failed.error}")
        return JSONResponse(reply.whole(messages))

    def _abort(self, choices: list[_Choice]) -> None:
        for choice in choices:
            self.engine.abort(choice.request.request_id)

    async def _abort_on_disconnect(self, http: Request, choices: list[_Choice]) -> None:
        while not await http.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_SECONDS)
        self._abort(choices)

    async def _events(self, reply: _Reply) -> AsyncIterator[str]:
        """Server-sent events, the choices' chunks interleaved as they come; if the client
        disconnects, the server stops iterating here and the ``finally`` aborts every choice not
        finished."""
        finished: set[int] = set()
        try:
            for chunk in reply.first_chunks():
                yield _event(chunk)
            async with contextlib.aclosing(_interleaved(reply.choices)) as outputs:
                async for choice, message in outputs:
                    if message.finish_reason == "error":
                        finished.add(choice.index)
                        self._finished(choice, message)
                        yield _event({"error": _error(503 if message.unavailable else 500, f"generation failed: {message.error}")})
                        break
                    choice.completion_tokens += len(message.token_ids)
                    yield _event(reply.chunk(choice, message))
                    if message.finished:
                        finished.add(choice.index)
                        self._finished(choice, message)
            if reply.body.include_usage and len(finished) == len(reply.choices):
                yield _event(reply.usage_chunk())
            yield "data: [DONE]\n\n"
        finally:
            for choice in reply.choices:
                if choice.index not in finished:  # the client went away, or a choice failed: nobody reads the rest
                    self.engine.abort(choice.request.request_id)
                    self.metrics.finished("abort", choice.prompt_tokens, choice.completion_tokens, None)

    def _finished(self, choice: _Choice, last: StreamOutput) -> None:
        choice.cached_tokens = last.timings.cached_tokens if last.timings is not None else 0
        self.metrics.finished(last.finish_reason, choice.prompt_tokens, choice.completion_tokens, last.timings)


def _choice_id(request_id: str | None, index: int, body) -> str | None:
    """The engine request id of one choice: the caller's own where the call has one choice, else
    the caller's with the choice's index appended (None: a fresh id each)."""
    choices = body.prompts() * body.n
    if request_id is None or choices == 1:
        return request_id
    check_request_id(request_id, "x-request-id")  # as sent: not empty, not too long for one
    longest = MAX_REQUEST_ID_CHARS - len(f"-{choices - 1}")
    if len(request_id) > longest:
        raise InvalidRequest("x-request-id", f"at most {longest} characters for a call of {choices} choices (each choice's id adds '-N'), got {len(request_id)}")
    return f"{request_id}-{index}"


async def _interleaved(choices: list[_Choice]) -> AsyncIterator[tuple[_Choice, StreamOutput]]:
    """Every choice's outputs as they arrive, each with its choice."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(choice: _Choice) -> None:
        try:
            async for message in choice.stream:
                await queue.put((choice, message))
        finally:
            await queue.put((choice, None))

    tasks = [asyncio.create_task(pump(choice)) for choice in choices]
    try:
        for _ in choices:
            while (item := await queue.get())[1] is not None:
                yield item
        for task in tasks:
            task.result()  # a stream that raised raises here
    finally:
        for task in tasks:
            task.cancel()


@dataclasses.dataclass(eq=False)
class _Choice:
    """One choice of a response: its engine request and stream, and how much of it was sent."""

    index: int
    request: EngineRequest
    prompt: str | list[int] | None = None  # a completion's prompt, which echo repeats
    stream: RequestStream | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0  # known at the end
    offset: int = 0  # characters of the text sent so far (completions' text_offset)
    first: bool = True

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)


class _Reply:
    """The response under construction: ids, shapes, its choices (n per prompt) and their usage."""

    def __init__(self, choices: list[_Choice], model: str, body, shapes: LogprobShapes, request_id: str | None = None):
        self.chat = isinstance(body, ChatCompletionRequest)
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{request_id or choices[0].request.request_id}"
        self.model = model
        self.body = body
        self.choices = choices
        self.shapes = shapes
        self.created = int(time.time())
        self.echo = not self.chat and body.echo  # completions that repeat the prompt before the completion

    def _prompt_text(self, choice: _Choice) -> str:
        prompt = choice.prompt
        return prompt if isinstance(prompt, str) else self.shapes.decode(prompt)

    def _choice(self, choice: _Choice, message: StreamOutput, text: str, token_ids: list[int], logprobs, whole: bool) -> dict[str, Any]:
        """One choice: a chat message (or, streamed, a delta), or a completion's text, with the
        log-probabilities of its tokens (and, on the first, of an echoed prompt's) if asked for."""
        first, choice.first = choice.first, False
        if self.chat:
            key, value = ("message", {"role": "assistant", "content": text}) if whole else ("delta", {"content": text})
            shaped = self.shapes.chat(logprobs) if self.body.logprobs else None
            return {"index": choice.index, key: value, "logprobs": shaped, "finish_reason": message.finish_reason}
        parts = [(list(zip(token_ids, logprobs or [None] * len(token_ids))), text)]
        if first and self.echo:
            prompt_ids = choice.request.prompt_ids
            parts.insert(0, (list(zip(prompt_ids, message.prompt_logprobs or [None] * len(prompt_ids))), self._prompt_text(choice)))
        shaped = None
        if self.body.logprobs is not None:  # each part's offsets from where its text starts
            starts = [choice.offset, choice.offset + len(parts[0][1])]
            pieces = [self.shapes.completion(entries, start) for (entries, _), start in zip(parts, starts)]
            shaped = {key: [v for piece in pieces for v in piece[key]] for key in pieces[0]}
        text = "".join(part_text for _, part_text in parts)
        choice.offset += len(text)
        return {"index": choice.index, "text": text, "logprobs": shaped, "finish_reason": message.finish_reason}

    def _envelope(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "system_fingerprint": None}

    def usage(self) -> dict[str, Any]:
        """Each prompt's tokens counted once, however many choices continue it (as OpenAI and
        vLLM count them); the cached ones those of its first choice."""
        firsts = self.choices[:: self.body.n]
        prompt_tokens = sum(c.prompt_tokens for c in firsts)
        completion_tokens = sum(c.completion_tokens for c in self.choices)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(c.cached_tokens for c in firsts)},
        }

    def whole(self, messages: dict[int, list[StreamOutput]]) -> dict[str, Any]:
        return {**self._envelope(False), "choices": [self._whole_choice(c, messages[c.index]) for c in self.choices], "usage": self.usage()}

    def _whole_choice(self, choice: _Choice, messages: list[StreamOutput]) -> dict[str, Any]:
        token_ids = [t for m in messages for t in m.token_ids]
        logprobs = [e for m in messages for e in m.logprobs or ()]
        text = "".join(m.text for m in messages)
        prompt_logprobs = next((m.prompt_logprobs for m in messages if m.prompt_logprobs is not None), None)
        last = dataclasses.replace(messages[-1], prompt_logprobs=prompt_logprobs)
        shaped = self._choice(choice, last, text, token_ids, logprobs, True)
        if self.body.return_token_ids:
            shaped.update(prompt_token_ids=list(choice.request.prompt_ids), token_ids=token_ids)
        return shaped

    def first_chunks(self) -> list[dict[str, Any]]:
        """Chat streams open each choice with the assistant's role, as OpenAI's do."""
        if not self.chat:
            return []
        return [
            self._chunk({"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})
            for c in self.choices
        ]

    def chunk(self, choice: _Choice, message: StreamOutput) -> dict[str, Any]:
        first = choice.first
        shaped = self._choice(choice, message, message.text, message.token_ids, message.logprobs, False)
        if self.body.return_token_ids:
            shaped["token_ids"] = message.token_ids
            if first:
                shaped["prompt_token_ids"] = list(choice.request.prompt_ids)
        return self._chunk(shaped)

    def usage_chunk(self) -> dict[str, Any]:
        return {**self._envelope(True), "choices": [], "usage": self.usage()}

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        chunk = {**self._envelope(True), "choices": [choice]}
        if self.body.continuous_usage:
            chunk["usage"] = self.usage()  # vLLM's extension: the usage so far on every chunk
        elif self.body.include_usage:
            chunk["usage"] = None  # OpenAI sends null usage on every chunk but the last
        return chunk


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _body_schema(schema: type[BaseModel]) -> dict[str, Any]:
    """The request body's JSON schema for /openapi.json, since the handlers read the body themselves
    (with pydantic's ``$defs`` written in place: a ``$ref`` in the document resolves from its root)."""
    whole = schema.model_json_schema()
    defs = whole.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(whole)}}}}
