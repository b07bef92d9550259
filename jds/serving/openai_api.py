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
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from jds.engine.engine import Engine
from jds.engine.request import Request as EngineRequest
from jds.engine.request import StreamOutput
from jds.engine.sequence import RequestStream
from jds.serving.admission import Refused, admit, build_request, check_token_ids, encode_chat, encode_text
from jds.serving.metrics import Metrics
from jds.serving.openai_schema import ChatCompletionRequest, CompletionRequest

HTTP_STATUS = {"invalid": 400, "not_found": 404, "busy": 429, "unavailable": 503}
ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable", 500: "server_error"}
DISCONNECT_POLL_SECONDS = 0.1


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": _error(status, message, param, code)}, status_code=status)


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param, "code": code}


def _field_path(loc: tuple) -> str:
    """``("body", "messages", 0, "content")`` → ``messages[0].content``; pydantic's union-member
    tags (``list[int]``, ``TextPart``) are not fields and are left out."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif "[" in part or part[:1].isupper() or part in ("str", "int", "float", "bool"):
            continue
        else:
            path += f".{part}" if path else part
    return path or "body"


class OpenAIFrontend:
    """The FastAPI application and the state its handlers share with the gRPC service."""

    def __init__(self, engine: Engine, metrics: Metrics, accepting: threading.Event):
        self.engine = engine
        self.metrics = metrics
        self.accepting = accepting
        self.model_name = engine.model.name
        self.app = self._build_app()

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="jds: OpenAI-compatible API", docs_url=None, redoc_url=None)

        @app.exception_handler(RequestValidationError)
        async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
            first = exc.errors()[0]
            field = _field_path(tuple(first["loc"]))
            message = "is not a supported field" if first["type"] == "extra_forbidden" else first["msg"]
            self.metrics.rejected.labels("INVALID_ARGUMENT").inc()
            return error_response(400, f"{field}: {message}", field)

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

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest, http: Request):
            return await self._serve(body, http, self._completion_request(body))

        @app.post("/v1/chat/completions")
        async def chat_completions(body: ChatCompletionRequest, http: Request):
            return await self._serve(body, http, self._chat_request(body))

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
        self.metrics.rejected.labels("NOT_FOUND").inc()
        return error_response(404, f"model: {name!r} is not served here; this server serves {self.model_name!r}", "model", "model_not_found")

    # -- requests -----------------------------------------------------------------------------

    def _completion_request(self, body: CompletionRequest) -> Callable[[], EngineRequest]:
        def build() -> EngineRequest:
            body.unsupported()
            prompt = body.single_prompt()
            ids = encode_text(self.engine, prompt, "prompt") if isinstance(prompt, str) else check_token_ids(self.engine, prompt, "prompt")
            return build_request(self.engine, ids, "prompt", body.sampling_options(body.max_tokens))

        return build

    def _chat_request(self, body: ChatCompletionRequest) -> Callable[[], EngineRequest]:
        def build() -> EngineRequest:
            body.unsupported()
            ids = encode_chat(self.engine, body.conversation())
            limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
            name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
            if limit is None:  # as in OpenAI's chat API: until the model stops or the context is full
                limit = max(1, self.engine.max_seq_len - len(ids))
            return build_request(self.engine, ids, "messages", body.sampling_options(limit), names={"max_tokens": name})

        return build

    async def _serve(self, body, http: Request, build: Callable[[], EngineRequest]):
        if body.model != self.model_name:
            return self._unknown_model(body.model)
        try:
            request, stream = admit(self.engine, self.accepting, self.metrics, build)
        except Refused as refusal:
            return error_response(HTTP_STATUS[refusal.kind], str(refusal), refusal.field)
        reply = _Reply(request.request_id, self.model_name, body, len(request.prompt_ids))
        if body.stream:
            return StreamingResponse(self._events(request, stream, reply), media_type="text/event-stream")
        return await self._whole(request, stream, reply, http)

    async def _whole(self, request: EngineRequest, stream: RequestStream, reply: _Reply, http: Request) -> JSONResponse:
        """Collect the whole answer, aborting the request if the client goes away meanwhile."""
        watcher = asyncio.create_task(self._abort_on_disconnect(http, request.request_id))
        try:
            messages = [message async for message in stream]
        finally:
            watcher.cancel()
        last = messages[-1]
        token_ids = [t for m in messages for t in m.token_ids]
        reply.completion_tokens = len(token_ids)
        self._finished(reply, last)
        if last.finish_reason == "error":
            return error_response(503 if last.unavailable else 500, f"generation failed: {last.error}")
        text = "".join(m.text for m in messages)
        return JSONResponse(reply.whole(text, token_ids, last.finish_reason, request.prompt_ids))

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
                yield _event(reply.chunk(message, request.prompt_ids))
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
        self.metrics.finished(last.finish_reason, reply.prompt_tokens, reply.completion_tokens, last.timings)


class _Reply:
    """The response of one request under construction: ids, shapes, and its token count."""

    def __init__(self, request_id: str, model: str, body, prompt_tokens: int):
        self.chat = isinstance(body, ChatCompletionRequest)
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{request_id}"
        self.model = model
        self.body = body
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.created = int(time.time())

    def choice(self, text: str, finish_reason: str | None, whole: bool) -> dict[str, Any]:
        """One choice: a chat message (or, streamed, a delta), or a completion's text."""
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        key, value = ("message", {"role": "assistant", "content": text}) if whole else ("delta", {"content": text})
        return {"index": 0, key: value, "logprobs": None, "finish_reason": finish_reason}

    def _envelope(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "system_fingerprint": None}

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def whole(self, text: str, token_ids: list[int], finish_reason: str, prompt_ids: tuple[int, ...]) -> dict[str, Any]:
        choice = self.choice(text, finish_reason, True)
        if self.body.return_token_ids:
            choice.update(prompt_token_ids=list(prompt_ids), token_ids=token_ids)
        return {**self._envelope(False), "choices": [choice], "usage": self.usage()}

    def first_chunk(self) -> dict[str, Any] | None:
        """Chat streams open with the assistant's role, as OpenAI's do."""
        if not self.chat:
            return None
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return self._chunk(choice)

    def chunk(self, message: StreamOutput, prompt_ids: tuple[int, ...]) -> dict[str, Any]:
        choice = self.choice(message.text, message.finish_reason, False)
        if self.body.return_token_ids:
            choice["token_ids"] = message.token_ids
            if self.completion_tokens == len(message.token_ids):  # the first chunk with tokens
                choice["prompt_token_ids"] = list(prompt_ids)
        return self._chunk(choice)

    def usage_chunk(self) -> dict[str, Any]:
        return {**self._envelope(True), "choices": [], "usage": self.usage()}

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        chunk = {**self._envelope(True), "choices": [choice]}
        if self.body.include_usage:
            chunk["usage"] = None  # OpenAI sends null usage on every chunk but the last
        return chunk


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"

