"""Config files: the shipped ones validate, mistakes are named with their key path."""

from __future__ import annotations

import pytest

from jds.config import ConfigError, load_config, parse_config
from jds.model.loader import checkpoint_format, resolve_dtype
from tests_paths import CONFIGS


@pytest.mark.parametrize("name", ["smollm2-135m.yaml", "smollm2-disaggregated.yaml", "llama7b.yaml", "llama7b-1gpu.yaml", "llama7b-2gpu.yaml", "tiny.yaml"])
def test_shipped_configs_validate(name):
    config = load_config(CONFIGS / name)
    assert config.model.name


def test_llama7b_has_llama2_shapes():
    arch = load_config(CONFIGS / "llama7b.yaml").model.architecture
    assert (arch.num_layers, arch.hidden_size, arch.num_heads, arch.intermediate_size, arch.vocab_size) == (
        32, 4096, 32, 11008, 32000,
    )
    assert 6.5e9 < arch.num_params() < 6.8e9


def test_llama7b_placement_is_refused_here_with_both_figures():
    from jds.model.loader import check_config

    config = load_config(CONFIGS / "llama7b.yaml")
    assert config.placement.mode == "disaggregated" and len(config.placement.devices) == 8
    with pytest.raises(ConfigError, match=r"placement needs [\d.]+ GiB of host memory, [\d.]+ GiB is usable"):
        check_config(config)  # float32 on CPU: three 27 GB copies of the weights


class _H200:
    """What the fit check reads of one H200 under a server: JAX's limit at 90% of its 140.4 GiB."""

    platform = "gpu"

    def memory_stats(self) -> dict:
        return {"bytes_limit": int(0.9 * 143771 * 2**20)}


@pytest.mark.parametrize("name", ["llama7b-1gpu.yaml", "llama7b-2gpu.yaml"])
def test_gpu_configs_fit_an_h200_and_twice_their_slots_do_not(name):
    from jds.config.fit import check_placement

    config = load_config(CONFIGS / name)
    arch, devices = config.model.architecture, [_H200(), _H200()]
    check_placement(config.placement, arch, 2, config.model.max_seq_len, devices)  # bfloat16, one orientation
    instances = config.placement.instances or config.placement.decode
    data = config.placement.model_dump()
    for inst in data["instances"] or data["decode"]:
        inst["slots"] *= 2
    doubled = type(config.placement).model_validate(data)
    assert instances[0].slots > 1
    message = r"weights \+ [\d.]+ GiB KV \+ [\d.]+ GiB transient per device exceed device \d+'s [\d.]+ GiB, the part JAX may use \(XLA_PYTHON_CLIENT_MEM_FRACTION"
    with pytest.raises(ConfigError, match=message):
        check_placement(doubled, arch, 2, config.model.max_seq_len, devices)


def test_tiny_heads_split_four_ways():
    arch = load_config(CONFIGS / "tiny.yaml").model.architecture
    assert arch.num_heads % 4 == 0 and arch.num_kv_heads % 4 == 0


def test_default_checkpoint_resolves_inside_the_package(smollm2_gguf):
    config = load_config()
    path = config.resolve_path(config.model.checkpoint)
    assert path == smollm2_gguf and checkpoint_format(path, "auto") == "gguf"


def test_relative_paths_start_at_the_config_folder(tmp_path):
    (tmp_path / "c.yaml").write_text("model:\n  checkpoint: weights/m.gguf\n")
    config = load_config(tmp_path / "c.yaml")
    assert config.resolve_path(config.model.checkpoint) == tmp_path / "weights" / "m.gguf"


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"model": {"checkpoint": "x.gguf", "dtpye": "float32"}}, r"model\.dtpye: Extra inputs"),
        ({"model": {"checkpoint": "x.gguf"}, "placment": {}}, r"placment: Extra inputs"),
        ({"model": {"checkpoint": "x.gguf", "dtype": "float64"}}, r"model\.dtype"),
        ({"model": {}}, "model.checkpoint, or model.architecture"),
        ({"model": {"architecture": {"vocab_size": 10, "hidden_size": 64, "intermediate_size": 8,
                                     "num_layers": 1, "num_heads": 3, "num_kv_heads": 2}}},
         "multiple of num_kv_heads"),
        ({"model": {"checkpoint": "x.gguf", "max_seq_len": 0}}, r"model\.max_seq_len"),
        (["not", "a", "mapping"], "mapping"),
    ],
)
def test_config_errors_name_the_key(data, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_config(data)


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    config = parse_config({"model": {"checkpoint": "package://no_such_pkg_xyz/m.gguf"}})
    with pytest.raises(ConfigError, match="no_such_pkg_xyz"):
        config.resolve_path(config.model.checkpoint)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        checkpoint_format(tmp_path / "nowhere", "auto")


def test_auto_dtype_is_float32_on_cpu():
    assert resolve_dtype("auto").name == "float32"
    assert resolve_dtype("bfloat16").name == "bfloat16"
