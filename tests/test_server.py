"""The gRPC server as a real subprocess, driven by a real gRPC client.

The server is ``tiny_server``'s: a seeded random model with few slots and waiting places.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import httpx
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from jds import SamplingParams
from jds.api import generation_pb2 as pb
from jds.api import generation_pb2_grpc as pb_grpc
from jds.bench.server_process import ServerProcess
from jds.config.placement import DEFAULT_PAGE_SIZE
from tests_paths import CONFIGS, REPO
from tiny_server import MAX_SEQ_LEN, aborted_requests, wait_idle, write_config

def _generate(stub, **fields) -> list[pb.GenerateResponse]:
    return list(stub.Generate(pb.GenerateRequest(**fields), timeout=60))


def _tokens(messages) -> list[int]:
    return [t for m in messages for t in m.token_ids]


def test_health_reflection_and_model_info(server, stub):
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "jds.v1.Generation"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answer = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in answer.list_services_response.service}
        assert {"jds.v1.Generation", "grpc.health.v1.Health"} <= names
    info = stub.ModelInfo(pb.ModelInfoRequest())
    assert (info.model_name, info.num_layers, info.max_seq_len, info.slots_total) == ("tiny-random", 4, MAX_SEQ_LEN, 4)
    assert info.kv_pages_total == 4 * MAX_SEQ_LEN // DEFAULT_PAGE_SIZE and info.kv_pages_in_use <= info.kv_pages_total  # the default: 4 rows' worth
    assert "colocated" in info.placement and info.dtype == "float32" and info.quantization == "none"


def test_streaming_matches_the_offline_api_for_text_chat_and_token_ids(stub, offline):
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    expected_text = offline.generate("The quick brown fox", greedy)[0]
    messages = _generate(stub, text="The quick brown fox", max_tokens=12, temperature=0, ignore_eos=True)
    assert len(messages) == 12 and all(len(m.token_ids) == 1 for m in messages)
    assert _tokens(messages) == expected_text.token_ids
    assert "".join(m.text for m in messages) == expected_text.text
    last = messages[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH and all(m.finish_reason == 0 for m in messages[:-1])
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(expected_text.prompt_token_ids), 12)
    assert last.timings.ttft > 0 and last.timings.tpot > 0 and last.timings.e2e >= last.timings.ttft

    chat = [{"role": "user", "content": "Say hi"}]
    expected_chat = offline.chat(chat, greedy)[0]
    messages = _generate(stub, messages=[pb.ChatMessage(**m) for m in chat], max_tokens=12, temperature=0, ignore_eos=True)
    assert _tokens(messages) == expected_chat.token_ids

    expected_ids = offline.generate([[5, 6, 7, 8]], greedy)[0]
    assert _tokens(_generate(stub, token_ids=[5, 6, 7, 8], max_tokens=12, temperature=0, ignore_eos=True)) == expected_ids.token_ids


def test_penalties_and_limits_reach_the_engine_as_offline(stub, offline):
    shaped = {"temperature": 0.8, "seed": 5, "min_p": 0.05, "min_tokens": 3, "presence_penalty": 0.5, "frequency_penalty": 0.25, "repetition_penalty": 1.3}
    expected = offline.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=8, **shaped))[0]
    assert _tokens(_generate(stub, token_ids=[5, 6, 7, 8], max_tokens=8, **shaped)) == expected.token_ids
    biased = offline.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=8, **shaped, logit_bias={300: 9.0}))[0]
    assert _tokens(_generate(stub, token_ids=[5, 6, 7, 8], max_tokens=8, **shaped, logit_bias={300: 9.0})) == biased.token_ids
    assert biased.token_ids.count(300) > expected.token_ids.count(300)


def test_logprobs_and_prompt_scores_come_with_their_tokens(stub, offline):
    expected = offline.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=3, prompt_logprobs=1))[0]
    messages = _generate(stub, token_ids=[5, 6, 7, 8], max_tokens=4, temperature=0, ignore_eos=True, logprobs=3, prompt_logprobs=1)
    assert all(len(m.logprobs) == len(m.token_ids) for m in messages)
    reported = [e for m in messages for e in m.logprobs]
    assert [e.token_id for e in reported] == expected.token_ids and all(len(e.top_ids) == 3 for e in reported)
    assert [e.logprob for e in reported] == pytest.approx([e.logprob for e in expected.logprobs], abs=1e-6)
    scored = messages[0].prompt_logprobs
    assert [e.token_id for e in scored] == [5, 6, 7, 8] and not scored[0].HasField("logprob") and not messages[1].prompt_logprobs
    assert [e.logprob for e in scored[1:]] == pytest.approx([e.logprob for e in expected.prompt_logprobs[1:]], abs=1e-6)


def test_concurrent_clients_get_what_each_gets_alone(stub):
    prompts = [[10 + i, 20 + i, 30 + i] * (i + 1) for i in range(6)]
    alone = [_tokens(_generate(stub, token_ids=p, max_tokens=10, temperature=0, ignore_eos=True)) for p in prompts]
    together: dict[int, list[int]] = {}

    def run(i: int) -> None:
        together[i] = _tokens(_generate(stub, token_ids=prompts[i], max_tokens=10, temperature=0, ignore_eos=True))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [together[i] for i in range(len(prompts))] == alone


BAD = [
    ({}, "input: give exactly one of text, messages or token_ids"),
    ({"text": ""}, "input: give exactly one"),
    ({"text": "hi", "token_ids": [1, 2]}, "input: .*got text and token_ids"),
    ({"token_ids": [1, 49152]}, r"token_ids: ids must be in \[0, 49152\)"),
    ({"token_ids": [-3]}, "token_ids: ids must be in"),
    ({"token_ids": [1] * MAX_SEQ_LEN}, f"token_ids: the prompt has {MAX_SEQ_LEN} tokens; max_seq_len is {MAX_SEQ_LEN}"),
    ({"text": "hi", "max_tokens": -5}, "max_tokens: must be an integer >= 0"),
    ({"text": "hi", "max_tokens": 1000}, "max_tokens: 1000 is beyond the limit"),
    ({"text": "hi", "temperature": -0.5}, "temperature: must be a finite number >= 0"),
    ({"text": "hi", "top_p": 0.0}, r"top_p: must be in \(0, 1\]"),
    ({"text": "hi", "top_p": 1.5}, r"top_p: must be in \(0, 1\]"),
    ({"text": "hi", "top_k": -2}, "top_k: must be an integer >= 0, or -1"),
    ({"text": "hi", "stop": [""]}, "stop: must be non-empty strings"),
    ({"text": "hi", "stop_token_ids": [60000]}, r"stop_token_ids: ids must be in \[0, 49152\)"),
    ({"text": "hi", "stop_token_ids": list(range(9))}, "stop_token_ids: at most 8"),
    ({"text": "hi", "logit_bias": {49152: 1.0}}, r"logit_bias: ids must be in \[0, 49152\)"),
    ({"text": "hi", "logit_bias": {5: 150.0}}, r"logit_bias: values must be in \[-100, 100\]"),
    ({"messages": [{"role": "robot", "content": "x"}]}, r"messages\[0\].role: must be one of system, developer, user, assistant"),
    ({"text": "hi", "request_id": ""}, "request_id: must not be empty"),
]


@pytest.mark.parametrize("fields, message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_input_is_refused_naming_the_field_and_the_server_goes_on(stub, fields, message):
    if "messages" in fields:
        fields = {**fields, "messages": [pb.ChatMessage(**m) for m in fields["messages"]]}
    with pytest.raises(grpc.RpcError) as err:
        _generate(stub, **fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.match(message, err.value.details()), err.value.details()
    assert _generate(stub, text="ok", max_tokens=2)[-1].finish_reason != 0


def test_cancel_and_deadline_free_the_slot_and_count_as_aborted(server, stub):
    before = aborted_requests(server.metrics_url)
    long = {"token_ids": [1, 2, 3], "max_tokens": MAX_SEQ_LEN - 3, "temperature": 0, "ignore_eos": True}  # outlasts the test's reads
    call = stub.Generate(pb.GenerateRequest(**long), timeout=60)
    assert next(call).token_ids and next(call).token_ids
    assert stub.ModelInfo(pb.ModelInfoRequest()).slots_in_use == 1
    call.cancel()
    info = wait_idle(stub)
    assert (info.slots_in_use, info.running) == (0, 0)

    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(pb.GenerateRequest(**long), timeout=0.2))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    info = wait_idle(stub)
    assert (info.slots_in_use, info.running) == (0, 0)
    assert aborted_requests(server.metrics_url, timeout=10, at_least=before + 2) == before + 2


def test_overload_gives_resource_exhausted_and_accepted_requests_finish(stub):
    long = pb.GenerateRequest(token_ids=[1, 2, 3], max_tokens=100, temperature=0, ignore_eos=True)
    codes: list = []

    def run() -> None:
        try:
            codes.append(list(stub.Generate(long, timeout=120))[-1].finish_reason)
        except grpc.RpcError as err:
            codes.append(err.code())

    threads = [threading.Thread(target=run) for _ in range(24)]  # 4 slots + 8 waiting places
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert codes.count(pb.FINISH_REASON_LENGTH) >= 8  # at least the waiting places; timing decides the rest
    assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, pb.FINISH_REASON_LENGTH}
    assert wait_idle(stub).running == 0


def test_a_repeated_prompt_reports_the_tokens_the_prefix_cache_held(stub):
    held = 2 * DEFAULT_PAGE_SIZE
    ids = list(range(4200, 4200 + held + 8))  # two full pages before its last token, and 8 tokens more
    before = stub.ModelInfo(pb.ModelInfoRequest())
    first, again = (_generate(stub, token_ids=ids, max_tokens=3, temperature=0.0, ignore_eos=True) for _ in range(2))
    assert (first[-1].usage.cached_tokens, again[-1].usage.cached_tokens) == (0, held)
    assert _tokens(first) == _tokens(again)
    info = stub.ModelInfo(pb.ModelInfoRequest())  # both prompts were looked up whole; two pages were held
    assert info.prefix_cache_queried_tokens - before.prefix_cache_queried_tokens == 2 * len(ids)
    assert info.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens == held
    assert info.prefix_cache_hit_rate == info.prefix_cache_hit_tokens / info.prefix_cache_queried_tokens > 0


def test_metrics_expose_histograms_gauges_and_counters(server, stub):
    _generate(stub, text="metrics", max_tokens=3)
    body = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    for name in (
        "jds_time_to_first_token_seconds_bucket",
        "jds_time_per_output_token_seconds_bucket",
        "jds_queue_seconds_bucket",
        "jds_kv_transfer_seconds_bucket",
        "jds_e2e_seconds_bucket",
        "jds_slots_in_use",
        "jds_slots_total 4.0",
        f"jds_kv_pages_total {4 * MAX_SEQ_LEN // DEFAULT_PAGE_SIZE}.0",
        "jds_kv_pages_used",
        "jds_prefill_kv_pages_total 0.0",  # a colocated server has no prefill instance
        "jds_prompt_tokens_cached_total",
        "jds_prefix_cache_hit_rate",
        "jds_waiting_requests",
        'jds_requests_total{finish_reason="length"}',
        'jds_generated_tokens_total{finish_reason="length"}',
        'jds_rejected_requests_total{code="INVALID_ARGUMENT"}',
    ):
        assert name in body, name


def test_client_command_line(server):
    run = lambda *a: subprocess.run([sys.executable, "-m", "jds.client", "--server", server.address, *a], capture_output=True, text=True, cwd=REPO, timeout=120)  # noqa: E731
    out = run("--max-tokens", "5", "--json", "hello")
    assert out.returncode == 0 and '"finish_reason": "FINISH_REASON_LENGTH"' in out.stdout
    out = run("--max-tokens", "5", "--token-ids", "--tokens", "1 2 3")
    assert out.returncode == 0 and len(out.stdout.split()) == 5
    out = run("--top-p", "3", "--max-tokens", "5", "hello")
    assert out.returncode == 1 and "INVALID_ARGUMENT: top_p" in out.stderr


def test_sigterm_drains_in_flight_requests_then_exits_zero(tmp_path):
    write_config(tmp_path / "server.yaml", cpus=[0])  # also: the placement pins the process to core 0
    proc = ServerProcess(tmp_path / "server.yaml", tmp_path / "server.log", "--no-warmup", "--log-requests", "--http-port", "0")
    try:
        with grpc.insecure_channel(proc.address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            # The longest request, so that it is still running when the late requests come
            call = stub.Generate(pb.GenerateRequest(token_ids=[1, 2, 3], max_tokens=MAX_SEQ_LEN - 3, temperature=0, ignore_eos=True), timeout=120)
            first = next(call)
            status = open(f"/proc/{proc.proc.pid}/status").read()
            assert re.search(r"Cpus_allowed_list:\s*0\n", status), status
            proc.proc.send_signal(signal.SIGTERM)
            with httpx.Client(timeout=10) as http:
                while http.get(proc.openai_url.removesuffix("/v1") + "/health").status_code == 200:  # until the drain begins
                    time.sleep(0.01)
                with pytest.raises(grpc.RpcError) as err:
                    _generate(stub, text="late", max_tokens=2)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                late = http.post(f"{proc.openai_url}/completions", json={"model": "tiny-random", "prompt": "late"})
                assert late.status_code == 503 and "shutting down" in late.json()["error"]["message"]
            rest = list(call)
            assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH  # finished, not aborted
            assert len(first.token_ids) + len(_tokens(rest)) == MAX_SEQ_LEN - 3
        assert proc.proc.wait(60) == 0
        assert "draining" in proc.text() and "stopped" in proc.text()
        assert f"finished (length): prompt 3, output {MAX_SEQ_LEN - 3} tokens" in proc.text()  # --log-requests
    finally:
        proc.stop()


def test_a_placement_that_cannot_fit_is_refused_before_loading():
    out = subprocess.run(
        [sys.executable, "-m", "jds.server", "--config", str(CONFIGS / "llama7b.yaml"), "--port", "0"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert out.returncode == 1
    assert "placement needs" in out.stderr and "GiB is usable" in out.stderr and "lower kv_pages, kv_memory_gb, or slots or max_seq_len" in out.stderr


def _start_refused(config, *args: str) -> str:
    """A server start that must fail at once: its one-line error (no traceback, no weight read)."""
    out = subprocess.run([sys.executable, "-m", "jds.server", "--config", str(config), *args], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode in (1, 2) and "Traceback" not in out.stderr and "parameters" not in out.stderr, out.stderr
    return out.stderr


def test_a_server_that_cannot_listen_is_refused_before_loading(tmp_path):
    import socket

    import trustme

    tiny = CONFIGS / "tiny.yaml"
    with socket.create_server(("127.0.0.1", 0)) as taken:
        busy = taken.getsockname()[1]
        assert f"--port {busy}: cannot listen on 127.0.0.1:{busy} (Address already in use)" in _start_refused(tiny, "--port", str(busy))
        assert f"--metrics-port {busy}: cannot listen" in _start_refused(tiny, "--port", "0", "--metrics-port", str(busy))
    assert "--metrics-port 8123: is also --http-port 8123" in _start_refused(tiny, "--port", "0", "--http-port", "8123", "--metrics-port", "8123")
    write_config(tmp_path / "same.yaml", port=50099, metrics_port=50099)
    assert "server.metrics_port 50099: is also server.port 50099" in _start_refused(tmp_path / "same.yaml")
    assert "argument --port: 70000 is not a port" in _start_refused(tiny, "--port", "70000")
    assert "argument --api-key: an API key must not be empty" in _start_refused(tiny, "--api-key", "")
    assert "--role router: needs placement.mode disaggregated" in _start_refused(tiny, "--role", "router", "--port", "0")
    # a key that is not the certificate's
    authority = trustme.CA()
    authority.issue_cert("127.0.0.1").cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    authority.issue_cert("127.0.0.1").private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    write_config(tmp_path / "tls.yaml", tls={"cert": "cert.pem", "key": "key.pem"})
    assert "server.tls: the key" in _start_refused(tmp_path / "tls.yaml", "--port", "0", "--metrics-port", "0")
    # YAML's rules: a key given twice, a boolean for a number
    (tmp_path / "twice.yaml").write_text(tiny.read_text() + "\nserver: {port: 1}\nserver: {http_port: 2}\n")
    assert "key 'server' is given twice" in _start_refused(tmp_path / "twice.yaml")
    write_config(tmp_path / "bool.yaml", port=True)
    assert "server.port: Input should be a valid integer" in _start_refused(tmp_path / "bool.yaml")


def test_a_role_process_checks_the_placement_before_loading(tmp_path):
    config = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    config["placement"] = {"mode": "disaggregated", "prefill": {"devices": [0, 1, 2], "tp": 3}, "decode": {"devices": [3]}}
    config["cluster"] = {"prefill": ["127.0.0.1:1"], "decode": ["127.0.0.1:2"]}
    (tmp_path / "tp3.yaml").write_text(yaml.safe_dump(config))
    assert "placement.prefill[0].tp: 3 does not divide the model's num_heads" in _start_refused(tmp_path / "tp3.yaml", "--role", "prefill")


@pytest.mark.parametrize("proto", ["generation", "instances"])
def test_generated_protocol_code_is_in_sync_with_the_proto(tmp_path, proto):
    from grpc_tools import protoc

    (tmp_path / "jds" / "api").mkdir(parents=True)
    source = f"jds/api/{proto}.proto"
    for name in ("generation", "instances"):  # instances.proto imports generation.proto
        (tmp_path / f"jds/api/{name}.proto").write_text((REPO / f"jds/api/{name}.proto").read_text())
    assert protoc.main(["protoc", f"-I{tmp_path}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", source]) == 0
    for name in (f"{proto}_pb2.py", f"{proto}_pb2_grpc.py"):
        assert (tmp_path / "jds" / "api" / name).read_text() == (REPO / "jds" / "api" / name).read_text(), (
            f"jds/api/{name} is stale: regenerate it (see jds/api/__init__.py)"
        )


def test_benchmark_runs_a_workload_against_the_server(server, tmp_path):
    from jds.bench.__main__ import main

    out = tmp_path / "bench"
    assert main(["serve", "--server", server.address, "--workload", "code", "--rates", "2,4", "--num-requests", "4", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    sweep = results["sweeps"][0]
    assert set(sweep["rates"]) == {"2.0", "4.0"} and sweep["devices"] == 1
    for rate in sweep["rates"].values():
        assert rate["summary"]["requests"] == 4 and rate["summary"]["failed"] == 0
        for record in rate["records"]:  # every request generated exactly its planned length
            assert len(record["token_times"]) == record["output_len"] and record["error"] is None
    assert "goodput" in (out / "results.md").read_text()
    assert all((out / f"{name}.png").stat().st_size > 1000 for name in ("attainment_vs_rate", "attainment_vs_slo_scale", "ttft_cdf", "tpot_cdf"))


def test_benchmark_replays_a_trace_once_at_its_own_rate(server, tmp_path):
    from jds.bench.__main__ import main

    trace = tmp_path / "trace.jsonl"
    rows = [{"timestamp": t, "input_length": n, "output_length": m} for t, n, m in [(0, 5, 3), (500, 9, 2), (1000, 4, 4)]]
    trace.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "bench"
    assert main(["serve", "--server", server.address, "--trace", str(trace), "--rates", "1,2,3", "--out", str(out)]) == 0
    (rate,) = json.loads((out / "results.json").read_text())["sweeps"][0]["rates"].values()  # --rates is ignored
    assert [(r["input_len"], len(r["token_times"])) for r in rate["records"]] == [(5, 3), (9, 2), (4, 4)]
