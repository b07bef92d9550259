"""Per-request generation settings, named as in vLLM so its users feel at home."""

from __future__ import annotations

import dataclasses
import secrets


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops.

    ``temperature == 0`` is greedy. ``top_k == 0`` and ``top_p == 1`` disable those filters. With
    ``seed`` set, the request's tokens depend only on the seed, its prompt and its own step count,
    never on which other requests share its batch. Every bad value raises ``ValueError`` naming
    the field.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # Accept lists (and a lone string for ``stop``) as users naturally write them.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "must be an integer >= 1", self.max_tokens)
        _check(_is_number(self.temperature) and self.temperature >= 0, "temperature", "must be >= 0", self.temperature)
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]", self.top_p)
        _check(_is_int(self.top_k) and self.top_k >= 0, "top_k", "must be an integer >= 0", self.top_k)
        _check(
            self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**32),
            "seed",
            "must be an integer in [0, 2**32)",
            self.seed,
        )
        _check(all(isinstance(s, str) and s for s in stop), "stop", "must be non-empty strings", self.stop)
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be token ids >= 0", self.stop_token_ids)
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", "must be a boolean", self.ignore_eos)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def resolved_seed(self) -> int:
        """The seed to sample with: the given one, or a fresh random one per request."""
        return self.seed if self.seed is not None else secrets.randbelow(2**32)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(ok: bool, field: str, rule: str, value: object) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{field} {rule}, got {value!r}")
