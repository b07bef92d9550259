"""The planner: the latency fit, the simulator on cases worked out by hand, the search, the CLI.

The simulator's agreement with real servers is shown by ``python -m jds.plan validate`` (its
table is in docs/results); here each rule of the engine it replays is checked on its own.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from jds.bench.metrics import RequestRecord, attainment
from jds.bench.workloads import SLO, PlannedRequest, get_workload, plan
from jds.config.placement import ColocatedInstance, DecodeInstance, Placement, PrefillInstance
from jds.planner.calibrate import fit
from jds.planner.candidates import Candidate, ColocatedShape, DecodeShape, PrefillShape, max_slots
from jds.planner.latency import DecodeModel, PrefillModel, TransferModel, least_squares
from jds.planner.profile import DecodeEntry, ModelFacts, PrefillEntry, Profile, Serving
from jds.planner.search import Search, highest_rate
from jds.planner.simulator import simulate
from tests_paths import CONFIGS, REPO

GPU_PROFILE = REPO / "docs" / "results" / "planner-gpu-example" / "h100-llama2-7b.json"


# -- the fit ----------------------------------------------------------------------------------------


def test_prefill_fit_recovers_known_coefficients():
    truth = PrefillModel(base=0.004, per_token=2.5e-4, per_square=3e-8)
    points = [(b, n, truth.batch_seconds(b, n)) for b in (1, 2, 4, 8) for n in (16, 64, 256, 1024) if b * n <= 4096]
    fit = PrefillModel.fit(points)
    for got, want in zip((fit.base, fit.per_token, fit.per_square), (truth.base, truth.per_token, truth.per_square)):
        assert got == pytest.approx(want, rel=1e-6)


def test_decode_and_transfer_fits_recover_known_coefficients_under_noise():
    rng = np.random.default_rng(0)
    truth = DecodeModel(base=0.02, per_row=1e-3, per_context=2e-7)
    points = [(b, c, truth.seconds(b, c) * rng.normal(1, 0.01)) for b in (1, 4, 8, 16, 32) for c in (16, 128, 1024, 2048)]
    fit = DecodeModel.fit(points)
    assert fit.base == pytest.approx(truth.base, rel=0.05)
    assert fit.per_row == pytest.approx(truth.per_row, rel=0.15)
    assert fit.per_context == pytest.approx(truth.per_context, rel=0.1)
    link = TransferModel(latency=1e-4, bandwidth=10e9)
    got = TransferModel.fit([(n, link.seconds(n)) for n in (2**20, 2**22, 2**24, 2**26)])
    assert got.latency == pytest.approx(link.latency, rel=1e-6) and got.bandwidth == pytest.approx(link.bandwidth, rel=1e-6)


def test_least_squares_drops_a_coefficient_that_would_come_out_negative():
    x = np.array([1.0, 2, 3, 4])
    t = 1.0 + 0.5 * x + np.array([0.02, -0.03, 0.03, -0.02])  # noise that a free third term would fit with a negative sign
    coef = least_squares(np.stack([np.ones(4), x, x**3], 1), t)
    assert (coef >= 0).all()
    assert coef[0] == pytest.approx(1.0, abs=0.1) and coef[1] == pytest.approx(0.5, abs=0.05)


# -- the simulator, on cases computed by hand -------------------------------------------------------


def _profile(prefill=PrefillModel(base=1.0, per_token=0, per_square=0), decode=DecodeModel(base=0.5, per_row=0, per_context=0),
             transfer=TransferModel(latency=0.25, bandwidth=1e30), memory=10**12, weights=10**9, tps=(1,), pps=(1,)) -> Profile:  # fmt: skip
    return Profile(
        source="hand-made for tests",
        device="test device",
        devices_per_node=8,
        device_memory_bytes=memory,
        model=ModelFacts(name="m", num_layers=8, weight_bytes=weights, kv_bytes_per_token=1000, max_seq_len=512),
        prefill=[PrefillEntry(tp=t, model=prefill) for t in tps],
        decode=[DecodeEntry(tp=t, pp=p, model=decode) for t in tps for p in pps],
        transfer={"device": transfer, "process": transfer, "network": transfer},
    )


def _disaggregated(slots: int = 8, max_batch: int = 8) -> Placement:
    """Pages of 16, so that the short prompts below read context buckets of 32 and 64 and hand
    over a 20-token prompt's 32 positions."""
    decode = DecodeInstance(devices=[1], slots=slots, page_size=16)
    return Placement(mode="disaggregated", prefill=[PrefillInstance(devices=[0], max_batch=max_batch)], decode=[decode])


def test_one_request_through_prefill_transfer_and_decode():
    (r,) = simulate(_disaggregated(), _profile(), [PlannedRequest(0.0, 20, 5)], 512)
    # prefill 1 s; KV lands at 1.25; four rounds of 0.5 s
    assert r.token_times == pytest.approx([1.0, 1.75, 2.25, 2.75, 3.25])
    assert r.ttft == pytest.approx(1.0) and r.tpot == pytest.approx(2.25 / 4)


def test_prefill_is_fcfs_and_batches_what_fits():
    requests = [PlannedRequest(0.0, 20, 1), PlannedRequest(0.1, 20, 1), PlannedRequest(0.2, 20, 1)]
    one_at_a_time = simulate(_disaggregated(max_batch=1), _profile(), requests, 512)
    assert [r.ttft for r in one_at_a_time] == pytest.approx([1.0, 1.9, 2.8])
    # batched: the first runs alone (32 padded tokens); the two that came meanwhile share a batch of 2 x 32
    per_token = _profile(prefill=PrefillModel(base=0.0, per_token=0.01, per_square=0))
    batched = simulate(_disaggregated(), per_token, requests, 512)
    assert [r.ttft for r in batched] == pytest.approx([0.32, 0.96 - 0.1, 0.96 - 0.2])


def test_requests_wait_for_a_decode_slot_and_tpot_counts_the_wait():
    a, b = simulate(_disaggregated(slots=1), _profile(), [PlannedRequest(0.0, 20, 3), PlannedRequest(0.0, 20, 3)], 512)
    assert a.token_times == pytest.approx([1.0, 1.75, 2.25])
    # sent together, prefilled together (0-1 s); b's slot frees when a's last round is read at
    # 2.25, its KV lands at 2.5
    assert b.token_times == pytest.approx([1.0, 3.0, 3.5])


def test_decode_rounds_read_the_context_bucket_of_the_longest_sequence():
    decode = DecodeModel(base=0.0, per_row=0.0, per_context=0.001)  # seconds per row per context position
    (r,) = simulate(_disaggregated(slots=2), _profile(decode=decode), [PlannedRequest(0.0, 30, 4)], 512)
    # positions 30, 31 read bucket 32; position 32 still reads 32; 1 row (slot 0 alone) x 32 x 0.001 = 0.032 s a round
    assert np.diff(r.token_times)[1:] == pytest.approx([0.032, 0.032])
    (r,) = simulate(_disaggregated(slots=2), _profile(decode=decode), [PlannedRequest(0.0, 33, 3)], 512)
    assert np.diff(r.token_times)[1:] == pytest.approx([0.064])  # bucket 64


def test_decode_rounds_compute_the_rows_up_to_the_highest_slot_in_use():
    decode = DecodeModel(base=0.0, per_row=0.1, per_context=0.0)  # 16 slots: row buckets 1, 8, 16
    blocker = PlannedRequest(0.0, 20, 1)  # prefilled 0-1 s, no decode: the five that come meanwhile share the next batch

    def five(long: int) -> list:
        return [PlannedRequest(0.1, 20, 4 if i == long else 2) for i in range(5)]

    # the five are prefilled 1-2 s, land at 2.25 in slots 0-4, and the first round computes 8 rows (0.8 s)
    low_stays = simulate(_disaggregated(slots=16), _profile(decode=decode), [blocker, *five(0)], 512)
    assert low_stays[1].token_times == pytest.approx([2.0, 3.05, 3.15, 3.25])  # slot 0 alone after it: 1 row
    high_stays = simulate(_disaggregated(slots=16), _profile(decode=decode), [blocker, *five(4)], 512)
    assert high_stays[5].token_times == pytest.approx([2.0, 3.05, 3.85, 4.65])  # slot 4 alone: rows 0-4, a bucket of 8


def test_colocated_prefill_interrupts_running_decodes():
    placement = Placement(mode="colocated", instances=[ColocatedInstance(devices=[0], slots=4)])
    a, b = simulate(placement, _profile(), [PlannedRequest(0.0, 20, 4), PlannedRequest(1.2, 20, 2)], 512)
    # a: prefill 0-1, rounds 1-1.5 and 1.5-2 (dispatched at 1, before b arrived at 1.2); b's
    # prefill then runs 2-3, and a's last round waits for it
    assert a.token_times == pytest.approx([1.0, 1.5, 2.0, 3.5])
    assert b.token_times == pytest.approx([3.0, 3.5])


def test_chunked_prefill_alternates_chunks_and_rounds():
    chunk = PrefillModel(base=0.0, per_token=0.01, per_square=0)  # a 16-token chunk: 0.16 s
    placement = Placement(mode="colocated", instances=[ColocatedInstance(devices=[0], slots=4, chunked_prefill=16)])
    a, b = simulate(placement, _profile(prefill=chunk), [PlannedRequest(0.0, 16, 3), PlannedRequest(0.0, 40, 2)], 512)
    # a's one chunk, then a round; b's first chunk waits for that round, and the next round for it
    assert a.token_times == pytest.approx([0.16, 0.66, 0.66 + 0.16 + 0.5])
    # b: chunks of 16, 16 and 8 tokens (each padded to 16); a's rounds sit between the first two
    assert b.ttft == pytest.approx(1.32 + 2 * 0.16)


def test_processes_pull_each_request_over_the_process_link():
    slow = TransferModel(latency=0.0, bandwidth=1000 * 32 / 0.3)  # one request's 32-token row in 0.3 s
    profile = _profile(transfer=slow)
    # the first request keeps prefill busy until 1 s; the next two then share one prefill batch (1-2 s)
    requests = [PlannedRequest(0.0, 20, 1), PlannedRequest(0.1, 20, 2), PlannedRequest(0.1, 20, 2)]
    by_batch = simulate(_disaggregated(), profile, requests, 512, link="device")[1:]
    by_request = simulate(_disaggregated(), profile, requests, 512, link="process")[1:]
    # one process: the batch's two rows (2 x 32 tokens) move at once in 0.6 s, then one round
    assert [r.token_times[1] for r in by_batch] == pytest.approx([2.0 + 0.6 + 0.5] * 2)
    # processes: the landing thread pulls one row after the other, 0.3 s each; the second row
    # lands during the first's round and joins the next one
    assert [r.token_times[1] for r in by_request] == pytest.approx([2.0 + 0.3 + 0.5, 2.0 + 0.3 + 0.5 + 0.5])


def test_a_pull_from_a_busy_cpu_prefill_process_waits_for_its_batch():
    requests = [PlannedRequest(0.0, 20, 2), PlannedRequest(0.5, 20, 2)]
    placement = _disaggregated(max_batch=1)
    free = simulate(placement, _profile(), requests, 512, link="process")
    waits = simulate(placement, _profile().model_copy(update={"pulls_wait_for_prefill": True}), requests, 512, link="process")
    # the first prefill ends at 1 s and the second starts then; a pull asked for at 1 s is answered
    # at once (lands at 1.25), or only when the second prefill is done (2 + 0.25)
    assert free[0].token_times == pytest.approx([1.0, 1.25 + 0.5])
    assert waits[0].token_times == pytest.approx([1.0, 2.25 + 0.5])
    # the second's pull, behind the first's on the landing thread, lands at 2.5 and joins the round
    # after the one the first started at 2.25
    assert waits[1].token_times == pytest.approx([2.0, 2.75 + 0.5])


def test_attainment_is_the_benchmarks():
    records = simulate(_disaggregated(), _profile(), [PlannedRequest(0.0, 20, 5), PlannedRequest(0.1, 20, 5)], 512)
    assert [r.ttft for r in records] == pytest.approx([1.0, 1.9])
    assert attainment(records, SLO(ttft=2.5, tpot=1.0)) == 1.0
    assert attainment(records, SLO(ttft=1.5)) == 0.5
    assert attainment(records, SLO(ttft=2.5, tpot=0.1)) == 0.0


def test_validation_gives_the_measured_median_and_range_and_whether_the_simulation_is_inside():
    from jds.planner.validate import markdown, points

    def row(rate: float, repeat: int, measured: float, simulated: float) -> dict:
        summary = lambda a, ms: {"attainment": a, "ttft": {"p50": ms / 1000}, "tpot": {"p50": 0.1}}  # noqa: E731
        r = {"config": "configs/a.yaml", "profile": "p.json", "rate": rate, "repeat": repeat, "measured": summary(measured, 500)}
        return r | ({"simulated": summary(simulated, 400)} if repeat == 0 else {})

    rows = [row(1.0, k, m, 0.55) for k, m in enumerate([0.5, 0.7, 0.4, 0.6, 0.9])]
    rows += [row(2.0, k, m, 0.1) for k, m in enumerate([0.3, 0.2, 0.4, 0.35, 0.25])]
    one, two = points(rows)
    assert one["measured"] == [0.4, 0.5, 0.6, 0.7, 0.9] and one["median"] == 0.6 and one["inside"]
    assert two["median"] == 0.3 and not two["inside"]
    text = markdown(rows, "title", "command")
    assert "| a | 1 | 60.0% (40.0-90.0%) | 5 | 55.0% | yes | 500 / 400 | 100 / 100 |" in text
    assert "| a | 2 | 30.0% (20.0-40.0%) | 5 | 10.0% | no |" in text
    assert "inside the measured range at 1 of 2 points; its largest distance from a measured median is 20.0 percentage points" in text


# -- candidates and search ---------------------------------------------------------------------------


def test_candidate_layout_keeps_instances_inside_nodes():
    c = Candidate(prefill=PrefillShape(2), decode=DecodeShape(tp=2, pp=2, slots=8), n_prefill=3, n_decode=1)
    placement = c.placement(node_size=4)
    assert [p.devices for p in placement.prefill] == [[0, 1], [2, 3], [4, 5]]
    assert placement.decode[0].devices == [8, 9, 10, 11]  # would straddle nodes at 6-9
    assert Candidate(colocated=ColocatedShape(1, 8, 256), n_colocated=2).placement(8).instances[1].chunked_prefill == 256


def test_max_slots_is_the_memory_left_beside_the_weights():
    profile = _profile(memory=10 * 2**30, weights=4 * 2**30)
    per_slot = 1000 * 512
    assert max_slots(profile, tp=1, pp=1) == int((0.9 * 10 * 2**30 - 4 * 2**30) // per_slot)
    assert max_slots(profile, tp=2, pp=2) == int((0.9 * 40 * 2**30 - 4 * 2**30) // per_slot)


def test_highest_rate_brackets_and_bisects():
    seen = []

    def measure(rate):
        seen.append(rate)
        return 1.0 if rate <= 3.3 else 0.5

    assert highest_rate(measure, 0.9, start=0.1) == pytest.approx(3.3, rel=0.05)
    assert highest_rate(measure, 0.9, start=100.0) == pytest.approx(3.3, rel=0.05)
    assert highest_rate(lambda rate: 0.0, 0.9, start=1.0) == 0.0


def test_search_prefers_disaggregation_when_prefill_interference_breaks_tpot():
    # long prefills and a tight TPOT: a colocated round waits behind every prefill
    profile = _profile(prefill=PrefillModel(base=0.5, per_token=1e-3, per_square=0), decode=DecodeModel(base=0.02, per_row=1e-3, per_context=0),
                       transfer=TransferModel(latency=1e-3, bandwidth=1e10))  # fmt: skip
    workload = get_workload("code")
    scored = Search(profile, workload, SLO(ttft=3.0, tpot=0.035), num_requests=60, log=lambda _: None).run(2)
    assert scored[0].candidate.disaggregated and scored[0].goodput > 0
    best_colocated = max(s.per_device for s in scored if not s.candidate.disaggregated)
    assert scored[0].per_device > best_colocated


def test_search_says_when_colocated_wins():
    from jds.planner import report

    # cheap prefills and a loose TPOT: giving a device to prefill only halves decode capacity
    profile = _profile(prefill=PrefillModel(base=0.01, per_token=1e-5, per_square=0), decode=DecodeModel(base=0.05, per_row=1e-3, per_context=0))
    scored = Search(profile, get_workload("code"), SLO(ttft=1.0, tpot=0.5), num_requests=60, log=lambda _: None).run(2)
    assert not scored[0].candidate.disaggregated
    assert report.verdict(scored).startswith("Colocated serving wins")


# -- calibration ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_calibration_recovers_the_factors_a_run_was_slowed_by(mode):
    placement = _disaggregated() if mode == "disaggregated" else Placement(mode="colocated", instances=[ColocatedInstance(devices=[0], slots=8)])
    profile = _profile(prefill=PrefillModel(base=0.05, per_token=1e-3, per_square=0), decode=DecodeModel(base=0.08, per_row=2e-3, per_context=0))
    requests = plan(get_workload("code"), 1.0, 512, 0, 40)
    slowed = profile.model_copy(update={"serving": Serving(prefill=1.3, decode=1.2)})
    measured = simulate(placement, slowed, requests, 512)
    got = fit(placement, profile, requests, measured, 512, "device")
    assert got.prefill == pytest.approx(1.3, rel=0.03) and got.decode == pytest.approx(1.2, rel=0.03)


def test_calibration_stops_at_the_end_of_its_range_when_no_factor_explains_a_run():
    profile = _profile()
    requests = [PlannedRequest(0.0, 20, 5)]
    (r,) = simulate(_disaggregated(), profile, requests, 512)
    hopeless = RequestRecord(input_len=20, output_len=5, sent=0.0, token_times=[t * 100 for t in r.token_times], end=r.end * 100)
    got = fit(_disaggregated(), profile, requests, [hopeless], 512, "device")
    assert got.prefill == pytest.approx(4.0) and got.decode == pytest.approx(4.0)


# -- the profile and the command line ------------------------------------------------------------


def test_profile_names_a_missing_shape_and_round_trips(tmp_path):
    profile = _profile(tps=(1, 2), pps=(1,))
    with pytest.raises(KeyError, match="tp 4"):
        profile.prefill_latency(4)
    with pytest.raises(KeyError, match="pp 2"):
        profile.decode_latency(1, 2)
    profile.save(tmp_path / "p.json")
    assert Profile.load(tmp_path / "p.json") == profile


def test_plan_search_on_the_gpu_example_writes_a_config_that_loads(tmp_path):
    from jds.config import load_config

    out = tmp_path / "best.yaml"
    # Two devices: every kind of candidate is searched (prefill, decode and colocated shapes), in a third of four's time.
    cmd = [sys.executable, "-m", "jds.plan", "search", "--profile", str(GPU_PROFILE), "--devices", "2", "--workload", "chatbot",
           "--slo", "ttft=1.0,tpot=0.1", "--num-requests", "100", "--config", str(CONFIGS / "llama7b.yaml"), "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "| 1 |" in done.stdout and ("Disaggregation wins" in done.stdout or "Colocated serving wins" in done.stdout)
    config = load_config(out)
    assert len(config.placement.devices) <= 2
    assert config.model.name == "llama-2-7b"


def test_plan_profile_measures_and_fits_a_small_model(tmp_path):
    out = tmp_path / "profile.json"
    cmd = [sys.executable, "-m", "jds.plan", "profile", "--config", str(CONFIGS / "tiny.yaml"), "--out", str(out), "--cores-per-device", "2",
           "--max-tokens", "64", "--slots", "1,4", "--contexts", "16,64", "--repeats", "1"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fit error on its" in done.stdout
    profile = Profile.load(out)
    assert profile.model.name == "tiny-random" and profile.model.max_seq_len == 512
    assert {e.tp for e in profile.prefill} >= {1} and (1, 1) in {(e.tp, e.pp) for e in profile.decode}
    for entry in profile.prefill:
        assert len(entry.points) >= 6 and all(t > 0 for *_, t in entry.points)
        assert entry.model.per_token > 0  # more tokens take longer
    data = json.loads(out.read_text())
    assert data["source"].startswith("measured on")


def test_plan_rejects_a_bad_case_argument(tmp_path):
    done = subprocess.run([sys.executable, "-m", "jds.plan", "validate", "--case", "nothing", "--rates", "1"], capture_output=True, text=True)
    assert done.returncode == 1 and "CONFIG=PROFILE" in done.stderr


def test_a_measured_shape_is_predicted_by_its_measurement():
    entry = PrefillEntry(tp=1, model=PrefillModel(base=0.1, per_token=0.0, per_square=0.0), points=[(1, 32, 0.7)])
    assert entry.batch_seconds(1, 32) == 0.7
    assert entry.batch_seconds(2, 32) == pytest.approx(0.1)  # not measured: the fit
    decode = DecodeEntry(tp=1, pp=1, model=DecodeModel(base=0.05, per_row=0.0, per_context=0.0), points=[(8, 256, 0.11)])
    assert decode.seconds(8, 256) == 0.11 and decode.seconds(8, 512) == pytest.approx(0.05)


@pytest.mark.parametrize("workload", ["shared-prefix", "chatbot"])
def test_a_prediction_for_a_shared_prefix_workload_says_it_computes_every_prompt_whole(capsys, workload):
    from jds.plan import main

    assert main(["simulate", "--profile", str(GPU_PROFILE), "--config", str(CONFIGS / "llama7b.yaml"), "--workload", workload,
                 "--rates", "1", "--num-requests", "8"]) == 0  # fmt: skip
    said = capsys.readouterr().out
    assert ("models no prefix cache" in said) == (workload == "shared-prefix")
    assert "1024-token system prompt" in said or workload != "shared-prefix"


def test_plan_simulate_replays_a_trace(tmp_path):
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps({"timestamp": 250 * i, "input_length": 300, "output_length": 40}) + "\n" for i in range(20)))
    cmd = [sys.executable, "-m", "jds.plan", "simulate", "--profile", str(GPU_PROFILE), "--config", str(CONFIGS / "llama7b.yaml"),
           "--trace", str(trace), "--slo", "ttft=1,tpot=0.1"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    row = done.stdout.strip().splitlines()[-1].split("|")
    assert row[2].strip() == "20" and row[3].strip() == "100.0%"  # 4 req/s of short requests: well within the node


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["search", "--profile", str(GPU_PROFILE), "--devices", "0"], "--devices"),
        (["simulate", "--profile", str(GPU_PROFILE), "--rates", "1,abc"], "--rates"),
        (["profile", "--cores-per-device", "-1"], "--cores-per-device"),
        (["search", "--profile", str(GPU_PROFILE), "--devices", "8", "--slo", "ttft=fast"], "--slo"),
        (["simulate", "--profile", str(GPU_PROFILE), "--rates", "nan"], "--rates"),
        (["simulate", "--profile", str(GPU_PROFILE), "--slo-scale", "nan"], "--slo-scale"),
        (["search", "--profile", str(GPU_PROFILE), "--devices", "8", "--attainment", "5"], "--attainment"),
        (["simulate", "--seed", "-1"], "--seed"),
        (["search", "--profile", str(GPU_PROFILE), "--devices", "8", "--workload", "nosuch"], "--workload"),
    ],
)
def test_plan_refuses_bad_options_by_name(args, option):
    done = subprocess.run([sys.executable, "-m", "jds.plan", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and option in done.stderr, done.stderr[-500:]


def _refusal(capsys, argv: list[str]) -> tuple[int, str]:
    """Run ``python -m jds.plan`` in process: its exit status and what it wrote to stderr."""
    from jds.plan import main

    code = main(argv)
    return code, capsys.readouterr().err


def test_plan_names_a_profile_that_is_not_one(capsys, tmp_path):
    code, err = _refusal(capsys, ["search", "--profile", str(REPO / "README.md"), "--devices", "8"])
    assert code == 1 and err.startswith(f"error: --profile {REPO / 'README.md'}: not a profile (Invalid JSON") and err.count("\n") == 1
    lacking = json.loads(GPU_PROFILE.read_text())
    del lacking["device"]
    (tmp_path / "p.json").write_text(json.dumps(lacking))
    assert _refusal(capsys, ["simulate", "--profile", str(tmp_path / "p.json")])[1] == f"error: --profile {tmp_path / 'p.json'}: not a profile (device: Field required)\n"


def test_plan_reads_every_input_and_checks_every_output_before_the_slow_work(capsys, tmp_path):
    (tmp_path / "afile").write_text("")
    search = ["search", "--profile", str(GPU_PROFILE), "--devices", "8", "--workload", "chatbot", "--slo", "ttft=0.25,tpot=0.1"]
    assert _refusal(capsys, [*search, "--config", "configs/llama7b.yml", "--out", str(tmp_path / "best.yaml")]) == (
        1, "error: --config: config file not found: configs/llama7b.yml\n")  # fmt: skip
    code, err = _refusal(capsys, [*search, "--config", str(CONFIGS / "llama7b.yaml"), "--out", str(tmp_path / "afile" / "best.yaml")])
    assert code == 1 and err.startswith(f"error: --out {tmp_path / 'afile' / 'best.yaml'}: ")
    code, err = _refusal(capsys, ["profile", "--config", str(CONFIGS / "tiny.yaml"), "--out", str(tmp_path / "afile" / "p.json")])
    assert code == 1 and err.startswith("error: --out ")
    calibrate = ["calibrate", "--profile", str(GPU_PROFILE), "--config", str(CONFIGS / "tiny.yaml"), "--out", str(tmp_path / "afile" / "p.json")]
    assert _refusal(capsys, calibrate)[1].startswith("error: --out ")
    # The second case's profile is read before the first case's server starts.
    good, bad = f"{CONFIGS / 'tiny.yaml'}={GPU_PROFILE}", f"{CONFIGS / 'tiny.yaml'}={tmp_path / 'none.json'}"
    code, err = _refusal(capsys, ["validate", "--case", good, "--case", bad, "--rates", "1", "--out", str(tmp_path / "v")])
    assert code == 1 and err.startswith(f"error: --case {bad}: ") and not (tmp_path / "v").exists()
    code, err = _refusal(capsys, ["validate", "--case", good, "--rates", "1", "--out", str(tmp_path / "afile")])
    assert code == 1 and err.startswith(f"error: --out {tmp_path / 'afile'}: ")


def test_plan_finds_its_default_config_from_any_folder(tmp_path):
    cmd = [sys.executable, "-m", "jds.plan", "simulate", "--profile", str(GPU_PROFILE), "--rates", "1", "--num-requests", "4"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert str(CONFIGS / "smollm2-135m.yaml") in done.stdout
    helped = subprocess.run([*cmd[:4], "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path).stdout
    assert str(CONFIGS / "smollm2-135m.yaml") in " ".join(helped.split())


def test_the_profilers_transfer_job_measures_both_links():
    """What ``plan profile`` runs on a machine of two devices or more (this host profiles one)."""
    import jax

    from jds.planner.profiler import TRANSFER_MEGABYTES, _device_transfer, _process_transfer

    for measure in (_device_transfer, _process_transfer):
        points = measure(jax.devices()[:2], 1)
        assert [size for size, _ in points] == [mb * 2**20 for mb in TRANSFER_MEGABYTES]
        assert all(0 < seconds < 30 for _, seconds in points)
