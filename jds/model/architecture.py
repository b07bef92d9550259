"""Hyperparameters of a Llama-family decoder.

A frozen pydantic model: it validates on construction, and it is hashable, so jitted functions can
take it as a static argument and recompile only when the architecture really changes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, PositiveFloat, PositiveInt, model_validator


class RopeScaling(BaseModel):
    """RoPE frequency scaling for long contexts ("linear", or Llama 3's piecewise "llama3")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["linear", "llama3"]
    factor: PositiveFloat
    low_freq_factor: PositiveFloat = 1.0
    high_freq_factor: PositiveFloat = 4.0
    original_max_position_embeddings: PositiveInt = 8192


class Architecture(BaseModel):
    """Shapes and constants of the model; weights must agree with it exactly."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: PositiveInt
    hidden_size: PositiveInt
    intermediate_size: PositiveInt
    num_layers: PositiveInt
    num_heads: PositiveInt
    num_kv_heads: PositiveInt
    head_dim: PositiveInt | None = None
    rope_theta: PositiveFloat = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: PositiveFloat = 1e-5
    tie_embeddings: bool = False
    max_position_embeddings: PositiveInt = 4096

    @model_validator(mode="after")
    def _check_heads(self) -> Architecture:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) is not divisible by num_heads ({self.num_heads}); "
                    "give head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        return self

    @property
    def kv_groups(self) -> int:
        """Query heads sharing one KV head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    def num_params(self) -> int:
        """Parameter count, used for memory planning and log lines."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.num_layers * layer + self.vocab_size * d + d + head

    def kv_bytes_per_token(self, itemsize: int) -> int:
        """Bytes of K and V that one token occupies across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize
