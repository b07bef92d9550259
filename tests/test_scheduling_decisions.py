"""The engine and the planner's simulator decide alike: one request trace, the same decisions.

Both decide through ``jds.scheduling.policy``; each decision it makes is recorded
(``decision_recorder``): the lengths every prefill call takes, the room of each decode instance
and the one chosen, and each decode round's (rows, context). The engine runs the tiny model on CPU
devices, in this process or as role processes behind a router; the simulator a hand-made profile. Requests sent together are queued together in both (the engine's queue is
held while a group is submitted), and each group is let finish before the next, so no decision
depends on how fast anything ran. Within a group the engine's decisions still follow each
other as its threads make them: a finished request's slot taken by a waiting one, rounds that
shrink as requests leave, a decode round dispatched before the one in flight is read.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

import grpc
import pytest
import yaml

import decision_recorder
from jds.api import generation_pb2 as pb
from jds.api import generation_pb2_grpc as pb_grpc
from jds.bench.server_process import ServerProcess
from jds.bench.workloads import PlannedRequest
from jds.config import load_config
from jds.config.placement import Placement
from jds.engine.engine import Engine
from jds.engine.request import Request
from jds.model.loader import load_model
from jds.planner.latency import DecodeModel, PrefillModel, TransferModel
from jds.planner.profile import DecodeEntry, ModelFacts, PrefillEntry, Profile
from jds.planner.simulator import simulate
from jds.sampling_params import SamplingParams
from local_ports import free_ports
from tests_paths import CONFIGS

# (prompt length, tokens to generate) of each request, group by group
GROUPS = [
    [(5, 3), (20, 6), (40, 4)],
    [(9, 2), (17, 7), (33, 3), (3, 5), (60, 4), (12, 8)],
    [(50, 3), (2, 9)],
    # With six pages: all three are admitted (1 + 2 + 3 pages); the first needs a second page at
    # its third step and the youngest is preempted, then prefilled again with its tokens so far.
    [(14, 12), (30, 10), (45, 8)],
]
PLACEMENTS = {
    "colocated": {"instances": {"devices": [0], "slots": 2}},
    "colocated-chunked": {"instances": {"devices": [0], "slots": 3, "chunked_prefill": 16}},
    # Six pages of 16 positions for four slots: admission waits for pages, and running requests
    # that need a page preempt the youngest, which is prefilled again.
    "colocated-pages": {"instances": {"devices": [0], "slots": 4, "kv_pages": 6, "page_size": 16}},
    "disaggregated": {
        "mode": "disaggregated",
        "prefill": {"devices": [0], "max_batch": 8},
        "decode": [{"devices": [1], "slots": 4, "page_size": 16}, {"devices": [2], "slots": 2, "page_size": 16}],  # told apart by their row buckets
    },
}


class Decisions:
    """Every policy decision made in this process, by kind; decode rounds by instance (its row
    and context buckets)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.prefill: list[tuple[int, ...]] = []
        self.routes: list[tuple[tuple[int, ...], int]] = []
        self.rounds: dict[tuple, list[tuple[int, int]]] = collections.defaultdict(list)
        decision_recorder.install(self.add, monkeypatch.setattr)

    def add(self, kind: str, decision) -> None:
        if kind == "prefill":
            self.prefill.append(tuple(decision))
        elif kind == "route":
            self.routes.append((tuple(decision[0]), decision[1]))
        else:
            rows, contexts, shape = decision
            self.rounds[tuple(rows), tuple(contexts)].append(tuple(shape))

    def taken(self) -> tuple:
        return self.prefill, self.routes, dict(self.rounds)


@pytest.fixture(scope="module")
def tiny():
    return load_model(load_config(CONFIGS / "tiny.yaml"), progress=False)


def _profile(model) -> Profile:
    return Profile(
        source="hand-made for tests",
        device="test device",
        devices_per_node=8,
        device_memory_bytes=10**12,
        model=ModelFacts(name="tiny", num_layers=4, weight_bytes=10**6, kv_bytes_per_token=1000, max_seq_len=model.max_seq_len),
        prefill=[PrefillEntry(tp=1, model=PrefillModel(base=0.01, per_token=1e-4, per_square=0))],
        decode=[DecodeEntry(tp=1, pp=1, model=DecodeModel(base=0.005, per_row=1e-4, per_context=1e-6))],
        transfer={"device": TransferModel(latency=1e-3, bandwidth=1e9), "process": TransferModel(latency=2e-3, bandwidth=1e9)},
    )


def _indexed() -> list[tuple[int, int]]:
    return [(g, i) for g, group in enumerate(GROUPS) for i in range(len(group))]


def _prompt(group: int, index: int, n: int) -> tuple[int, ...]:
    """A prompt no other request's begins like, so no prefix cache shortens a prefill (the
    simulator models none)."""
    first = 7 + 100 * (10 * group + index)
    return tuple(range(first, first + n))


def _engine_decisions(model, placement: Placement, monkeypatch) -> tuple:
    decisions = Decisions(monkeypatch)
    engine = Engine(model, placement)
    try:
        for g, group in enumerate(GROUPS):
            with engine._waiting._cond:  # the group is queued whole before any instance looks
                streams = [
                    engine.submit(Request(f"g{g}r{i}", _prompt(g, i, n), SamplingParams(max_tokens=out, temperature=0, ignore_eos=True), i))
                    for i, (n, out) in enumerate(group)
                ]  # fmt: skip
            outs = [s.result() for s in streams]
            assert [len(o.token_ids) for o in outs] == [out for _, out in group]
        preempted = sum(w.batch.preemptions for w in engine.colocated_workers + engine.decode_workers)
    finally:
        engine.shutdown()
    return decisions.taken(), preempted


def _simulated_decisions(model, placement: Placement, monkeypatch) -> tuple:
    decisions = Decisions(monkeypatch)
    trace = [PlannedRequest(1000.0 * g, n, out) for g, group in enumerate(GROUPS) for n, out in group]
    records = simulate(placement, _profile(model), trace, model.max_seq_len)
    ends = [max(r.end for r, (g, _) in zip(records, _indexed()) if g == group) for group in range(len(GROUPS))]
    assert all(end < 1000.0 * (g + 1) for g, end in enumerate(ends))  # each group ends before the next
    assert [len(r.token_times) for r in records] == [out for group in GROUPS for _, out in group]
    return decisions.taken()


@pytest.mark.parametrize("name", PLACEMENTS)
def test_the_engine_and_the_simulator_make_the_same_decisions(tiny, monkeypatch, name):
    placement = Placement.model_validate(PLACEMENTS[name])
    engine, preempted = _engine_decisions(tiny, placement, monkeypatch)
    assert (preempted > 0) == (name == "colocated-pages")
    monkeypatch.undo()
    simulated = _simulated_decisions(tiny, placement, monkeypatch)
    prefill, routes, rounds = engine
    assert len(prefill) >= len(GROUPS) and sum(len(b) for b in prefill) == sum(map(len, GROUPS)) + preempted  # each preempted one again
    assert bool(routes) == (name == "disaggregated")
    assert sum(map(len, rounds.values())) > 10
    assert engine == simulated


# -- roles as processes ---------------------------------------------------------------------------

TESTS = Path(__file__).resolve().parent
STAGGERED = [(6, 300), (11, 300), (4, 300), (9, 300), (7, 300)]  # each sent once the one before has its first token
ALONE = (13, 20)  # then one request on an idle cluster


def _cluster_config(folder: Path) -> Path:
    config = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    config["placement"] = {
        "mode": "disaggregated",
        "prefill": {"devices": [0]},
        "decode": [{"devices": [1], "slots": 4, "page_size": 16}, {"devices": [2], "slots": 2, "page_size": 16}],
    }
    ports = free_ports(3)
    config["cluster"] = {"prefill": [f"127.0.0.1:{ports[0]}"], "decode": [f"127.0.0.1:{p}" for p in ports[1:]], "health_seconds": 0.2}
    config["server"] = {"max_waiting": 16, "compile_cache": None}  # the run's shared cache, never the home directory's
    path = folder / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _generate(stub, n: int, out: int, seed: int):
    request = pb.GenerateRequest(token_ids=list(range(7, 7 + n)), max_tokens=out, temperature=0.0, ignore_eos=True, seed=seed)
    return stub.Generate(request, timeout=120)


def test_across_processes_the_router_and_the_roles_decide_as_the_simulator(tiny, tmp_path, monkeypatch):
    """Staggered requests that all run at once: the prefill process's calls and the router's
    routing (by the room each decode process has, counting requests still landing) as simulated;
    then one request alone: its decode process's rounds as simulated."""
    decisions = tmp_path / "decisions"
    decisions.mkdir()
    monkeypatch.setenv("JDS_DECISIONS_DIR", str(decisions))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS / "decision_site"), str(TESTS), os.environ.get("PYTHONPATH")])))
    server = ServerProcess(_cluster_config(tmp_path), tmp_path / "launch.log", "--no-warmup")
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            calls, counts = [], []
            for i, (n, out) in enumerate(STAGGERED):
                calls.append(_generate(stub, n, out, i))
                counts.append(len(next(calls[-1]).token_ids))  # its first token: its prefill is done and it is routed
            assert [k + sum(len(m.token_ids) for m in call) for k, call in zip(counts, calls)] == [out for _, out in STAGGERED]
            first = {name: len(records) for name, records in _by_process(decisions).items()}  # before the one alone
            assert len(list(_generate(stub, *ALONE, 99))) >= 1
    finally:
        server.stop()
    served = _by_process(decisions)
    before = [decision for name, records in served.items() for decision in records[: first.get(name, 0)]]
    after = [decision for name, records in served.items() for decision in records[first.get(name, 0) :]]
    prefill = [tuple(d) for kind, d in before if kind == "prefill"]
    routes = [(tuple(tuple(room) for room in d[0]), d[1]) for kind, d in before if kind == "route"]  # rooms: (a slot free, pages left)
    alone = [tuple(d[2]) for kind, d in after if kind == "round"]

    monkeypatch.undo()
    placement = Placement.model_validate(yaml.safe_load((tmp_path / "cluster.yaml").read_text())["placement"])
    simulated = Decisions(monkeypatch)
    trace = [PlannedRequest(0.05 * i, n, out) for i, (n, out) in enumerate(STAGGERED)]
    simulate(placement, _profile(tiny), trace, tiny.max_seq_len, link="process")
    assert (prefill, routes) == (simulated.prefill, simulated.routes)
    # Each request commits the pages of its prompt and 300 tokens (19-20 of 16 positions), counted
    # by the router as it sends it: the larger instance (128 pages) takes requests while it has a
    # free slot and more pages left than the smaller one (64).
    assert routes == [
        (((True, 128), (True, 64)), 0), (((True, 108), (True, 64)), 0), (((True, 88), (True, 64)), 0),
        (((True, 69), (True, 64)), 0), (((False, 49), (True, 64)), 1),
    ]  # fmt: skip
    monkeypatch.undo()
    simulated = Decisions(monkeypatch)
    simulate(placement, _profile(tiny), [PlannedRequest(0.0, *ALONE)], tiny.max_seq_len, link="process")
    assert alone == [shape for shapes in simulated.rounds.values() for shape in shapes] and len(alone) == ALONE[1] - 1


def _by_process(folder: Path) -> dict[str, list]:
    """Each role process's decisions, in its order, by its file's name."""
    files = sorted(folder.glob("*.jsonl"))
    return {p.name: [tuple(record) for record in records] for p, records in zip(files, decision_recorder.read_folder(folder))}
