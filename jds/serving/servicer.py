"""The ``jds.v1.Generation`` service: protocol messages in, engine requests out, streams back.

Every refusal is INVALID_ARGUMENT (or RESOURCE_EXHAUSTED, UNAVAILABLE) with a message that starts
with the request field it is about, bytes that are no valid message included (``register``). A
client that cancels, or whose deadline passes, aborts its request in the engine through the RPC's
termination callback, which frees its slot and KV.
"""

from __future__ import annotations

import dataclasses
import threading

import grpc
from google.protobuf import empty_pb2, unknown_fields
from google.protobuf.message import DecodeError

from jds.api import generation_pb2 as pb
from jds.api import generation_pb2_grpc as pb_grpc
from jds.api.logprobs import logprob_message
from jds.engine.interface import ServingEngine
from jds.engine.request import Request, RequestTimings, StreamOutput
from jds.intake import InvalidRequest, build_request, check_token_ids, encode_chat, encode_text
from jds.serving.admission import GRPC_CODES, Refused, admit
from jds.serving.metrics import Metrics, hit_rate

OPTIONAL_SAMPLING = (
    "max_tokens", "temperature", "top_p", "top_k", "seed", "min_p", "min_tokens", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "logprobs", "prompt_logprobs",
)  # fmt: skip
FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
    "error": pb.FINISH_REASON_ERROR,
}


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, engine: ServingEngine, metrics: Metrics, accepting: threading.Event):
        self.engine = engine
        self.metrics = metrics
        self.accepting = accepting  # cleared when the server drains

    # -- Generate ---------------------------------------------------------------------------

    def Generate(self, request: pb.GenerateRequest | Unparsable, context: grpc.ServicerContext):
        try:
            engine_request, stream = admit(self.engine, self.accepting, self.metrics, lambda: self.to_engine_request(request))
        except Refused as refusal:
            context.abort(getattr(grpc.StatusCode, GRPC_CODES[refusal.kind]), str(refusal))
        request_id = engine_request.request_id
        context.add_callback(lambda: self.engine.abort(request_id))  # cancel, deadline, disconnect
        prompt_tokens = len(engine_request.prompt_ids)
        completion_tokens = 0
        last: StreamOutput | None = None
        try:
            for last in stream:
                completion_tokens += len(last.token_ids)
                if last.finish_reason == "error":
                    break
                yield self._response(last, engine_request.prompt_ids, completion_tokens)
        finally:  # a cancelled RPC stops iterating before the end: count it as the abort it caused
            ended = last is not None and last.finished
            self.metrics.finished(last.finish_reason if ended else "abort", prompt_tokens, completion_tokens, last.timings if ended else None)
        if last.finish_reason == "error":
            context.abort(grpc.StatusCode.UNAVAILABLE if last.unavailable else grpc.StatusCode.INTERNAL, f"generation failed: {last.error}")

    def _response(self, message: StreamOutput, prompt_ids: tuple[int, ...], completion_tokens: int) -> pb.GenerateResponse:
        response = pb.GenerateResponse(request_id=message.request_id, token_ids=message.token_ids, text=message.text)
        if message.logprobs:
            response.logprobs.extend(logprob_message(entry) for entry in message.logprobs)
        if message.prompt_logprobs is not None:
            response.prompt_logprobs.extend(logprob_message(entry, token) for entry, token in zip(message.prompt_logprobs, prompt_ids))
        if message.finished:
            response.finish_reason = FINISH_REASONS[message.finish_reason]
            cached = message.timings.cached_tokens if message.timings is not None else 0
            response.usage.CopyFrom(pb.Usage(prompt_tokens=len(prompt_ids), completion_tokens=completion_tokens, cached_tokens=cached))
            response.timings.CopyFrom(_timings(message.timings))
        return response

    def to_engine_request(self, request: pb.GenerateRequest | Unparsable) -> Request:
        """Validate every field and build the engine's request; InvalidRequest names the field."""
        if isinstance(request, Unparsable):
            raise InvalidRequest(request.field, request.detail)
        prompt_ids, field = self._prompt(request)
        options = {name: getattr(request, name) for name in OPTIONAL_SAMPLING if request.HasField(name)}
        options.update(stop=tuple(request.stop), stop_token_ids=tuple(request.stop_token_ids), ignore_eos=request.ignore_eos)
        options.update(logit_bias=dict(request.logit_bias))
        request_id = request.request_id if request.HasField("request_id") else None
        return build_request(self.engine, prompt_ids, field, options, request_id)

    def _prompt(self, request: pb.GenerateRequest) -> tuple[tuple[int, ...], str]:
        given = [name for name in ("text", "messages", "token_ids") if getattr(request, name)]
        if len(given) != 1:
            detail = "none was given (or it was empty)" if not given else f"got {' and '.join(given)}"
            raise InvalidRequest("input", f"give exactly one of text, messages or token_ids; {detail}")
        field = given[0]
        if field == "token_ids":
            return check_token_ids(self.engine, request.token_ids, field), field
        if field == "text":
            return encode_text(self.engine, request.text, field), field
        return encode_chat(self.engine, [{"role": m.role, "content": m.content} for m in request.messages], field), field

    # -- ModelInfo --------------------------------------------------------------------------

    def ModelInfo(self, request: pb.ModelInfoRequest | Unparsable, context: grpc.ServicerContext) -> pb.ModelInfoResponse:
        if isinstance(request, Unparsable):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{request.field}: {request.detail}")
        model = self.engine.model
        arch = model.arch
        in_use, total = self.engine.slot_usage()
        pages_in_use, pages_total = self.engine.page_usage()
        prefill_in_use, prefill_total = self.engine.prefill_page_usage()
        queried, hits = self.engine.prefix_cache_usage()
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
            placement=self.engine.placement.describe(),
            slots_total=total,
            slots_in_use=in_use,
            waiting=self.engine.num_waiting,
            running=self.engine.num_running,
            devices=len(self.engine.placement.devices),
            quantization=model.quantization,
            kv_pages_total=pages_total,
            kv_pages_in_use=pages_in_use,
            prefix_cache_queried_tokens=queried,
            prefix_cache_hit_tokens=hits,
            prefix_cache_hit_rate=hit_rate((queried, hits)),
            prefill_kv_pages_total=prefill_total,
            prefill_kv_pages_in_use=prefill_in_use,
        )


@dataclasses.dataclass(frozen=True)
class Unparsable:
    """Request bytes that are no valid message, handed to the method so that it refuses them as
    INVALID_ARGUMENT naming the field (gRPC's own answer to a message it cannot read is INTERNAL)."""

    field: str
    detail: str


def register(servicer: GenerationServicer, server: grpc.Server) -> None:
    """``add_GenerationServicer_to_server``, with request parsing that never fails the call."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=_lenient(pb.GenerateRequest), response_serializer=pb.GenerateResponse.SerializeToString
        ),
        "ModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.ModelInfo, request_deserializer=_lenient(pb.ModelInfoRequest), response_serializer=pb.ModelInfoResponse.SerializeToString
        ),
    }
    service = pb.DESCRIPTOR.services_by_name["Generation"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))


def _lenient(message_type):
    def parse(raw: bytes):
        try:
            return message_type.FromString(raw)
        except DecodeError:
            field = _bad_utf8_field(raw, message_type.DESCRIPTOR)
            if field is not None:
                return Unparsable(field, "is not valid UTF-8")
            return Unparsable("request", f"is not a valid {message_type.DESCRIPTOR.full_name} message")

    return parse


def _bad_utf8_field(raw: bytes, descriptor, prefix: str = "") -> str | None:
    """The first string field (``messages[1].content``) whose bytes are not UTF-8, read from the wire."""
    holder = empty_pb2.Empty()  # no fields of its own: every field of ``raw`` stays unknown, as bytes
    try:
        holder.MergeFromString(raw)
    except DecodeError:
        return None
    seen: dict[int, int] = {}
    for item in unknown_fields.UnknownFieldSet(holder):
        field = descriptor.fields_by_number.get(item.field_number)
        if field is None or item.wire_type != 2:  # only length-delimited fields hold strings
            continue
        index = seen[item.field_number] = seen.get(item.field_number, -1) + 1
        name = prefix + field.name + (f"[{index}]" if field.is_repeated else "")
        if field.type == field.TYPE_STRING:
            try:
                item.data.decode("utf-8")
            except UnicodeDecodeError:
                return name
        elif field.type == field.TYPE_MESSAGE:
            inner = _bad_utf8_field(item.data, field.message_type, name + ".")
            if inner is not None:
                return inner
    return None


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
