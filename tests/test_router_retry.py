"""The router against instances that fail on purpose: a decode instance whose device fault took
a request's KV (ABORTED) gets that request prefilled again once, and the client sees each token
once, in order. The instances here are real gRPC servers speaking ``jds.instances``, scripted,
so the fault happens where the test says; the processes' own behaviour is in test_cluster.py."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest

from jds.api import instances_pb2 as ipb
from jds.api import instances_pb2_grpc as ipb_grpc
from jds.cluster.router import Router
from jds.config import ClusterSection, load_config
from jds.config.placement import Placement
from jds.engine.request import Request
from jds.model.loader import load_model
from jds.sampling_params import SamplingParams
from tests_paths import CONFIGS

FIRST = 7
DECODED = [11, 12, 13, 14, 15]  # what the decode instance streams after the first token, every time


class _Prefill(ipb_grpc.PrefillInstanceServicer):
    def __init__(self):
        self.calls = 0

    def Status(self, request, context):
        return ipb.InstanceStatus(role="prefill", name="prefill0", max_seq_len=512)

    def Prefill(self, request, context):
        self.calls += 1
        return ipb.PrefillResponse(first_token=FIRST, kv=ipb.KVOffer(uuid=self.calls), prefill_seconds=0.001)

    def Release(self, request, context):
        return ipb.ReleaseResponse(released=True)


class _Decode(ipb_grpc.DecodeInstanceServicer):
    """Streams ``DECODED``; the first ``faults`` calls end after two tokens with the error a
    decode process gives when a device fault took the request's KV."""

    def __init__(self, faults: int, replay: list[int] = DECODED, pages: int = 64, free: int = 4):
        self.faults, self.replay, self.calls = faults, replay, 0
        self.pages, self.free = pages, free

    def Status(self, request, context):
        return ipb.InstanceStatus(
            role="decode", name="decode0", slots_total=4, slots_free=self.free, max_seq_len=512, kv_pages_total=self.pages
        )  # fmt: skip

    def Decode(self, request, context):
        self.calls += 1
        assert request.first_token == FIRST
        tokens = DECODED if self.calls == 1 else self.replay
        for i, token in enumerate(tokens):
            if self.calls <= self.faults and i == 2:
                context.abort(grpc.StatusCode.ABORTED, "KV lost: decode step failed: injected device fault")
            yield ipb.DecodeResponse(token_ids=[token], finished=i == len(tokens) - 1)


@pytest.fixture(scope="module")
def tiny():
    return load_model(load_config(CONFIGS / "tiny.yaml"), progress=False, weights=False)


def _serve(servicer, add) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(4))
    add(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def _route(tiny, decode: _Decode) -> tuple[list[int], str, str | None, _Prefill]:
    prefill = _Prefill()
    servers, addresses = zip(
        _serve(prefill, ipb_grpc.add_PrefillInstanceServicer_to_server), _serve(decode, ipb_grpc.add_DecodeInstanceServicer_to_server)
    )
    placement = Placement.model_validate({"mode": "disaggregated", "prefill": {"devices": [0]}, "decode": {"devices": [1]}})
    router = Router(tiny, placement, ClusterSection(prefill=[addresses[0]], decode=[addresses[1]], health_seconds=0.1))
    try:
        assert router.registry.wait_ready(10)
        stream = router.submit(Request("r", (1, 2, 3), SamplingParams(max_tokens=6, temperature=0), seed=0))
        seen: list[int] = []
        last = None
        for last in stream:  # every token the client is sent, as it is sent
            seen += last.token_ids
        return seen, last.finish_reason, last.error, prefill
    finally:
        router.shutdown()
        for server in servers:
            server.stop(0)


def test_a_request_whose_kv_a_device_fault_took_is_prefilled_again_and_streams_each_token_once(tiny):
    decode = _Decode(faults=1)
    seen, reason, error, prefill = _route(tiny, decode)
    assert (reason, error) == ("length", None)
    assert seen == [FIRST, *DECODED]
    assert prefill.calls == 2 and decode.calls == 2


def test_a_second_fault_fails_the_request(tiny):
    decode = _Decode(faults=2)
    seen, reason, error, prefill = _route(tiny, decode)
    assert reason == "error" and "KV lost" in error
    assert seen == [FIRST, *DECODED[:2]] and prefill.calls == 2


def test_a_replay_that_differs_fails_instead_of_streaming_other_tokens(tiny):
    decode = _Decode(faults=1, replay=[11, 99, 13, 14, 15])
    seen, reason, error, _ = _route(tiny, decode)
    assert reason == "error" and "other tokens" in error
    assert seen == [FIRST, *DECODED[:2]]


def test_a_decode_process_reports_kv_a_fault_took_as_aborted():
    """What the router retries on comes from the decode process: a request the decode batch
    cannot requeue itself ends with a ``KV lost`` error, which its service answers as ABORTED."""
    import threading
    from types import SimpleNamespace

    from jds.cluster.decode_role import _error_code
    from jds.engine.decode import DecodeBatch
    from jds.engine.kv_pool import KVPool
    from jds.engine.sequence import Sequence

    batch = DecodeBatch(SimpleNamespace(slots=2), KVPool(2, 8, 16, 64, threading.Condition()), requeue=None)
    seq = Sequence(Request("r", (1, 2, 3), SamplingParams(max_tokens=4), seed=0), None, (), 64)
    batch.retry_or_fail(seq, "decode step failed: injected")
    out = next(iter(seq.stream()))
    assert out.finish_reason == "error" and _error_code(out.error) == grpc.StatusCode.ABORTED
    assert _error_code("KV pull failed: gone") == grpc.StatusCode.FAILED_PRECONDITION
    assert _error_code("preempted: no KV page free for its next token") == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _error_code("decode step failed: bad row") == grpc.StatusCode.INTERNAL


def test_a_request_goes_to_a_decode_instance_whose_pages_hold_it_and_one_none_holds_is_refused(tiny):
    """An instance too small to hold a request alone would preempt it for ever: the router sends
    it where it fits, even to a busier instance, and refuses at once what fits nowhere."""
    small, large = _Decode(0, pages=2, free=4), _Decode(0, pages=4, free=0)  # the small one looks roomier
    prefill = _Prefill()
    servers, addresses = zip(
        _serve(prefill, ipb_grpc.add_PrefillInstanceServicer_to_server),
        *(_serve(d, ipb_grpc.add_DecodeInstanceServicer_to_server) for d in (small, large)),
    )
    placement = Placement.model_validate({"mode": "disaggregated", "prefill": {"devices": [0]}, "decode": [{"devices": [1]}, {"devices": [2]}]})
    page = placement.page_size
    router = Router(tiny, placement, ClusterSection(prefill=[addresses[0]], decode=list(addresses[1:]), health_seconds=0.1))
    greedy = SamplingParams(max_tokens=6, temperature=0)
    try:
        assert router.registry.wait_ready(10)
        long_prompt = tuple(range(1, 2 * page + 20))  # with max_tokens, more than the small instance's 2 pages
        assert [o.finish_reason for o in router.submit(Request("long", long_prompt, greedy, seed=0))][-1] == "length"
        assert (small.calls, large.calls) == (0, 1)
        assert [o.finish_reason for o in router.submit(Request("short", (1, 2, 3), greedy, seed=0))][-1] == "length"
        assert (small.calls, large.calls) == (1, 1)
        with pytest.raises(ValueError, match="max_tokens"):
            router.submit(Request("too-long", tuple(range(1, 4 * page + 1)), greedy, seed=0))
        assert prefill.calls == 2
    finally:
        router.shutdown()
        for server in servers:
            server.stop(0)
