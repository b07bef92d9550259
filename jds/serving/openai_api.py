"""The OpenAI-compatible HTTP API: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``
and ``/health``, on the same engine, admission checks and metrics as the gRPC service.

Response bodies, streamed chunks (server-sent events ending in ``data: [DONE]``), usage and error
bodies have the shapes of OpenAI's API, so its clients parse them. Refusals are 400 (with ``param``
naming the field), 404 for a model this server does not serve, 429 when the waiting queue is full
and 503 while draining. Each streamed chunk carries what one engine step produced, so a client can
time tokens from chunk arrivals. A client that disconnects aborts its request, which frees the slot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from jds.engine.interface import ServingEngine
from jds.engine.request import Request as EngineRequest
from jds.engine.request import StreamOutput
from jds.engine.sequence import RequestStream
from jds.intake import build_request, check_token_ids, encode_chat, encode_text
from jds.serving.admission import Refused, admit
from jds.serving.metrics import Metrics
from jds.serving.openai_logprobs import LogprobShapes
from jds.serving.openai_schema import ChatCompletionRequest, CompletionRequest

HTTP_STATUS = {"invalid": 400, "not_found": 404, "busy": 429, "unavailable": 503}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    500: "server_error",
}
DISCONNECT_POLL_SECONDS = 0.1
MAX_REQUEST_BYTES = 4 * 1024 * 1024
REQUEST_ID_NAMES = {"request_id": "x-request-id"}  # the header an HTTP client names its request with


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": _error(status, message, param, code)}, status_code=status)


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param, "code": code}


class _Refusal(Exception):
    """A request refused before it reaches admission: its body, its size, or its model."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.response = error_response(status, message, param, code)


def _field_path(loc: tuple) -> str:
    """``("messages", 0, "content")`` → ``messages[0].content``; pydantic's union-member tags
    (``list[int]``, ``TextPart``) are not fields and are left out."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif "[" in part or part[:1].isupper() or part in ("str", "int", "float", "bool"):
            continue
        else:
            path += f".{part}" if path else part
    return path or "body"


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
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = _field_path(tuple(first["loc"]))
        message = "is not a supported field" if first["type"] == "extra_forbidden" else first["msg"]
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
        self.app = self._build_app()

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="jds: OpenAI-compatible API", docs_url=None, redoc_url=None)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
            return error_response(exc.status_code, str(exc.detail))  # an unknown path or method, in OpenAI's shape

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
            if model_id != self.model_name:
                return self._unknown_model(model_id)
            return JSONResponse(self._model_card())

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
            "created": 0,
            "owned_by": "jds",
            "max_model_len": engine.max_seq_len,
            "vocab_size": engine.model.arch.vocab_size,
            "devices": len(engine.placement.devices),
        }

    def _unknown_model(self, name: str) -> JSONResponse:
        return error_response(404, *self._unknown_model_error(name))

    def _unknown_model_error(self, name: str) -> tuple[str, str, str]:
        self.metrics.rejected.labels("NOT_FOUND").inc()
        return f"model: {name!r} is not served here; this server serves {self.model_name!r}", "model", "model_not_found"

    # -- requests -----------------------------------------------------------------------------

    def _completion_request(self, body: CompletionRequest, request_id: str | None) -> Callable[[], EngineRequest]:
        def build() -> EngineRequest:
            body.unsupported()
            prompt = body.single_prompt()
            ids = encode_text(self.engine, prompt, "prompt") if isinstance(prompt, str) else check_token_ids(self.engine, prompt, "prompt")
            return build_request(self.engine, ids, "prompt", body.sampling_options(body.max_tokens), request_id, REQUEST_ID_NAMES)

        return build

    def _chat_request(self, body: ChatCompletionRequest, request_id: str | None) -> Callable[[], EngineRequest]:
        def build() -> EngineRequest:
            body.unsupported()
            ids = encode_chat(
                self.engine, body.conversation(), "messages", body.add_generation_prompt, body.continue_final_message, body.chat_template_kwargs
            )
            limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
            name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
            if limit is None:  # as in OpenAI's chat API: until the model stops or the context is full
                limit = max(1, self.engine.max_seq_len - len(ids))
            names = {"max_tokens": name, "logprobs": "top_logprobs", **REQUEST_ID_NAMES}
            return build_request(self.engine, ids, "messages", body.sampling_options(limit), request_id, names)

        return build

    async def _serve(self, http: Request, schema: type[BaseModel], builder: Callable[[Any, str | None], Callable[[], EngineRequest]]):
        """Read, parse, check and admit a request; the parsing, tokenizing and template rendering
        run on a worker thread, so that other clients and health checks are answered meanwhile.
        An ``X-Request-Id`` header (as vLLM takes it) names the request, and comes back."""
        request_id = http.headers.get("x-request-id")
        try:
            raw = await self._read_body(http)
            body, request, stream = await self._off_loop(self._admit, raw, schema, builder, request_id)
        except _Refusal as refusal:
            return refusal.response
        except Refused as refusal:
            return error_response(HTTP_STATUS[refusal.kind], str(refusal), refusal.field)
        reply = _Reply(request, self.model_name, body, self.shapes)
        headers = {"x-request-id": request.request_id}
        if body.stream:
            return StreamingResponse(self._events(request, stream, reply), media_type="text/event-stream", headers=headers)
        response = await self._whole(request, stream, reply, http)
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

    async def _off_loop(self, admit_body: Callable, *args) -> tuple[Any, EngineRequest, RequestStream]:
        """Run ``admit_body`` on a worker thread. If this handler is cancelled meanwhile (the client
        left), a request the thread still admits is aborted at once instead of running unread."""
        work = asyncio.get_running_loop().run_in_executor(None, admit_body, *args)
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            work.add_done_callback(self._abort_admitted)
            raise

    def _abort_admitted(self, work: asyncio.Future) -> None:
        if not work.cancelled() and work.exception() is None:
            self.engine.abort(work.result()[1].request_id)

    def _admit(self, raw: bytes, schema: type[BaseModel], builder, request_id: str | None) -> tuple[Any, EngineRequest, RequestStream]:
        try:
            body = parse_body(raw, schema)
        except _Refusal:
            self.metrics.rejected.labels("INVALID_ARGUMENT").inc()
            raise
        if body.model != self.model_name:
            raise _Refusal(404, *self._unknown_model_error(body.model))
        request, stream = admit(self.engine, self.accepting, self.metrics, builder(body, request_id))
        return body, request, stream

    async def _whole(self, request: EngineRequest, stream: RequestStream, reply: _Reply, http: Request) -> JSONResponse:
        """Collect the whole answer, aborting the request if the client goes away meanwhile."""
        watcher = asyncio.create_task(self._abort_on_disconnect(http, request.request_id))
        try:
            messages = [message async for message in stream]
        finally:
            watcher.cancel()
        last = messages[-1]
        reply.completion_tokens = sum(len(m.token_ids) for m in messages)
        self._finished(reply, last)
        if last.finish_reason == "error":
            return error_response(503 if last.unavailable else 500, f"generation failed: {last.error}")
        return JSONResponse(reply.whole(messages))

    async def _abort_on_disconnect(self, http: Request, request_id: str) -> None:
        while not await http.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_SECONDS)
        self.engine.abort(request_id)

    async def _events(self, request: EngineRequest, stream: RequestStream, reply: _Reply) -> AsyncIterator[str]:
        """Server-sent events; if the client disconnects, the server stops iterating here and the
        ``finally`` aborts the request."""
        finished = False
        try:
            first = reply.first_chunk()
            if first is not None:
                yield _event(first)
            async for message in stream:
                if message.finish_reason == "error":
                    finished = True
                    self._finished(reply, message)
                    yield _event({"error": _error(503 if message.unavailable else 500, f"generation failed: {message.error}")})
                    break
                reply.completion_tokens += len(message.token_ids)
                yield _event(reply.chunk(message))
                if message.finished:
                    finished = True
                    self._finished(reply, message)
                    if reply.body.include_usage:
                        yield _event(reply.usage_chunk())
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away: nobody reads the rest, so count it here
                self.engine.abort(request.request_id)
                self.metrics.finished("abort", reply.prompt_tokens, reply.completion_tokens, None)

    def _finished(self, reply: _Reply, last: StreamOutput) -> None:
        reply.cached_tokens = last.timings.cached_tokens if last.timings is not None else 0
        self.metrics.finished(last.finish_reason, reply.prompt_tokens, reply.completion_tokens, last.timings)


class _Reply:
    """The response of one request under construction: ids, shapes, and its token count."""

    def __init__(self, request: EngineRequest, model: str, body, shapes: LogprobShapes):
        self.chat = isinstance(body, ChatCompletionRequest)
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{request.request_id}"
        self.model = model
        self.body = body
        self.prompt_ids = request.prompt_ids
        self.shapes = shapes
        self.completion_tokens = 0
        self.cached_tokens = 0  # known at the end
        self.created = int(time.time())
        self.echo = not self.chat and body.echo  # completions that repeat the prompt before the completion
        self._offset = 0  # characters of the choice's text sent so far (completions' text_offset)
        self._first = True

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def _prompt_text(self) -> str:
        prompt = self.body.single_prompt()
        return prompt if isinstance(prompt, str) else "".join(self.shapes.text(t) for t in prompt)

    def _choice(self, message: StreamOutput, text: str, token_ids: list[int], logprobs, whole: bool) -> dict[str, Any]:
        """One choice: a chat message (or, streamed, a delta), or a completion's text, with the
        log-probabilities of its tokens (and, on the first, of an echoed prompt's) if asked for."""
        first, self._first = self._first, False
        if self.chat:
            key, value = ("message", {"role": "assistant", "content": text}) if whole else ("delta", {"content": text})
            shaped = self.shapes.chat(logprobs) if self.body.logprobs else None
            return {"index": 0, key: value, "logprobs": shaped, "finish_reason": message.finish_reason}
        entries = list(zip(token_ids, logprobs or [None] * len(token_ids)))
        if first and self.echo:
            text = self._prompt_text() + text
            entries = list(zip(self.prompt_ids, message.prompt_logprobs or [None] * self.prompt_tokens)) + entries
        shaped = None if self.body.logprobs is None else self.shapes.completion(entries, self._offset)
        self._offset += len(text)
        return {"index": 0, "text": text, "logprobs": shaped, "finish_reason": message.finish_reason}

    def _envelope(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "system_fingerprint": None}

    def usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }

    def whole(self, messages: list[StreamOutput]) -> dict[str, Any]:
        token_ids = [t for m in messages for t in m.token_ids]
        logprobs = [e for m in messages for e in m.logprobs or ()]
        text = "".join(m.text for m in messages)
        prompt_logprobs = next((m.prompt_logprobs for m in messages if m.prompt_logprobs is not None), None)
        last = dataclasses.replace(messages[-1], prompt_logprobs=prompt_logprobs)
        choice = self._choice(last, text, token_ids, logprobs, True)
        if self.body.return_token_ids:
            choice.update(prompt_token_ids=list(self.prompt_ids), token_ids=token_ids)
        return {**self._envelope(False), "choices": [choice], "usage": self.usage()}

    def first_chunk(self) -> dict[str, Any] | None:
        """Chat streams open with the assistant's role, as OpenAI's do."""
        if not self.chat:
            return None
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return self._chunk(choice)

    def chunk(self, message: StreamOutput) -> dict[str, Any]:
        first = self._first
        choice = self._choice(message, message.text, message.token_ids, message.logprobs, False)
        if self.body.return_token_ids:
            choice["token_ids"] = message.token_ids
            if first:
                choice["prompt_token_ids"] = list(self.prompt_ids)
        return self._chunk(choice)

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
