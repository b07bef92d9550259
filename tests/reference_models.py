"""Small reference checkpoints written with transformers and gguf, for parity and format tests."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from gguf.quants import quantize
from transformers import LlamaConfig, LlamaForCausalLM

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)


def tiny_hf_model(tie: bool = False, rope_scaling: bool = True, seed: int = 0) -> LlamaForCausalLM:
    """A random GQA Llama; with ``rope_scaling`` it uses Llama 3's scaled frequencies."""
    torch.manual_seed(seed)
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if rope_scaling:
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
    config = LlamaConfig(**TINY, tie_word_embeddings=tie, rope_parameters=rope)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # default init leaves norms at one; vary them so norm loading is tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_hf(model: LlamaForCausalLM, directory: Path, shard_size: str = "40KB") -> Path:
    """Save as safetensors, split into several shards with an index file."""
    model.save_pretrained(directory, max_shard_size=shard_size, safe_serialization=True)
    return directory


def _permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's per-head interleave of q/k rows (its converter applies this)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def write_gguf(model: LlamaForCausalLM, path: Path, qtype: gguf.GGMLQuantizationType) -> Path:
    """Write a llama GGUF the way llama.cpp's converter lays it out, 2-D weights in ``qtype``.

    A byte-level vocabulary of 256 single-byte tokens keeps transformers' GGUF loader content.
    """
    cfg = model.config
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([bytes([i]).decode("latin-1") for i in range(cfg.vocab_size)])
    w.add_token_types([gguf.TokenType.NORMAL] * cfg.vocab_size)
    w.add_token_merges([])
    w.add_eos_token_id(0)
    for name, tensor in model.state_dict().items():
        array = tensor.numpy().astype(np.float32)
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            gname = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            gname = f"blk.{layer}.{_GGUF_NAMES[rest]}"
            if rest == "self_attn.q_proj.weight":
                array = _permute_rows(array, cfg.num_attention_heads)
            elif rest == "self_attn.k_proj.weight":
                array = _permute_rows(array, cfg.num_key_value_heads)
        if array.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, array)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(gname, array.astype(np.float16))
        else:
            w.add_tensor(gname, quantize(array, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
