"""Weight formats: GGUF dequantisation, safetensors shards, orbax round trip, conversion, bad files."""

from __future__ import annotations

import json
import shutil

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from transformers import AutoModelForCausalLM

from jds.convert import main as convert_main
from jds.model.architecture import Architecture
from jds.model.tokenizer import Tokenizer
from jds.model.weights.gguf_file import load_gguf
from jds.model.weights.hf_checkpoint import load_hf
from jds.model.weights.jds_checkpoint import load_checkpoint, save_checkpoint
from reference_models import save_hf, tiny_hf_model, write_gguf

Q = gguf.GGMLQuantizationType


def _hf_layout(params) -> dict[str, np.ndarray]:
    """Layer 0's q and down projections and the embedding, in Hugging Face layout."""
    d = params.embed.shape[1]
    return {
        "model.embed_tokens.weight": np.asarray(params.embed),
        "model.layers.0.self_attn.q_proj.weight": np.asarray(params.layers.wq[0]).reshape(d, -1).T,
        "model.layers.0.mlp.down_proj.weight": np.asarray(params.layers.w_down[0]).T,
    }


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_gguf_dequantisation_matches_transformers(tmp_path, qtype):
    model = tiny_hf_model(rope_scaling=False)
    path = write_gguf(model, tmp_path / f"tiny-{qtype.name}.gguf", qtype)
    arch, params = load_gguf(path, progress=False)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).state_dict()
    original = model.state_dict()
    # Quantisation error against the float original: Q4 steps are ~1/16 of a block's range.
    tolerance = {Q.F32: 0, Q.F16: 1e-3, Q.Q8_0: 2e-3, Q.Q4_0: 2e-2, Q.Q4_1: 2e-2}[qtype]
    for name, ours in _hf_layout(params).items():
        np.testing.assert_array_equal(ours, reference[name].numpy(), err_msg=name)
        np.testing.assert_allclose(ours, original[name].numpy(), atol=tolerance, rtol=0, err_msg=name)
    assert arch.vocab_size == 256 and not arch.tie_embeddings


def test_unsupported_quantisation_is_named(tmp_path):
    path = tmp_path / "iq.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_embedding_length(256)
    w.add_feed_forward_length(256)
    w.add_head_count(2)
    w.add_vocab_size(256)
    block_bytes = gguf.GGML_QUANT_SIZES[Q.IQ2_XXS][1]
    w.add_tensor("token_embd.weight", np.zeros((256, block_bytes), np.uint8), raw_dtype=Q.IQ2_XXS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="IQ2_XXS"):
        load_gguf(path, progress=False)


def test_sharded_safetensors_with_index(tmp_path):
    model = tiny_hf_model()
    save_hf(model, tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 2
    _, params = load_hf(tmp_path, progress=False)
    original = model.state_dict()
    for name, ours in _hf_layout(params).items():
        np.testing.assert_array_equal(ours, original[name].numpy(), err_msg=name)


def test_bad_files_name_the_problem(tmp_path, smollm2_gguf):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_gguf(tmp_path / "nope.gguf")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        load_gguf(garbage)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path)

    model = tiny_hf_model()
    good = save_hf(model, tmp_path / "good", shard_size="10GB")
    # An extra tensor the architecture does not know.
    extra = tmp_path / "extra"
    shutil.copytree(good, extra)
    save_file({"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}, extra / "more.safetensors")
    with pytest.raises(ValueError, match="unknown tensor.*q_proj.bias"):
        load_hf(extra, progress=False)
    # A config that disagrees with the tensors' shapes.
    wrong = tmp_path / "wrong"
    shutil.copytree(good, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (wrong / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"mlp.*_proj.weight has shape .*expects"):
        load_hf(wrong, progress=False)
    # The real GGUF against a config with other shapes.
    arch, _ = load_gguf(smollm2_gguf, progress=False)
    other = Architecture(**{**arch.model_dump(), "intermediate_size": 1024})
    with pytest.raises(ValueError, match="ffn|mlp"):
        load_gguf(smollm2_gguf, other, progress=False)


def test_orbax_round_trip_and_dtype(tmp_path):
    _, params = load_hf(save_hf(tiny_hf_model(), tmp_path / "hf"), progress=False)
    arch, _ = load_hf(tmp_path / "hf", progress=False)
    save_checkpoint(tmp_path / "ckpt", arch, params)
    with pytest.raises(FileExistsError):
        save_checkpoint(tmp_path / "ckpt", arch, params)
    restored_arch, restored = load_checkpoint(tmp_path / "ckpt", jnp.float32)
    assert restored_arch == arch
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, half = load_checkpoint(tmp_path / "ckpt", jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(half))
    other = Architecture(**{**arch.model_dump(), "num_layers": 2})
    with pytest.raises(ValueError, match="differs"):
        load_checkpoint(tmp_path / "ckpt", jnp.float32, other)
    with pytest.raises(FileNotFoundError, match="not a jds checkpoint"):
        load_checkpoint(tmp_path / "hf", jnp.float32)


def test_convert_cli(tmp_path, smollm2_gguf, capsys):
    dst = tmp_path / "smollm2"
    assert convert_main(["--from", "gguf", str(smollm2_gguf), "--to", str(dst)]) == 0
    saved, original = Tokenizer.from_file(dst), Tokenizer.from_gguf(smollm2_gguf)
    chat = [{"role": "user", "content": "Hi there, 12 apples?"}]
    assert saved.encode_chat(chat) == original.encode_chat(chat)
    assert saved.eos_ids == original.eos_ids and saved.bos_id == original.bos_id
    arch, params = load_checkpoint(dst, jnp.float32)
    _, direct = load_gguf(smollm2_gguf, progress=False)
    np.testing.assert_array_equal(np.asarray(params.layers.wq), direct.layers.wq)
    assert convert_main(["--from", "gguf", str(smollm2_gguf), "--to", str(dst)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert convert_main(["--from", "hf", str(tmp_path / "missing"), "--to", str(tmp_path / "x")]) == 1
    assert "not found" in capsys.readouterr().err
