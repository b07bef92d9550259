"""jds's own checkpoint format: orbax-saved parameters plus the architecture and tokenizer.

A directory holds ``jds_checkpoint.json`` (format version, architecture, stored dtype),
``params/`` (an orbax StandardCheckpointer tree of ``Params``) and, when the model has one, the
tokenizer as ``tokenizer.json`` / ``tokenizer_config.json``. Restoring goes straight into the
requested dtype and shardings, so large models never need a host copy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jds.model.architecture import Architecture
from jds.model.params import Params, init_params

FORMAT_VERSION = 1
MANIFEST = "jds_checkpoint.json"


def is_jds_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def save_checkpoint(path: str | os.PathLike, arch: Architecture, params: Params) -> None:
    """Write params and architecture under ``path`` (which must not exist yet)."""
    path = Path(path).absolute()
    if path.exists():
        raise FileExistsError(f"refusing to overwrite existing path: {path}")
    path.mkdir(parents=True)
    params = jax.tree.map(jnp.asarray, params)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / "params", params)
    dtype = str(jax.tree.leaves(params)[0].dtype)
    manifest = {"format": FORMAT_VERSION, "architecture": arch.model_dump(mode="json"), "dtype": dtype}
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def checkpoint_architecture(path: str | os.PathLike) -> Architecture:
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"not a jds checkpoint (no {MANIFEST}): {path}")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"{manifest_path}: unsupported checkpoint format {manifest.get('format')!r}")
    return Architecture.model_validate(manifest["architecture"])


def load_checkpoint(
    path: str | os.PathLike,
    dtype: jnp.dtype,
    arch: Architecture | None = None,
    shardings: Params | None = None,
) -> tuple[Architecture, Params]:
    """Restore params in ``dtype``, placed by ``shardings`` (default: the first device)."""
    path = Path(path).absolute()
    stored = checkpoint_architecture(path)
    if arch is not None and arch != stored:
        raise ValueError(f"{path}: checkpoint architecture {stored} differs from the configured {arch}")
    shapes = jax.eval_shape(lambda: init_params(stored, jax.random.key(0), dtype))
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, shapes)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(path / "params", target)
    return stored, params
