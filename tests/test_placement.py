"""Placement sections: the schema, every refusal naming its key, stage splits and sharding rules."""

from __future__ import annotations

import jax
import pytest
from jax.sharding import PartitionSpec

from jds.config import ConfigError, load_config, parse_config
from jds.config.fit import check_placement, memory_needs
from jds.config.placement import Placement
from jds.config.stages import stage_spans
from jds.mesh.rules import make_mesh, mesh_spec, shardings
from jds.mesh.stages import stage_params
from jds.model.params import init_params
from tests_paths import CONFIGS

TINY = load_config(CONFIGS / "tiny.yaml").model.architecture  # 4 layers, 8 heads, 4 KV heads, mlp 256


def _check(placement: dict, max_seq_len: int = 512) -> None:
    check_placement(Placement.model_validate(placement), TINY, 4, max_seq_len, jax.devices())


def test_the_issue_examples_parse():
    config = parse_config(
        {
            "model": {"architecture": TINY.model_dump(), "checkpoint": None},
            "placement": {
                "mode": "disaggregated",
                "prefill": {"devices": [0, 1, 2, 3], "tp": 4},
                "decode": {"devices": [4, 5, 6, 7], "pp": 2, "tp": 2, "slots": 32, "max_seq_len": 512},
            },
        }
    )
    p = config.placement
    assert len(p.prefill) == 1 and p.decode[0].stage_devices(1) == [6, 7]
    assert p.decode[0].num_microbatches(cpu=False) == 2 and p.decode[0].num_microbatches(cpu=True) == 1
    check_placement(p, TINY, 4, 512, jax.devices())
    colo = Placement.model_validate(
        {"mode": "colocated", "instances": [{"devices": [0, 1], "tp": 2, "slots": 32, "max_seq_len": 512, "chunked_prefill": 64}]}
    )
    assert colo.instances[0].chunked_prefill == 64


def test_default_placement_is_one_colocated_device():
    p = load_config(CONFIGS / "smollm2-135m.yaml").placement
    assert p.mode == "colocated" and [i.devices for i in p.instances] == [[0]]


@pytest.mark.parametrize(
    "placement, message",
    [
        ({"mode": "disaggregated", "prefill": {"devices": [0, 1]}, "decode": {"devices": [1]}}, "tp 1 needs exactly 1 devices"),
        ({"mode": "disaggregated", "prefill": {"devices": [0]}, "decode": {"devices": [0]}}, "device 0 is used by both prefill"),
        ({"mode": "disaggregated", "prefill": {"devices": [0]}}, "at least one 'prefill' and one 'decode'"),
        ({"mode": "colocated", "decode": {"devices": [0]}}, "for mode disaggregated"),
        ({"instances": [{"devices": [0]}, {"devices": [0]}]}, r"instances\[0\] and instances\[1\]"),
        ({"mode": "disaggregated", "prefill": {"devices": [0]}, "decode": {"devices": [1, 2], "pp": 2, "slots": 3, "microbatches": 2}}, "slots 3 is not a multiple"),
        ({"mode": "disaggregated", "prefill": {"devices": [0]}, "decode": {"devices": [1, 2], "pp": 2, "layers_per_stage": [4]}}, "1 entries for pp 2"),
        ({"instances": {"devices": [0], "slots": 0}}, "slots"),
        ({"instances": {"devices": [0], "colour": "red"}}, "colour"),
        ({"instances": {"devices": [0]}, "cpus": []}, "placement.cpus"),
    ],
)
def test_schema_refusals(placement, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"model": {"architecture": TINY.model_dump()}, "placement": placement})


@pytest.mark.parametrize(
    "placement, message",
    [
        ({"instances": {"devices": [8]}}, r"placement.instances\[0\].devices: \[8\] do not exist"),
        ({"instances": {"devices": [0, 1, 2], "tp": 3}}, r"instances\[0\].tp: 3 does not divide the model's num_heads"),
        ({"mode": "disaggregated", "prefill": {"devices": [0]}, "decode": {"devices": [1, 2, 3, 4, 5, 6, 7, 8][:5], "pp": 5}}, r"decode\[0\].pp: pp 5 is larger than the model's 4 layers"),
        ({"mode": "disaggregated", "prefill": {"devices": [0]}, "decode": {"devices": [1, 2], "pp": 2, "layers_per_stage": [1, 2]}}, r"decode\[0\].layers_per_stage: .* sums to 3"),
        ({"instances": {"devices": [0], "max_seq_len": 4096}}, r"max_seq_len: 4096 exceeds the model's max_position_embeddings"),
        ({"instances": {"devices": [0], "slots": 100000, "max_seq_len": 1024}}, r"host memory.*instances\[0\].*lower kv_pages, kv_memory_gb, or slots or max_seq_len"),
        ({"mode": "disaggregated", "prefill": {"devices": [0], "kv_pages": 31}, "decode": {"devices": [1], "page_size": 16}},
         r"prefill\[0\].kv_pages: its prefix cache's 31 pages of 16 positions hold less than one prompt of max_seq_len \(512\)"),
        ({"mode": "disaggregated", "prefill": {"devices": [0], "kv_memory_gb": 1e-4}, "decode": {"devices": [1], "page_size": 8}},
         r"prefill\[0\].kv_memory_gb: its prefix cache's 6 pages of 8 positions hold less"),
    ],
)
def test_refusals_against_model_and_machine(placement, message):
    with pytest.raises(ConfigError, match=message):
        _check(placement)


def test_a_value_the_instance_inherits_is_named_where_it_was_given():
    with pytest.raises(ConfigError, match=r"^model.max_seq_len: 4096 exceeds the model's max_position_embeddings"):
        _check({"instances": {"devices": [0]}}, max_seq_len=4096)
    with pytest.raises(ConfigError, match=r"^placement.instances\[0\].page_size: 1024 positions exceed max_seq_len \(512\)"):
        _check({"instances": {"devices": [0], "page_size": 1024}})
    _check({"instances": {"devices": [0]}}, max_seq_len=32)  # the default page (64) is not the user's to answer for
    # a role process holds its own devices only: the others' are None, and their memory is theirs to check
    placement = Placement.model_validate({"mode": "disaggregated", "prefill": {"devices": [0]}, "decode": {"devices": [1]}})
    check_placement(placement, TINY, 4, 512, [None, jax.devices()[0]])


def test_a_prefill_instances_pool_of_one_longest_prompt_or_none_at_all_is_accepted():
    _check({"mode": "disaggregated", "prefill": {"devices": [0], "kv_pages": 32}, "decode": {"devices": [1], "page_size": 16}})  # 32 x 16 = 512
    _check({"mode": "disaggregated", "prefill": {"devices": [0], "kv_pages": 1, "enable_prefix_caching": False}, "decode": {"devices": [1]}})


def test_tp_must_divide_kv_heads_too():
    arch = TINY.model_copy(update={"num_heads": 8, "num_kv_heads": 2})
    with pytest.raises(ConfigError, match=r"tp: 4 does not divide the model's num_kv_heads \(2\)"):
        check_placement(Placement.model_validate({"instances": {"devices": [0, 1, 2, 3], "tp": 4}}), arch, 4, 64, jax.devices())


def test_uneven_stage_splits_are_balanced_or_explicit():
    assert [s.num_layers for s in stage_spans(30, 4)] == [8, 8, 7, 7]
    assert [(s.start, s.stop) for s in stage_spans(4, 3)] == [(0, 2), (2, 3), (3, 4)]
    spans = stage_spans(4, 2, [1, 3])
    assert [(s.start, s.stop, s.first, s.last) for s in spans] == [(0, 1, True, False), (1, 4, False, True)]


@pytest.mark.parametrize("tie", [False, True])
def test_stage_params_hold_only_what_the_stage_runs(tie):
    arch = TINY.model_copy(update={"tie_embeddings": tie})
    params = init_params(arch, jax.random.key(0))
    first, middle, last = (stage_params(params, s) for s in stage_spans(4, 3))
    assert first.embed is not None and first.final_norm is None and first.lm_head is None
    assert middle.embed is None and middle.final_norm is None and middle.layers.wq.shape[0] == 1
    assert last.final_norm is not None and (last.embed is not None) == tie and (last.lm_head is None) == tie


def test_sharding_rules_split_heads_and_mlp_only():
    assert mesh_spec(("layers", "embed", "q_heads", "head_dim")) == PartitionSpec(None, None, "tp", None)
    assert mesh_spec(("kv", "layers", "batch", "kv_heads", "seq", "head_dim")) == PartitionSpec(None, None, None, "tp", None, None)
    params = init_params(TINY, jax.random.key(0))
    sh = shardings(params, make_mesh(jax.devices()[:2]))
    assert sh.layers.w_gate.spec == PartitionSpec(None, None, "tp") and sh.embed.spec == PartitionSpec(None, None)
    placed = jax.device_put(params, sh)
    assert placed.layers.wk.addressable_shards[0].data.shape == (4, 128, 2, 16)


def test_int8_weights_are_counted_at_one_byte_and_the_cache_at_the_activations_width():
    p = Placement.model_validate({"instances": {"devices": [0], "slots": 2}})
    (full,) = memory_needs(p, TINY, 4, 512)
    (int8,) = memory_needs(p, TINY, 4, 512, weight_itemsize=1)
    assert int8.weights * 4 == full.weights and int8.kv == full.kv


def test_memory_needs_count_stage_slices_and_the_prefill_instances_pool():
    def placement(prefill: dict) -> Placement:
        return Placement.model_validate(
            {"mode": "disaggregated", "prefill": {"devices": [0], **prefill}, "decode": {"devices": [1, 2], "pp": 2, "slots": 4, "max_seq_len": 64, "page_size": 16}}
        )

    needs = memory_needs(placement({}), TINY, 4, 512)
    stage_kv = 2 * 2 * 4 * 4 * 64 * 16 * 4  # K and V, 2 layers, 4 slots, 4 KV heads, 64 positions, head_dim 16, f32
    pool_kv = 2 * 4 * 8 * 4 * 64 * 16 * 4  # its prefix cache's pool: 8 sequences of the placement's 64 positions, 4 layers
    assert [n.kv for n in needs] == [pool_kv, stage_kv, stage_kv]
    assert [n.devices for n in needs] == [(0,), (1,), (2,)]
    assert memory_needs(placement({"kv_pages": 3}), TINY, 4, 512)[0].kv == 3 * pool_kv // 32  # 32 pages of 16 make the default
    assert memory_needs(placement({"enable_prefix_caching": False}), TINY, 4, 512)[0].kv == 0
    assert memory_needs(placement({"processes": 1, "devices": [0, 3], "tp": 2}), TINY, 4, 512)[0].kv == pool_kv // 2  # per device
    with pytest.raises(ValueError, match="enable_prefix_caching: an instance spanning several processes keeps no prefix cache"):
        placement({"devices": [0, 3], "tp": 2, "processes": 2, "enable_prefix_caching": True})
    assert memory_needs(placement({"devices": [0, 3], "tp": 2, "processes": 2}), TINY, 4, 512)[0].kv == 0


def test_memory_needs_count_what_a_prefill_call_holds_and_what_a_decode_stage_receives():
    def placement(decode_max_seq_len: int | None) -> Placement:
        return Placement.model_validate(
            {"mode": "disaggregated", "prefill": {"devices": [0], "max_batch_tokens": 256},
             "decode": {"devices": [1, 2], "pp": 2, "slots": 4, "max_seq_len": decode_max_seq_len}}
        )  # fmt: skip

    prefill, *stages = memory_needs(placement(None), TINY, 4, 512)
    kv_per_token = 2 * 4 * 4 * 16 * 4  # K and V, 4 layers, 4 KV heads, head_dim 16, float32
    # the largest call is one prompt of max_seq_len (512 > 256): its KV, that of the two batches
    # waiting on the transfer queue and of the one being moved, and the pages taken from it;
    # one layer's float32 scores over 512 x 512 positions of 8 heads, and the MLP's two
    # intermediate activations
    assert prefill.transient == 5 * 512 * kv_per_token + 512 * 512 * 8 * 4 + 2 * 512 * 256 * 4
    assert [s.transient for s in stages] == [512 * kv_per_token // 2] * 2  # each stage receives its 2 layers
    assert prefill.per_device == prefill.weights + prefill.kv + prefill.transient  # kv: its prefix cache's pool
    # prefill is built for the longest decode instance: at 64 positions, its largest call is a
    # batch of 256 tokens of prompts up to 64
    prefill, *stages = memory_needs(placement(64), TINY, 4, 512)
    assert prefill.transient == 5 * 256 * kv_per_token + 256 * 64 * 8 * 4 + 2 * 256 * 256 * 4
    assert [s.transient for s in stages] == [256 * kv_per_token // 2] * 2


def test_pinning_to_cores_the_process_cannot_use_is_refused():
    from jds.server import _pin_cpus

    config = parse_config({"model": {"architecture": TINY.model_dump()}, "placement": {"cpus": [4096]}})
    with pytest.raises(ConfigError, match=r"placement.cpus: cores \[4096\] are not available"):
        _pin_cpus(config.placement.cpus, "placement.cpus")
