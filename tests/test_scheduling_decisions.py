"""The engine and the planner's simulator decide alike: one request trace, the same decisions.

Both decide through ``jds.scheduling.policy``; each decision it makes is recorded here: the
lengths every prefill call takes, the room of each decode instance and the one chosen, and each
decode round's (rows, context). The engine runs the tiny model on CPU devices; the simulator a
hand-made profile. Requests sent together are queued together in both (the engine's queue is
held while a group is submitted), and each group is let finish before the next, so no decision
depends on how fast anything ran. Within a group the engine's decisions still follow each
other as its threads make them: a finished request's slot taken by a waiting one, rounds that
shrink as requests leave, a decode round dispatched before the one in flight is read.
"""

from __future__ import annotations

import collections

import pytest

from jds.bench.workloads import PlannedRequest
from jds.config import load_config
from jds.engine.engine import Engine
from jds.engine.request import Request
from jds.mesh.placement import Placement
from jds.model.loader import load_model
from jds.planner.latency import DecodeModel, PrefillModel, TransferModel
from jds.planner.profile import DecodeEntry, ModelFacts, PrefillEntry, Profile
from jds.planner.simulator import simulate
from jds.sampling_params import SamplingParams
from jds.scheduling import policy
from tests_paths import CONFIGS

# (prompt length, tokens to generate) of each request, group by group
GROUPS = [
    [(5, 3), (20, 6), (40, 4)],
    [(9, 2), (17, 7), (33, 3), (3, 5), (60, 4), (12, 8)],
    [(100, 3), (2, 9)],
]
PLACEMENTS = {
    "colocated": {"instances": {"devices": [0], "slots": 2}},
    "colocated-chunked": {"instances": {"devices": [0], "slots": 3, "chunked_prefill": 16}},
    "disaggregated": {
        "mode": "disaggregated",
        "prefill": {"devices": [0], "max_batch": 8},
        "decode": [{"devices": [1], "slots": 4}, {"devices": [2], "slots": 2}],  # told apart by their row buckets
    },
}


class Decisions:
    """Every policy decision, by kind; decode rounds by instance (its row and context buckets)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.prefill: list[tuple[int, ...]] = []
        self.routes: list[tuple[tuple[int, ...], int]] = []
        self.rounds: dict[tuple, list[tuple[int, int]]] = collections.defaultdict(list)
        take, most_room, round_shape = policy.PrefillBatches.take, policy.most_room, policy.round_shape

        def record_take(batches, lengths, limit):
            lengths = list(lengths)
            n = take(batches, iter(lengths), limit)
            if n:
                self.prefill.append(tuple(lengths[:n]))
            return n

        def record_room(rooms):
            chosen = most_room(rooms)
            self.routes.append((tuple(rooms), chosen))
            return chosen

        def record_round(rows, contexts, highest, longest):
            shape = round_shape(rows, contexts, highest, longest)
            self.rounds[tuple(rows), tuple(contexts)].append(shape)
            return shape

        monkeypatch.setattr(policy.PrefillBatches, "take", record_take)
        monkeypatch.setattr(policy, "most_room", record_room)
        monkeypatch.setattr(policy, "round_shape", record_round)

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
        transfer={"device": TransferModel(latency=1e-3, bandwidth=1e9)},
    )


def _engine_decisions(model, placement: Placement, monkeypatch) -> tuple:
    decisions = Decisions(monkeypatch)
    engine = Engine(model, placement)
    try:
        for g, group in enumerate(GROUPS):
            with engine._waiting._cond:  # the group is queued whole before any instance looks
                streams = [
                    engine.submit(Request(f"g{g}r{i}", tuple(range(7, 7 + n)), SamplingParams(max_tokens=out, temperature=0, ignore_eos=True), i))
                    for i, (n, out) in enumerate(group)
                ]  # fmt: skip
            outs = [s.result() for s in streams]
            assert [len(o.token_ids) for o in outs] == [out for _, out in group]
    finally:
        engine.shutdown()
    return decisions.taken()


def _simulated_decisions(model, placement: Placement, monkeypatch) -> tuple:
    decisions = Decisions(monkeypatch)
    trace = [PlannedRequest(1000.0 * g, n, out) for g, group in enumerate(GROUPS) for n, out in group]
    records = simulate(placement, _profile(model), trace, model.max_seq_len)
    assert max(r.end for r in records[:3]) < 1000 and max(r.end for r in records[3:9]) < 2000  # each group ends before the next
    return decisions.taken()


@pytest.mark.parametrize("name", PLACEMENTS)
def test_the_engine_and_the_simulator_make_the_same_decisions(tiny, monkeypatch, name):
    placement = Placement.model_validate(PLACEMENTS[name])
    engine = _engine_decisions(tiny, placement, monkeypatch)
    monkeypatch.undo()
    simulated = _simulated_decisions(tiny, placement, monkeypatch)
    prefill, routes, rounds = engine
    assert len(prefill) >= len(GROUPS) and sum(len(b) for b in prefill) == sum(map(len, GROUPS))
    assert bool(routes) == (name == "disaggregated")
    assert sum(map(len, rounds.values())) > 10
    assert engine == simulated
