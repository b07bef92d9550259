"""``python -m jds.convert --from {gguf,hf} SRC --to DST``: write a jds (orbax) checkpoint.

Dequantising a GGUF file or reading safetensors shards happens once here instead of at every
server start; the result restores straight into the serving dtype and shardings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax.numpy as jnp

from jds.model.tokenizer import Tokenizer
from jds.model.weights.gguf_file import load_gguf, open_gguf
from jds.model.weights.hf_checkpoint import load_hf
from jds.model.weights.jds_checkpoint import save_checkpoint


def convert(source_format: str, src: Path, dst: Path, dtype: str = "float32", progress: bool = True) -> None:
    if dst.exists():
        raise FileExistsError(f"destination already exists: {dst}")
    if source_format == "gguf":
        reader = open_gguf(src)
        arch, params = load_gguf(reader, dtype=jnp.dtype(dtype), progress=progress)
        tokenizer = Tokenizer.from_gguf(reader)
    else:
        arch, params = load_hf(src, dtype=jnp.dtype(dtype), progress=progress)
        tokenizer = Tokenizer.from_file(src) if (src / "tokenizer.json").is_file() else None
    save_checkpoint(dst, arch, params)
    if tokenizer is not None:
        tokenizer.save(dst)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jds.convert", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--from", dest="source_format", choices=["gguf", "hf"], required=True)
    parser.add_argument("src", type=Path, help="GGUF file or Hugging Face checkpoint directory")
    parser.add_argument("--to", dest="dst", type=Path, required=True, help="new directory for the jds checkpoint")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="stored dtype")
    args = parser.parse_args(argv)
    try:
        convert(args.source_format, args.src, args.dst, args.dtype)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
