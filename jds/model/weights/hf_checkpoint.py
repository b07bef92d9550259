"""Hugging Face Llama checkpoints in a local directory: config.json plus safetensors shards."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from jds.model.architecture import Architecture, RopeScaling
from jds.model.params import Params
from jds.model.weights.layout import params_from_hf_tensors

_SUPPORTED_TYPES = ("llama",)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


def hf_architecture(directory: str | os.PathLike) -> Architecture:
    """The architecture described by a checkpoint's ``config.json``."""
    path = Path(directory) / "config.json"
    cfg = _read_json(path)
    if cfg.get("model_type") not in _SUPPORTED_TYPES:
        raise ValueError(f"{path}: unsupported model_type {cfg.get('model_type')!r} (supported: {_SUPPORTED_TYPES})")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ValueError(f"{path}: {flag}=true is not supported")
    # transformers 5 writes rope settings under ``rope_parameters``; older versions at top level.
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(f"{path}: unsupported rope scaling type {rope_type!r}")
    scaling = None
    if rope_type != "default":
        scaling = RopeScaling(
            type=rope_type, **{k: v for k, v in rope.items() if k in RopeScaling.model_fields and k != "type"}
        )
    heads = cfg["num_attention_heads"]
    return Architecture(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim"),
        rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
        rope_scaling=scaling,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        tie_embeddings=cfg.get("tie_word_embeddings", False),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
    )


def _shard_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_read_json(index)["weight_map"].values()))
        files = [directory / n for n in names]
    else:
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {directory}")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"missing safetensors shard: {f}")
    return files


def load_hf(
    directory: str | os.PathLike, arch: Architecture | None = None, dtype: np.dtype = np.float32, progress: bool = True
) -> tuple[Architecture, Params]:
    """Read a local Hugging Face Llama checkpoint into host-side Params."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    arch = arch or hf_architecture(directory)
    tensors = {}
    for file in _shard_files(directory):
        with safe_open(file, framework="flax") as f:
            for name in f.keys():
                tensors[name] = lambda file=file, name=name: _read_tensor(file, name)
    return arch, params_from_hf_tensors(arch, tensors, dtype, str(directory), progress)


def _read_tensor(file: Path, name: str) -> np.ndarray:
    # The flax backend understands bfloat16 tensors, which the numpy backend refuses.
    with safe_open(file, framework="flax") as f:
        return np.asarray(f.get_tensor(name), dtype=np.float32)
