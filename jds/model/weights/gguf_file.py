"""GGUF files (llama.cpp's format): architecture from metadata, dequantised Llama weights.

llama.cpp stores the query and key projections with the rows of each head interleaved for its
rotary kernel; they are permuted back to the Hugging Face order that the model code uses.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf.quants import dequantize

from jds.model.architecture import Architecture, RopeScaling
from jds.model.params import Params
from jds.model.weights.layout import params_from_hf_tensors

SUPPORTED_TYPES = frozenset(
    {
        gguf.GGMLQuantizationType.F32,
        gguf.GGMLQuantizationType.F16,
        gguf.GGMLQuantizationType.BF16,
        gguf.GGMLQuantizationType.Q4_0,
        gguf.GGMLQuantizationType.Q4_1,
        gguf.GGMLQuantizationType.Q5_0,
        gguf.GGMLQuantizationType.Q5_1,
        gguf.GGMLQuantizationType.Q8_0,
        gguf.GGMLQuantizationType.Q4_K,
        gguf.GGMLQuantizationType.Q5_K,
        gguf.GGMLQuantizationType.Q6_K,
    }
)

_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises bare ValueErrors/struct errors on garbage
        raise ValueError(f"{path} is not a readable GGUF file: {exc}") from exc


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_architecture(reader: gguf.GGUFReader) -> Architecture:
    """The architecture recorded in a GGUF file's metadata."""
    arch_name = _field(reader, "general.architecture")
    if arch_name != "llama":
        raise ValueError(f"{reader.data.filename}: unsupported GGUF architecture {arch_name!r} (supported: 'llama')")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ValueError(
            f"{reader.data.filename}: per-frequency RoPE factors (rope_freqs.weight) are not supported; "
            "load the Hugging Face checkpoint instead"
        )
    p = "llama."
    heads = _field(reader, p + "attention.head_count")
    scaling = None
    if _field(reader, p + "rope.scaling.type", "none") == "linear":
        scaling = RopeScaling(type="linear", factor=_field(reader, p + "rope.scaling.factor"))
    vocab = _field(reader, p + "vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    return Architecture(
        vocab_size=vocab,
        hidden_size=_field(reader, p + "embedding_length"),
        intermediate_size=_field(reader, p + "feed_forward_length"),
        num_layers=_field(reader, p + "block_count"),
        num_heads=heads,
        num_kv_heads=_field(reader, p + "attention.head_count_kv", heads),
        head_dim=_field(reader, p + "attention.key_length"),
        rope_theta=_field(reader, p + "rope.freq_base", 10000.0),
        rope_scaling=scaling,
        rms_norm_eps=_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5),
        tie_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        max_position_embeddings=_field(reader, p + "context_length", 4096),
    )


def _unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row interleave of the q/k projections."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(name: str) -> str | None:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def load_gguf(
    source: str | os.PathLike | gguf.GGUFReader, arch: Architecture | None = None, dtype: np.dtype = np.float32, progress: bool = True
) -> tuple[Architecture, Params]:
    """Dequantise a Llama GGUF file (a path or an open reader) into host-side Params and the
    architecture it records.

    When ``arch`` is given (from a config), the file must agree with it tensor for tensor.
    """
    reader = source if isinstance(source, gguf.GGUFReader) else open_gguf(source)
    path = getattr(reader.data, "filename", source)
    file_arch = gguf_architecture(reader)
    arch = arch or file_arch

    def loader(tensor: gguf.ReaderTensor):
        def load() -> np.ndarray:
            w = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
            if tensor.name.endswith("attn_q.weight"):
                w = _unpermute_rows(w, arch.num_heads)
            elif tensor.name.endswith("attn_k.weight"):
                w = _unpermute_rows(w, arch.num_kv_heads)
            return w

        return load

    tensors = {}
    for tensor in reader.tensors:
        if tensor.tensor_type not in SUPPORTED_TYPES:
            raise ValueError(f"{path}: tensor {tensor.name} uses unsupported quantisation {tensor.tensor_type.name}")
        hf = _hf_name(tensor.name)
        if hf is None:
            raise ValueError(f"{path}: unknown tensor {tensor.name!r} for a Llama model")
        tensors[hf] = loader(tensor)
    return arch, params_from_hf_tensors(arch, tensors, dtype, str(path), progress)
