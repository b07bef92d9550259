"""From Hugging Face tensor names and layouts to jds ``Params``.

Every external format is first described as a mapping from Hugging Face Llama tensor names to
lazy loaders of arrays in Hugging Face layout (``[out_features, in_features]``). One function then
checks names and shapes, transposes into the jds layout, stacks the layers and casts, so the
GGUF and safetensors readers differ only in how they name and fetch a tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from tqdm import tqdm

from jds.model.architecture import Architecture
from jds.model.params import Params, build_params

TensorLoaders = Mapping[str, Callable[[], np.ndarray]]

_LAYER_TENSORS = {
    # jds field: Hugging Face name inside ``model.layers.{i}.``
    "attn_norm": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight",
    "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
}
# Buffers some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _hf_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    D, F, V = arch.hidden_size, arch.intermediate_size, arch.vocab_size
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    layer = {
        "attn_norm": (D,),
        "wq": (q, D),
        "wk": (kv, D),
        "wv": (kv, D),
        "wo": (D, q),
        "mlp_norm": (D,),
        "w_gate": (F, D),
        "w_up": (F, D),
        "w_down": (D, F),
    }
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not arch.tie_embeddings:
        shapes["lm_head.weight"] = (V, D)
    for i in range(arch.num_layers):
        for field, name in _LAYER_TENSORS.items():
            shapes[f"model.layers.{i}.{name}"] = layer[field]
    return shapes


def _to_jds_layout(field: str, w: np.ndarray, arch: Architecture) -> np.ndarray:
    D, hd = arch.hidden_size, arch.head_dim
    if field == "wq":
        return w.T.reshape(D, arch.num_heads, hd)
    if field in ("wk", "wv"):
        return w.T.reshape(D, arch.num_kv_heads, hd)
    if field == "wo":
        return w.T.reshape(arch.num_heads, hd, D)
    if field in ("w_gate", "w_up", "w_down"):
        return w.T
    return w


def params_from_hf_tensors(
    arch: Architecture, tensors: TensorLoaders, dtype: np.dtype, source: str, progress: bool = True
) -> Params:
    """Build host-side Params from Hugging Face-named tensors; ``source`` names the file in errors."""
    expected = _hf_shapes(arch)
    present = {n for n in tensors if not n.endswith(_IGNORED_SUFFIXES)}
    if arch.tie_embeddings:
        present.discard("lm_head.weight")  # some tied checkpoints still store the copy
    unknown = sorted(present - set(expected))
    if unknown:
        raise ValueError(f"{source}: unknown tensor(s) {unknown[:5]} for a Llama model of this architecture")
    missing = sorted(set(expected) - present)
    if missing:
        raise ValueError(f"{source}: missing tensor(s) {missing[:5]}")

    bar = tqdm(total=len(expected), desc="loading weights", unit="tensor", disable=not progress, leave=False)

    def fetch(name: str) -> np.ndarray:
        array = np.asarray(tensors[name]())
        if tuple(array.shape) != expected[name]:
            raise ValueError(
                f"{source}: tensor {name} has shape {tuple(array.shape)}, the architecture expects {expected[name]}"
            )
        bar.update()
        return array

    arrays = {
        "embed": fetch("model.embed_tokens.weight").astype(dtype),
        "final_norm": fetch("model.norm.weight").astype(dtype),
    }
    if not arch.tie_embeddings:
        arrays["lm_head"] = fetch("lm_head.weight").T.astype(dtype)
    for field, name in _LAYER_TENSORS.items():
        arrays[field] = np.stack(
            [_to_jds_layout(field, fetch(f"model.layers.{i}.{name}"), arch).astype(dtype) for i in range(arch.num_layers)]
        )
    bar.close()
    return build_params(arch, arrays)
