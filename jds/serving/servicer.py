"""The ``jds.v1.Generation`` service: protocol messages in, engine requests out, streams back.

Every refusal is INVALID_ARGUMENT (or RESOURCE_EXHAUSTED, UNAVAILABLE) with a message that starts
with the request field it is about. A client that cancels, or whose deadline passes, aborts its
request in the engine through the RPC's termination callback, which frees its slot and KV.
"""

from __future__ import annotations

import threading
import uuid

import grpc

from jds.api import generation_pb2 as pb
from jds.api import generation_pb2_grpc as pb_grpc
from jds.engine.engine import Engine, QueueFull, describe
from jds.engine.request import Request, RequestOutput, RequestTimings, StreamOutput
from jds.sampling_params import SamplingParams
from jds.serving.metrics import Metrics

FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
    "error": pb.FINISH_REASON_ERROR,
}
ROLES = ("system", "user", "assistant")


class InvalidRequest(ValueError):
    """A request field the server cannot accept; the message starts with the field's name."""


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, engine: Engine, metrics: Metrics):
        self.engine = engine
        self.metrics = metrics
        self.accepting = threading.Event()
        self.accepting.set()

    # -- Generate ---------------------------------------------------------------------------

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext):
        if not self.accepting.is_set():
            self._refuse(context, grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        try:
            engine_request = self.to_engine_request(request)
            stream = self.engine.submit(engine_request)
        except InvalidRequest as exc:
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except QueueFull as exc:
            self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, f"server is busy: {exc}")
        except ValueError as exc:  # the engine's own checks (prompt, stop ids, request id)
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        request_id = engine_request.request_id
        context.add_callback(lambda: self.engine.abort(request_id))  # cancel, deadline, disconnect
        tokens: list[int] = []
        last: StreamOutput | None = None
        for last in stream:
            tokens += last.token_ids
            if last.finish_reason == "error":
                break
            yield self._response(last, len(engine_request.prompt_ids), len(tokens))
        output = RequestOutput(request_id, list(engine_request.prompt_ids), tokens, "", last.finish_reason, last.timings, last.error)
        self.metrics.finished(output)
        if last.finish_reason == "error":
            context.abort(grpc.StatusCode.INTERNAL, f"generation failed: {last.error}")

    def _refuse(self, context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
        self.metrics.rejected.labels(code.name).inc()
        context.abort(code, message)

    def _response(self, message: StreamOutput, prompt_tokens: int, completion_tokens: int) -> pb.GenerateResponse:
        response = pb.GenerateResponse(request_id=message.request_id, token_ids=message.token_ids, text=message.text)
        if message.finished:
            response.finish_reason = FINISH_REASONS[message.finish_reason]
            response.usage.CopyFrom(pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens))
            response.timings.CopyFrom(_timings(message.timings))
        return response

    def to_engine_request(self, request: pb.GenerateRequest) -> Request:
        """Validate every field and build the engine's request; InvalidRequest names the field."""
        prompt_ids, field = self._prompt(request)
        max_seq_len = self.engine.max_seq_len
        if len(prompt_ids) >= max_seq_len:
            raise InvalidRequest(
                f"{field}: the prompt has {len(prompt_ids)} tokens; max_seq_len is {max_seq_len} (prompt plus at least one output token)"
            )
        vocab = self.engine.model.arch.vocab_size
        if any(not 0 <= t < vocab for t in request.stop_token_ids):
            raise InvalidRequest(f"stop_token_ids: ids must be in [0, {vocab}); got {list(request.stop_token_ids)[:8]}")
        max_tokens = request.max_tokens if request.HasField("max_tokens") else SamplingParams.max_tokens
        if max_tokens > max_seq_len - len(prompt_ids):
            raise InvalidRequest(
                f"max_tokens: {max_tokens} is beyond the limit: the prompt has {len(prompt_ids)} tokens and max_seq_len is "
                f"{max_seq_len}, so at most {max_seq_len - len(prompt_ids)} can be generated"
            )
        options = {name: getattr(request, name) for name in ("max_tokens", "temperature", "top_p", "top_k", "seed") if request.HasField(name)}
        try:
            params = SamplingParams(
                **options, stop=tuple(request.stop), stop_token_ids=tuple(request.stop_token_ids), ignore_eos=request.ignore_eos
            )
        except ValueError as exc:  # "SamplingParams.top_p must be in (0, 1], got 2.0"
            raise InvalidRequest(str(exc).removeprefix("SamplingParams.").replace(" ", ": ", 1)) from None
        request_id = request.request_id if request.HasField("request_id") else uuid.uuid4().hex
        if not request_id:
            raise InvalidRequest("request_id: must not be empty when given")
        return Request(request_id, prompt_ids, params, params.resolved_seed())

    def _prompt(self, request: pb.GenerateRequest) -> tuple[tuple[int, ...], str]:
        given = [name for name in ("text", "messages", "token_ids") if getattr(request, name)]
        if len(given) != 1:
            detail = "none was given (or it was empty)" if not given else f"got {' and '.join(given)}"
            raise InvalidRequest(f"input: give exactly one of text, messages or token_ids; {detail}")
        field = given[0]
        tokenizer = self.engine.model.tokenizer
        if field == "token_ids":
            vocab = self.engine.model.arch.vocab_size
            bad = [t for t in request.token_ids if not 0 <= t < vocab]
            if bad:
                raise InvalidRequest(f"token_ids: ids must be in [0, {vocab}); got {bad[:8]}")
            return tuple(request.token_ids), field
        if tokenizer is None:
            raise InvalidRequest(f"{field}: this model serves token ids only (it has no tokenizer); send token_ids")
        if field == "text":
            ids = tuple(tokenizer.encode(request.text))
        else:
            for i, m in enumerate(request.messages):
                if m.role not in ROLES:
                    raise InvalidRequest(f"messages[{i}].role: must be one of {', '.join(ROLES)}; got {m.role!r}")
            try:
                ids = tuple(tokenizer.encode_chat([{"role": m.role, "content": m.content} for m in request.messages]))
            except ValueError as exc:
                raise InvalidRequest(f"messages: {exc}") from None
        if not ids:
            raise InvalidRequest(f"{field}: encodes to no tokens")
        return ids, field

    # -- ModelInfo --------------------------------------------------------------------------

    def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfoResponse:
        model = self.engine.model
        arch = model.arch
        in_use, total = self.engine.slot_usage()
        return pb.ModelInfoResponse(
            model_name=model.name,
            num_params=arch.num_params(),
            vocab_size=arch.vocab_size,
            hidden_size=arch.hidden_size,
            num_layers=arch.num_layers,
            num_heads=arch.num_heads,
            num_kv_heads=arch.num_kv_heads,
            max_seq_len=self.engine.max_seq_len,
            dtype=str(model.dtype),
            placement=describe(self.engine.placement),
            slots_total=total,
            slots_in_use=in_use,
            waiting=self.engine.num_waiting,
            running=self.engine.num_running,
            devices=len(self.engine.placement.devices),
        )


def _timings(t: RequestTimings | None) -> pb.Timings:
    if t is None:
        return pb.Timings()
    end = t.finished if t.finished is not None else t.arrival
    return pb.Timings(
        queue=t.queue or 0.0,
        prefill=t.prefill or 0.0,
        transfer=t.transfer_seconds,
        transfer_bytes=t.transfer_bytes,
        ttft=t.ttft or 0.0,
        tpot=t.tpot or 0.0,
        e2e=end - t.arrival,
    )
