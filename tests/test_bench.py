"""Benchmark building blocks on hand-made data: metric definitions, goodput, workloads, traces."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from jds.bench.metrics import RequestRecord, attainment, goodput, peak_decoding, search_goodput, summarize
from jds.bench.micro import DECODE_PASSES, SAMPLERS
from jds.config.placement import DEFAULT_PAGE_SIZE
from jds.scheduling import policy
from jds.bench.workloads import SLO, arrival_times, get_workload, load_trace, load_workloads, plan


def _record(sent: float, tokens: list[float], end: float | None = None, error: str | None = None) -> RequestRecord:
    return RequestRecord(10, len(tokens), sent, tokens, end if end is not None else (tokens[-1] if tokens else None), error)


def test_ttft_tpot_itl_e2e_definitions():
    r = _record(1.0, [1.5, 1.7, 2.0, 2.5])
    assert r.ttft == pytest.approx(0.5)
    assert r.tpot == pytest.approx((2.5 - 1.5) / 3)  # TTFT is not part of TPOT
    assert r.itl == pytest.approx([0.2, 0.3, 0.5])
    assert r.e2e == pytest.approx(1.5)
    one = _record(0.0, [0.3])
    assert one.tpot is None and one.meets(SLO(ttft=0.5, tpot=0.001))  # no TPOT to miss
    failed = _record(0.0, [0.1], error="UNAVAILABLE: gone")
    assert not failed.ok and failed.ttft is None and not failed.meets(SLO())


def test_attainment_needs_every_slo():
    fast = _record(0.0, [0.1, 0.2, 0.3])  # ttft 0.1, tpot 0.1
    slow_first = _record(0.0, [0.6, 0.7])  # ttft 0.6
    slow_steps = _record(0.0, [0.1, 0.5, 0.9])  # tpot 0.4
    records = [fast, slow_first, slow_steps, _record(0.0, [], error="INTERNAL")]
    assert attainment(records, SLO(ttft=0.5, tpot=0.2)) == 0.25
    assert attainment(records, SLO(ttft=0.5)) == 0.5
    assert attainment(records, SLO(tpot=0.2)) == 0.5
    assert attainment(records, SLO(ttft=0.5, tpot=0.2).scaled(2.0)) == 0.75  # ttft 1.0, tpot 0.4: all but the failed one
    s = summarize(records, SLO(ttft=0.5, tpot=0.2))
    assert s["requests"] == 4 and s["failed"] == 1 and s["attainment"] == 0.25
    assert s["ttft"]["p50"] == pytest.approx(0.1) and s["ttft"]["mean"] == pytest.approx(0.8 / 3)


def test_goodput_is_the_highest_rate_before_attainment_first_misses():
    assert goodput({1.0: 1.0, 2.0: 0.95, 3.0: 0.85, 4.0: 0.92}) == 2.0  # 4.0 passing again is noise
    assert goodput({1.0: 0.5}) == 0.0
    assert goodput({1.0: 0.9, 2.0: 0.9}, target=0.9) == 2.0


def test_goodput_search_bisects_to_the_knee():
    calls = []

    def measure(rate: float) -> float:
        calls.append(rate)
        return 1.0 if rate <= 3.3 else 0.5

    best, seen = search_goodput(measure, 1.0, 8.0, steps=8)
    assert 3.3 - 7 / 2**8 <= best <= 3.3 and len(calls) == len(seen) == 10
    assert search_goodput(lambda r: 0.0, 1.0, 8.0)[0] == 0.0
    assert search_goodput(lambda r: 1.0, 1.0, 8.0)[0] == 8.0


def test_workloads_are_reproducible_and_scaled():
    chatbot = get_workload("chatbot")
    a = plan(chatbot, 2.0, 2048, seed=7, num=200)
    assert a == plan(chatbot, 2.0, 2048, seed=7, num=200)
    assert a != plan(chatbot, 2.0, 2048, seed=8, num=200)
    faster = plan(chatbot, 4.0, 2048, seed=7, num=200)
    assert [(r.input_len, r.output_len) for r in faster] == [(r.input_len, r.output_len) for r in a]  # same requests
    assert faster[-1].arrival < a[-1].arrival
    small = plan(get_workload("summarization"), 1.0, 512, seed=0, num=100)
    assert all(r.input_len + r.output_len <= 512 and r.output_len >= 1 for r in small)
    assert min(r.input_len for r in small) >= 1900 * 512 // 2048 - 1  # scaled from the 2048 context
    assert set(load_workloads()) == {"chatbot", "code", "summarization", "shared-prefix"}
    with pytest.raises(ValueError, match="unknown workload 'chat'"):
        get_workload("chat")


def test_shared_prefix_conversations_repeat_the_system_prompt_and_each_earlier_turn():
    from jds.bench.loadgen import prompt_ids

    requests = plan(get_workload("shared-prefix"), 1.0, 2048, seed=3, num=12)
    prompts = [prompt_ids(i, r, 49152, seed=3) for i, r in enumerate(requests)]
    assert [len(p) for p in prompts] == [r.input_len for r in requests] and all(r.system == 1024 for r in requests)
    assert all(p[:1024] == prompts[0][:1024] for p in prompts)  # one system prompt for all
    assert [r.conversation for r in requests] == [i // 4 for i in range(12)]
    for i in range(1, 12):
        if i % 4:  # a later turn: the earlier turn's prompt, its answer's length in tokens, then the new message
            before, now = requests[i - 1], requests[i]
            assert now.input_len > before.input_len + before.output_len and prompts[i][: before.input_len] == prompts[i - 1]
        else:
            assert prompts[i][1024:1034] != prompts[i - 1][1024:1034]  # a new conversation
    assert all(r.input_len + r.output_len < 2048 for r in requests)
    short = plan(get_workload("shared-prefix"), 1.0, 512, seed=3, num=40)  # scaled: a 256-token system prompt
    assert all(r.system == 256 and r.input_len + r.output_len < 512 for r in short)


def test_arrivals_poisson_rate_and_burstiness():
    poisson = np.diff(arrival_times(5.0, seed=1, num=20000))
    assert np.mean(poisson) == pytest.approx(0.2, rel=0.03)
    assert np.std(poisson) / np.mean(poisson) == pytest.approx(1.0, rel=0.05)
    bursty = np.diff(arrival_times(5.0, seed=1, num=20000, burstiness=4.0))
    assert np.mean(bursty) == pytest.approx(0.2, rel=0.05)
    assert (np.std(bursty) / np.mean(bursty)) ** 2 == pytest.approx(4.0, rel=0.15)
    timed = arrival_times(5.0, seed=1, duration=10.0)
    assert timed[0] == 0.0 and timed[-1] < 10.0 and 30 < len(timed) < 80


def test_trace_replay_and_its_errors(tmp_path):
    trace = tmp_path / "trace.jsonl"
    trace.write_text("\n".join(json.dumps(r) for r in [
        {"timestamp": 1500, "input_length": 20, "output_length": 5},
        {"timestamp": 1000, "input_length": 10, "output_length": 3},
    ]) + "\n")  # fmt: skip
    requests = load_trace(trace)
    assert [(r.arrival, r.input_len, r.output_len) for r in requests] == [(0.0, 10, 3), (0.5, 20, 5)]
    trace.write_text('{"timestamp": 0, "input_length": 10}\n')
    with pytest.raises(ValueError, match=r"trace.jsonl:1: expected timestamp, input_length, output_length"):
        load_trace(trace)
    trace.write_text('{"timestamp": 0, "input_length": 100, "output_length": 100}\n')
    with pytest.raises(ValueError, match="exceed max_seq_len 128"):
        load_trace(trace, max_seq_len=128)


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> tuple[dict, str]:
    """One micro-benchmark run on the tiny model: its JSON and its markdown."""
    from jds.bench.__main__ import main
    from tests_paths import CONFIGS

    # The tiny model with few program shapes: the start-up rows start a server twice.
    folder = tmp_path_factory.mktemp("micro")
    config = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    config["model"]["max_seq_len"] = 128
    config["placement"] = {"instances": {"devices": [0], "slots": 2, "max_batch": 2}}
    (folder / "tiny.yaml").write_text(yaml.safe_dump(config))
    out = folder / "micro"
    assert main(["micro", "--config", str(folder / "tiny.yaml"), "--batches", "1,4", "--contexts", "64", "--prompts", "40", "--no-peer", "--out", str(out)]) == 0
    return json.loads((out / "micro.json").read_text()), (out / "micro.md").read_text()


def test_micro_benchmark_reports_ratios_to_measured_limits(micro):
    result, text = micro
    assert result["memory_bandwidth_gb_per_s"] > 0 and result["matmul_gflop_per_s"] > 0
    # Limits sampled before the decode passes and after each (before and after each prompt's prefill).
    assert len(result["memory_bandwidth_samples_gb_per_s"]) == DECODE_PASSES + 1 and len(result["matmul_samples_gflop_per_s"]) == 2
    assert result["memory_bandwidth_gb_per_s"] == pytest.approx(np.median(result["memory_bandwidth_samples_gb_per_s"]))
    assert [(r["weights"], r["batch"], r["context"]) for r in result["decode"]] == [
        ("float", 1, 64), ("float", 4, 64), ("int8", 1, 64), ("int8", 4, 64)
    ]
    # The forms the steps were measured in, named where a reader starts: a CPU's own.
    assert (result["layer_form"], result["decode_attention"], result["prompt_attention"]) == ("stacked", "by-page", "xla")
    assert text.startswith("# Micro-benchmarks: tiny-random (float32, stacked layer weights, decode attention by-page, prompt attention xla)")
    float_bytes, int8_bytes = result["weight_bytes"], result["int8_weight_bytes"]
    assert int8_bytes < float_bytes / 3  # int8 values and their float32 scales against float32 weights
    # On a CPU, layer weights are held in both orientations and a step reads one.
    assert result["int8_held_bytes"] > int8_bytes and result["held_bytes"] > float_bytes
    for row in result["decode"]:
        assert row["over_floor"] == pytest.approx(row["seconds"] / row["floor_seconds"])
        assert row["floor_seconds"] == pytest.approx(row["bytes"] / (result["memory_bandwidth_gb_per_s"] * 1e9))
    assert [(r["batch"], r["sampler"]) for r in result["sampling"]] == [(b, name) for b in (1, 4) for name in SAMPLERS]
    for row in result["sampling"]:
        greedy = next(g for g in result["sampling"] if g["batch"] == row["batch"] and g["sampler"] == "greedy")
        assert row["over_greedy"] == pytest.approx(row["seconds"] / greedy["seconds"])
    assert "against the greedy one" in text
    (prefill,) = result["prefill"]
    # The pages a 40-token prompt fills, in the default page size: K and V, 4 layers, 4 KV heads,
    # head_dim 16, float32.
    filled = policy.pages_for(40, DEFAULT_PAGE_SIZE) * DEFAULT_PAGE_SIZE
    assert prefill["handoff_bytes"] == 2 * 4 * 4 * filled * 16 * 4 and 0 < prefill["of_matmul_peak"]
    assert prefill["handoff_of_prompt_kv"] == pytest.approx(filled / 40)
    assert "jds / floor" in text
    engine = result["engine"]  # one request through the engine against the bare step of its shapes
    assert engine["slots"] > 1 and engine["seconds_per_token"] > 0 and engine["over_bare"] == pytest.approx(engine["seconds_per_token"] / engine["bare_seconds"])
    assert "Engine decode against the bare step" in text
    assert set(result["peers"]) == {"transformers", "llama.cpp"} and all(n == "not measured: --no-peer" for n in result["peers"].values())
    assert result["peak_rss_bytes"]["jds"] > result["weight_bytes"]  # the process holds at least the weights
    startup = result["startup"]  # the server started twice, the second time from the compile cache the first filled
    assert startup["programs"] > 0 and startup["cold_seconds"] > 0 and startup["warm_seconds"] > 0
    assert f"compiling all {startup['programs']} program shapes" in text


def test_micro_leaves_out_the_parts_it_is_told_to_skip(tmp_path):
    from jds.bench.__main__ import main
    from tests_paths import CONFIGS

    out = tmp_path / "micro"
    args = ["micro", "--config", str(CONFIGS / "tiny.yaml"), "--batches", "2", "--contexts", "64", "--prompts", "24", "--no-peer"]
    assert main([*args, "--skip", "startup,int8,sampling,engine", "--out", str(out)]) == 0
    result, text = json.loads((out / "micro.json").read_text()), (out / "micro.md").read_text()
    assert [(r["weights"], r["batch"]) for r in result["decode"]] == [("float", 2)] and len(result["prefill"]) == 1
    assert not {"startup", "engine", "sampling", "int8_weight_bytes", "partial"} & set(result)
    assert "as int8" not in text and "Start-up" not in text and "Engine decode" not in text


def test_a_micro_part_that_fails_leaves_a_note_and_the_other_figures(micro):
    from jds.bench.micro import attempt, markdown

    def no_server() -> dict:
        raise RuntimeError("the server exited with 1")

    failed = attempt(no_server)
    assert failed == {"note": "not measured: RuntimeError: the server exited with 1"}
    text = markdown({**micro[0], "startup": failed, "engine": failed})
    assert "Start-up: not measured: RuntimeError: the server exited with 1." in text
    assert "Engine decode against the bare step: not measured: RuntimeError" in text and "jds / floor" in text


def test_a_restart_loads_every_warm_up_program_from_the_compile_cache(micro):
    startup = micro[0]["startup"]  # the micro-benchmark's two starts of python -m jds.server, one cache
    assert startup["warm_programs"] == startup["programs"] > 0
    assert startup["cache_entries"] >= startup["programs"]  # the first start wrote every program it compiled
    assert startup["restart_new_entries"] == 0  # the second found every one: nothing new was written
    assert f"{startup['cache_entries']} entries written by the first start, 0 more by the restart" in micro[1]


def test_the_layer_loop_forms_run_each_in_its_own_process_with_its_flags_set_before_the_backend(tmp_path, monkeypatch):
    from jds.bench import layer_loops
    from jds.bench.__main__ import main
    from tests_paths import CONFIGS

    # A form XLA ends at once (a flag it does not know) is reported, and the next still runs; the
    # forms' equivalence is tested in test_layer_loop.py.
    monkeypatch.setitem(layer_loops.FORMS, "unknown-flag", {"env": {"XLA_FLAGS": "--xla_no_such_flag=true"}})
    monkeypatch.setenv("JDS_DECODE_ATTENTION", "end-to-end")  # the caller's choice, which no form inherits
    out = tmp_path / "layers"
    args = ["layers", "--config", str(CONFIGS / "tiny.yaml"), "--forms", "unknown-flag,scan-slice-fusion", "--batches", "1,2"]
    assert main([*args, "--context", "64", "--prompt", "24", "--out", str(out)]) == 0
    result, text = json.loads((out / "layers.json").read_text()), (out / "layers.md").read_text()
    failed, form = result["forms"]
    assert failed["form"] == "unknown-flag" and "error" in failed and "decode" not in failed
    assert "Not measured: unknown-flag: " in text
    # The flag went into the environment of a process whose backend had not started yet.
    assert form["form"] == "scan-slice-fusion" and form["set_before_the_backend_started"] and form["unroll"] == 1
    assert (form["layer_form"], form["decode_attention"], form["prompt_attention"]) == ("stacked", "by-page", "xla")  # as a CPU runs
    assert "--xla_gpu_enable_dynamic_slice_fusion=true" in form["xla_flags"]
    assert [d["batch"] for d in form["decode"]] == [1, 2]
    assert all(d["first_call_seconds"] > d["seconds"] > 0 and d["over_floor"] > 0 for d in form["decode"])
    assert 0 < form["prefill"]["of_matmul_peak"] and form["prefill"]["tokens"] == 24
    assert "| scan-slice-fusion | 2 |" in text


def test_without_a_gguf_the_transformers_peer_builds_the_same_shapes_at_random():
    from jds.bench.micro import PeerModel, transformers_peer
    from jds.config import load_config
    from tests_paths import CONFIGS

    arch = load_config(CONFIGS / "tiny.yaml").model.architecture
    times = transformers_peer(PeerModel(arch, "auto"), batches=[1, 3], prompts=[8, 24], steps=2)
    # On a CPU the peer computes in float32 whatever jds' dtype: torch's bfloat16 is slow there too.
    assert times["note"] == "random weights at the same shapes, float32, on cpu"
    assert sorted(times["decode"]) == [1, 3] and sorted(times["prefill"]) == [8, 24]
    assert all(t > 0 for phase in ("decode", "prefill") for t in times[phase].values())
    big = load_config(CONFIGS / "llama7b-1gpu.yaml").model.architecture  # 6.7B: not run on a CPU
    assert transformers_peer(PeerModel(big, "auto"), [1], [8]) == {
        "note": "not measured: torch sees no GPU, and 6.7B parameters would take minutes on the CPU"
    }


def test_the_engine_measurement_keeps_few_slots_and_the_kv_they_fill():
    from jds.bench.micro import ENGINE_SLOTS, with_few_slots
    from jds.config.placement import Placement

    colocated = Placement.model_validate({"instances": [{"devices": [0], "slots": 52}, {"devices": [1], "slots": 4, "kv_pages": 7}]})
    assert [(i["slots"], "kv_pages" in i) for i in with_few_slots(colocated)["instances"]] == [(ENGINE_SLOTS, False), (4, False)]
    split = Placement.model_validate({"mode": "disaggregated", "prefill": [{"devices": [0]}], "decode": [{"devices": [1], "kv_memory_gb": 60}]})
    (decode,) = Placement.model_validate(with_few_slots(split)).decode
    assert decode.slots == ENGINE_SLOTS and decode.kv_memory_gb is None and decode.kv_pages is None


def test_a_peer_runs_in_its_own_process_and_reports_that_process_peak_memory():
    import os

    from jds.bench.micro import in_own_process, peak_rss_bytes

    pid, rss = in_own_process(os.getpid)
    assert pid != os.getpid() and 0 < rss and rss != peak_rss_bytes()


def test_report_round_trips_through_json(tmp_path):
    from jds.bench import report

    records = {1.0: [_record(0.0, [0.1, 0.2, 0.3]), _record(0.5, [1.5, 1.6])], 2.0: [_record(0.0, [0.9, 1.0], error=None)]}
    sweep = report.Sweep("a", SLO(ttft=0.5, tpot=0.2), 2, 0.9, records)
    md = report.write([sweep], tmp_path, "t", {"seed": 0})
    again = report.Sweep.from_json(json.loads((tmp_path / "results.json").read_text())["sweeps"][0])
    assert again.attainments() == sweep.attainments() == {1.0: 0.5, 2.0: 0.0}
    assert again.goodput == sweep.goodput == 0.0
    assert report.markdown([again], "t") == md.read_text()
    assert (tmp_path / "attainment_vs_slo_scale.png").stat().st_size > 1000


def test_micro_says_why_the_engine_is_not_compared_rather_than_failing_after_its_measurements():
    import jax

    from jds.bench.micro import engine_decode
    from jds.config import load_config
    from jds.config.placement import Placement
    from tests_paths import CONFIGS

    config = load_config(CONFIGS / "tiny.yaml")
    beyond = len(jax.devices())
    far = config.model_copy(update={"placement": Placement.model_validate({"mode": "colocated", "instances": [{"devices": [beyond], "slots": 4}]})})
    assert engine_decode(far, None) == {"note": f"not measured: the placement uses device {beyond}, this run has {beyond}"}
    staged = config.model_copy(update={"placement": Placement.model_validate(
        {"mode": "disaggregated", "prefill": {"devices": [0]}, "decode": {"devices": [1, 2], "pp": 2, "slots": 4}})})  # fmt: skip
    assert engine_decode(staged, None)["note"] == "not measured: the decode instance is pipelined"


def test_peak_decoding_counts_the_requests_between_first_token_and_end_at_the_busiest_moment():
    def record(first: float, end: float) -> RequestRecord:
        return RequestRecord(10, 5, sent=0.0, token_times=[first, end], end=end)

    assert peak_decoding([record(0, 2), record(1, 3), record(2.5, 4), record(5, 6)]) == 2
    assert peak_decoding([record(0, 1), record(1, 2)]) == 1  # one ends as the next begins
    assert peak_decoding([]) == 0


# -- the command line: every value checked before a server is reached or started --------------------


def _refusal(capsys, argv: list[str]) -> tuple[int, str]:
    """Run ``python -m jds.bench`` in process: its exit status (argparse's too) and what it wrote to stderr."""
    from jds.bench.__main__ import main

    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["serve", "--num-requests", "0"], "--num-requests"),
        (["serve", "--num-requests", "-1"], "--num-requests"),
        (["serve", "--duration", "0"], "--duration"),
        (["serve", "--search", "1"], "--search"),
        (["serve", "--search", "0:1"], "--search"),
        (["serve", "--search", "2:1"], "--search"),
        (["serve", "--rates", "0"], "--rates"),
        (["serve", "--rates", "1,abc"], "--rates"),
        (["serve", "--rates", "nan"], "--rates"),
        (["serve", "--burstiness", "0"], "--burstiness"),
        (["serve", "--slo-scale", "-1"], "--slo-scale"),
        (["serve", "--slo", "ttft=inf"], "--slo"),
        (["serve", "--attainment", "5"], "--attainment"),
        (["serve", "--seed", "-1"], "--seed"),
        (["serve", "--workload", "nosuch"], "--workload"),
        (["compare", "configs/tiny.yaml", "--api", "grpc,http"], "--api"),
        (["micro", "--batches", "a,b"], "--batches"),
        (["micro", "--skip", "warmup"], "--skip"),
        (["layers", "--batches", "x"], "--batches"),
        (["layers", "--context", "0"], "--context"),
    ],
)
def test_the_benchmark_refuses_a_bad_value_naming_its_flag(capsys, args, flag):
    code, err = _refusal(capsys, args)
    assert code == 2 and f"argument {flag}:" in err and "Traceback" not in err


def test_the_benchmark_checks_its_output_and_trace_before_reaching_a_server(capsys, tmp_path):
    from local_ports import free_ports

    file = tmp_path / "afile"
    file.write_text("")
    nobody = f"127.0.0.1:{free_ports(1)[0]}"  # reached first, this would say it cannot be reached
    assert _refusal(capsys, ["serve", "--server", nobody, "--out", str(file)]) == (1, f"error: --out {file}: a file is there, not a folder\n")
    code, err = _refusal(capsys, ["serve", "--server", nobody, "--out", str(tmp_path / "out"), "--trace", str(tmp_path / "none.jsonl")])
    assert code == 1 and err.startswith("error: --trace: ") and not (tmp_path / "out").exists()


@pytest.mark.parametrize("api", ["grpc", "openai"])
def test_a_server_out_of_reach_is_one_line_not_a_traceback(capsys, tmp_path, api):
    from local_ports import free_ports

    nobody = f"127.0.0.1:{free_ports(1)[0]}"
    code, err = _refusal(capsys, ["serve", "--api", api, "--server", nobody, "--num-requests", "1", "--out", str(tmp_path)])
    assert code == 1 and err.startswith(f"error: cannot reach {nobody} (") and err.count("\n") == 1


def test_a_server_refusing_the_key_says_so_on_either_api(capsys, tmp_path):
    import http.server
    import threading
    from concurrent import futures

    import grpc

    from jds.serving.access import ApiKeys, GrpcKeyCheck

    keyed = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[GrpcKeyCheck(ApiKeys(["k"]))])
    port = keyed.add_insecure_port("127.0.0.1:0")
    keyed.start()

    class Refusing(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args) -> None:  # stderr is what the test reads
            pass

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        for api, address in (("grpc", f"127.0.0.1:{port}"), ("openai", f"127.0.0.1:{web.server_port}")):
            code, err = _refusal(capsys, ["serve", "--api", api, "--server", address, "--api-key", "wrong", "--out", str(tmp_path)])
            assert code == 1 and err.startswith(f"error: {address} refused the benchmark's key (") and "--api-key" in err, err
    finally:
        keyed.stop(None)
        web.shutdown()


def test_compare_reads_every_config_before_starting_a_server(capsys, tmp_path):
    from tests_paths import CONFIGS

    tiny = str(CONFIGS / "tiny.yaml")
    code, err = _refusal(capsys, ["compare", tiny, str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "out")])
    assert code == 1 and "config file not found" in err and "nope.yaml" in err and not (tmp_path / "out").exists()
    config = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    config["server"] = {"tls": {"cert": "cert.pem", "key": "key.pem"}}
    (tmp_path / "tls.yaml").write_text(yaml.safe_dump(config))
    code, err = _refusal(capsys, ["compare", tiny, str(tmp_path / "tls.yaml"), "--out", str(tmp_path / "out")])
    assert code == 1 and "server.tls" in err and "--tls-ca" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["micro", "layers"])
def test_micro_and_layers_read_the_config_and_check_the_output_before_measuring(capsys, tmp_path, command):
    from tests_paths import CONFIGS

    out = tmp_path / "out"
    assert _refusal(capsys, [command, "--config", str(tmp_path / "none.yaml"), "--out", str(out)])[1].startswith("error: --config: ")
    (tmp_path / "afile").write_text("")
    code, err = _refusal(capsys, [command, "--config", str(CONFIGS / "tiny.yaml"), "--out", str(tmp_path / "afile")])
    assert code == 1 and err.startswith(f"error: --out {tmp_path / 'afile'}: ") and not out.exists()


def test_layers_refuses_an_unknown_form_and_fails_when_no_form_could_be_measured(capsys, tmp_path, monkeypatch):
    from jds.bench import layer_loops
    from tests_paths import CONFIGS

    args = ["layers", "--config", str(CONFIGS / "tiny.yaml"), "--out", str(tmp_path)]
    code, err = _refusal(capsys, [*args, "--forms", "scan,loop"])
    assert code == 1 and err.startswith("error: --forms: unknown ['loop']")
    monkeypatch.setitem(layer_loops.FORMS, "unknown-flag", {"env": {"XLA_FLAGS": "--xla_no_such_flag=true"}})  # its process ends at once
    code, err = _refusal(capsys, [*args, "--forms", "unknown-flag", "--context", "64", "--prompt", "24", "--batches", "1"])
    assert code == 1 and "no form could be measured" in err and "Not measured: unknown-flag" in (tmp_path / "layers.md").read_text()


def test_a_server_is_found_ready_on_whatever_host_it_names():
    from jds.bench.server_process import HTTP, READY, host_port

    assert host_port(*READY.search("x INFO jds.server: ready: serving tiny on localhost:5001\n").groups()) == "localhost:5001"
    assert host_port(*READY.search("ready: serving tiny on ::1:5001\n").groups()) == "[::1]:5001"
    assert READY.search("ready: serving tiny on 127.0.0.1:50") is None  # the line still being written
    assert HTTP.search("OpenAI-compatible API on https://localhost:8000/v1\n").groups() == ("https", "localhost", "8000")
