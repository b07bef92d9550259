"""Reading and writing model weights: GGUF files, Hugging Face checkpoints, jds (orbax) checkpoints."""
