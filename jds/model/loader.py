"""From a config's ``model:`` section to weights on devices and a tokenizer."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGUFReader

from jds.config import Config
from jds.config.fit import check_placement
from jds.config.placement import Placement
from jds.model.architecture import Architecture
from jds.model.llama import check_form_settings
from jds.model.matrices import as_served, held_weight_itemsize
from jds.model.params import Params, init_params
from jds.model.tokenizer import Tokenizer
from jds.model.weights.gguf_file import gguf_architecture, load_gguf, open_gguf
from jds.model.weights.hf_checkpoint import hf_architecture, load_hf
from jds.model.weights.jds_checkpoint import checkpoint_architecture, is_jds_checkpoint, load_checkpoint

log = logging.getLogger(__name__)

DEFAULT_MAX_SEQ_LEN = 2048


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """Everything the engine needs from the model section.

    ``params`` is None once an engine has placed its own copies on its instances' devices, so the
    loader's copy does not stay alive beside them.
    """

    name: str
    arch: Architecture
    params: Params | None
    tokenizer: Tokenizer | None
    max_seq_len: int
    dtype: jnp.dtype
    quantization: str = "none"

    def without_params(self) -> LoadedModel:
        return dataclasses.replace(self, params=None)


def resolve_dtype(name: str) -> jnp.dtype:
    """``auto`` is float32 on CPU (XLA's bf16 matrix-vector is far slower there), bfloat16 elsewhere."""
    if name == "auto":
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    return jnp.dtype(name)


def checkpoint_format(path: Path, declared: str) -> str:
    """The declared format, or one inferred from what the path holds."""
    if declared != "auto":
        return declared
    if path.suffix == ".gguf":
        return "gguf"
    if is_jds_checkpoint(path):
        return "jds"
    if (path / "config.json").is_file():
        return "hf"
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    raise ValueError(f"cannot tell the format of checkpoint {path}; set model.format to gguf, hf or jds")


def model_architecture(config: Config) -> Architecture:
    """The model's shapes from the config or the checkpoint's metadata, without reading weights."""
    section = config.model
    if section.checkpoint is None or section.architecture is not None:
        return section.architecture
    path = config.resolve_path(section.checkpoint)
    fmt = checkpoint_format(path, section.format)
    if fmt == "gguf":
        return gguf_architecture(open_gguf(path))
    return checkpoint_architecture(path) if fmt == "jds" else hf_architecture(path)


def resolve_max_seq_len(config: Config, arch: Architecture) -> int:
    return config.model.max_seq_len or min(DEFAULT_MAX_SEQ_LEN, arch.max_position_embeddings)


def check_config(config: Config, placement: Placement | None = None, devices: list | None = None) -> None:
    """``check_placement`` from the config and checkpoint metadata alone, before any weight is read,
    so a placement that cannot fit is refused instead of being killed halfway through loading.
    ``devices`` (default: all of JAX's) by the placement's device numbers; None where this process
    does not hold that device (a role process holds only its instance's)."""
    arch = model_architecture(config)
    itemsize = resolve_dtype(config.model.dtype).itemsize
    check_placement(
        placement or config.placement, arch, itemsize, resolve_max_seq_len(config, arch), jax.devices() if devices is None else devices,
        held_weight_itemsize(config.model.quantization, itemsize),
    )


def load_params(
    config: Config, dtype: jnp.dtype, progress: bool = True, gguf: GGUFReader | None = None
) -> tuple[Architecture, Params]:
    """Weights on the default device, from the checkpoint (read through ``gguf`` when given) or,
    without one, at random."""
    section = config.model
    if section.checkpoint is None:
        log.warning("model %s: no checkpoint configured, weights are RANDOM (outputs are meaningless)", section.name)
        return section.architecture, jax.jit(init_params, static_argnums=(0, 2))(
            section.architecture, jax.random.key(section.seed), dtype
        )
    path = config.resolve_path(section.checkpoint)
    fmt = checkpoint_format(path, section.format)
    if fmt == "jds":
        return load_checkpoint(path, dtype, section.architecture)
    reader = load_gguf if fmt == "gguf" else load_hf
    arch, host_params = reader(gguf or path, section.architecture, np.dtype(dtype), progress)
    return arch, jax.device_put(host_params)


def load_tokenizer(config: Config, gguf: GGUFReader | None = None) -> Tokenizer | None:
    """The tokenizer the config names; from the checkpoint's GGUF metadata through ``gguf`` when given."""
    section = config.model
    if section.tokenizer is None:
        return None
    if section.tokenizer == "checkpoint":
        path = config.resolve_path(section.checkpoint)
        if checkpoint_format(path, section.format) == "gguf":
            return Tokenizer.from_gguf(gguf or path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"model.tokenizer is 'checkpoint' but {path} has no tokenizer.json; "
                "name a tokenizer file, or set model.tokenizer: null to serve token ids only"
            )
        return Tokenizer.from_file(path)
    path = config.resolve_path(section.tokenizer)
    return Tokenizer.from_gguf(path) if path.suffix == ".gguf" else Tokenizer.from_file(path)


def load_model(config: Config, progress: bool = True, weights: bool = True) -> LoadedModel:
    """Weights, tokenizer and limits; ``weights=False`` reads only shapes and the tokenizer (a router
    process, which runs no model, needs nothing more)."""
    section = config.model
    dtype = resolve_dtype(section.dtype)
    check_form_settings()
    if dtype == jnp.float32:
        # float32 means float32 on every backend: a GPU otherwise runs float32 products as TF32
        # (10-bit mantissas), and greedy tokens drift from transformers'. bfloat16 products are
        # unaffected by the setting; the CPU computes float32 products in full either way.
        jax.config.update("jax_default_matmul_precision", "highest")
    # Weights and tokenizer from one GGUF file share its reader: parsing the metadata (the whole
    # vocabulary and merge list) took 4 s of each start.
    shared = section.tokenizer == "checkpoint" and section.checkpoint is not None and weights
    path = config.resolve_path(section.checkpoint) if shared else None
    gguf = open_gguf(path) if shared and checkpoint_format(path, section.format) == "gguf" else None
    arch, params = load_params(config, dtype, progress, gguf) if weights else (model_architecture(config), None)
    if params is not None:
        params = as_served(params, section.quantization)
    tokenizer = load_tokenizer(config, gguf)
    if tokenizer is not None and tokenizer.vocab_size > arch.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is {arch.vocab_size}"
        )
    max_seq_len = resolve_max_seq_len(config, arch)
    log.info(
        "model %s: %.1fM parameters, %s%s, max_seq_len %d",
        section.name, arch.num_params() / 1e6, dtype, " (int8 weights)" if section.quantization == "int8" else "", max_seq_len,
    )
    return LoadedModel(section.name, arch, params, tokenizer, max_seq_len, jnp.dtype(dtype), section.quantization)
