"""``python -m jds.generate [--config CONFIG] [--chat] PROMPT...``: one-shot generation from the shell."""

from __future__ import annotations

import argparse
import logging
import sys

from jds.config import ConfigError
from jds.llm import LLM
from jds.sampling_params import SamplingParams


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jds.generate", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("prompts", nargs="+", help="one or more prompts, generated together")
    parser.add_argument("--config", default=None, help="deployment YAML (default: configs/smollm2-135m.yaml)")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
        )
        with LLM(args.config) as llm:
            if args.chat:
                outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params)
            else:
                outputs = llm.generate(args.prompts, params)
    except (ConfigError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for prompt, out in zip(args.prompts, outputs):
        print(f"--- {prompt!r} ({len(out.token_ids)} tokens, finish: {out.finish_reason})")
        print(out.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
