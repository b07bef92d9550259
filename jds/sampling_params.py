"""Per-request generation settings, named as in vLLM so its users feel at home."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterable, Mapping

import numpy as np

# Bounds on what one request may ask of the stop-string check, which the decode thread runs after
# every token of every row: without them one request's 100,000 stop strings slowed its whole batch
# twofold, and a 5,000-character stop string held back all of its streamed text.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 8  # the engine's per-row stop id table; EOS shares it
FLOAT32_MAX = float(np.finfo(np.float32).max)  # sampling settings become float32 rows on the device
INT32_MAX = int(np.iinfo(np.int32).max)
MAX_LOGPROBS = 20  # likeliest alternatives a request may ask log-probabilities for (vLLM's default limit)
MAX_LOGIT_BIAS = 300  # biased tokens per request: the engine's per-row bias table, sent with every step
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for a bias, [-100, 100]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops.

    ``n``: samples of the prompt (``jds.LLM`` runs each as a request of its own; with a ``seed``,
    sample j draws with ``seed + j``). ``temperature == 0`` is greedy. ``top_k == 0`` (or -1, as
    older vLLM wrote it), ``top_p == 1`` and ``min_p == 0`` disable those filters.
    ``presence_penalty`` and ``frequency_penalty`` (OpenAI's: subtracted from the
    logit of every token the output holds, once or per occurrence) and ``repetition_penalty``
    (vLLM's and transformers': positive logits of tokens in the prompt or output divided by it,
    negative ones multiplied) are off at 0, 0 and 1. ``min_tokens``: stop ids (EOS included) and
    stop strings take effect only once this many tokens are generated; a stop string is cut from
    the text unless ``include_stop_str_in_output``, and special tokens (EOS, chat markers) are left
    out of it unless ``skip_special_tokens`` is false (vLLM's names). ``logprobs``: report each
    generated token's log-probability and the ``logprobs`` likeliest tokens at its position;
    ``prompt_logprobs``: the same for every prompt token (the first has none); both under the
    model's own distribution, before temperature, filters, penalties and ``logit_bias``.
    ``logit_bias`` (OpenAI's): a mapping from token id to a number in [-100, 100] added to that
    token's logit before penalties, filters and sampling (-100 bans it, 100 all but forces it);
    given as a dict or as (id, bias) pairs, kept as pairs sorted by id. ``max_tokens`` 0
    generates nothing (with ``prompt_logprobs``: scores the prompt); None generates until the
    context is full (vLLM's meaning). With ``seed`` set, the
    request's tokens depend only on the seed, its prompt and its own step count, never on which
    other requests share its batch. Every bad value raises ``ValueError`` naming the field; every
    accepted value fits the device rows it is written into (a ``top_k`` beyond any vocabulary is
    kept as the largest int32, which means the same: no filter).
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # a string, a list of them, or None: none
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_p: float = 0.0
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    n: int = 1

    def __post_init__(self) -> None:
        # Accept what users naturally write: NumPy scalars, lists, a lone stop string, None for no stops.
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, np.generic):
                object.__setattr__(self, field.name, value.item())
        stop = (self.stop,) if isinstance(self.stop, str) else _as_tuple(self.stop, "stop")
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", _as_tuple(self.stop_token_ids, "stop_token_ids"))
        _check(_is_int(self.n) and self.n >= 1, "n", "must be an integer >= 1", self.n)
        max_tokens = self.max_tokens
        _check(max_tokens is None or (_is_int(max_tokens) and max_tokens >= 0), "max_tokens", "must be an integer >= 0", max_tokens)
        _check(_is_float32(self.temperature) and self.temperature >= 0, "temperature", "must be a finite number >= 0", self.temperature)
        _check(_is_float32(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]", self.top_p)
        _check(_is_int(self.top_k) and self.top_k >= -1, "top_k", "must be an integer >= 0, or -1 (no filter)", self.top_k)
        object.__setattr__(self, "top_k", min(self.top_k, INT32_MAX) if self.top_k != -1 else 0)
        _check(
            self.seed is None or (_is_int(self.seed) and -(2**63) <= self.seed < 2**63),
            "seed",
            "must be an integer in [-2**63, 2**63)",
            self.seed,
        )
        _check(len(stop) <= MAX_STOP_STRINGS, "stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}", None)
        _check(all(isinstance(s, str) and s for s in stop), "stop", "must be non-empty strings", self.stop)
        for i, s in enumerate(stop):
            _check(len(s) <= MAX_STOP_CHARS, f"stop[{i}]", f"at most {MAX_STOP_CHARS} characters, got {len(s)}", None)
            _check(is_unicode(s), f"stop[{i}]", "is not valid Unicode (it holds a lone surrogate)", None)
        ids = self.stop_token_ids
        _check(len(ids) <= MAX_STOP_TOKEN_IDS, "stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}", None)
        _check(all(_is_int(t) and 0 <= t <= INT32_MAX for t in ids), "stop_token_ids", "must be token ids >= 0", ids)
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", "must be a boolean", self.ignore_eos)
        _check(_is_float32(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]", self.min_p)
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens, "min_tokens", "must be an integer >= 0", self.min_tokens)
        _check(self.min_tokens <= self.token_limit(INT32_MAX), "min_tokens", f"must be at most max_tokens ({self.max_tokens})", self.min_tokens)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_float32(value) and -2 <= value <= 2, name, "must be in [-2, 2]", value)
        penalty = self.repetition_penalty
        _check(_is_float32(penalty) and 0 < penalty, "repetition_penalty", "must be a finite number > 0", penalty)
        for name in ("include_stop_str_in_output", "skip_special_tokens"):
            _check(isinstance(getattr(self, name), bool), name, "must be a boolean", getattr(self, name))
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or (_is_int(value) and 0 <= value <= MAX_LOGPROBS), name, f"must be an integer in [0, {MAX_LOGPROBS}]", value)
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))

    def token_limit(self, room: int) -> int:
        """How many tokens the request may generate where ``room`` positions follow its prompt."""
        return room if self.max_tokens is None else min(self.max_tokens, room)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        """Whether sampling reads the request's token history (any penalty is on)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def resolved_seed(self, sample: int = 0) -> int:
        """The seed sample ``sample`` draws with, 32 bits (the sampler's key): the given one plus
        the sample, folded (mod 2**32, so seeds 2**32 apart sample alike), or a fresh random one."""
        return (self.seed + sample) % 2**32 if self.seed is not None else secrets.randbelow(2**32)


def is_unicode(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8: a lone UTF-16 surrogate (JSON's ``"\\ud800"``) does not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _as_tuple(value: object, field: str) -> tuple:
    if value is None:
        return ()
    _check(isinstance(value, Iterable) and not isinstance(value, (str, bytes, dict)), field, "must be a list", value)
    return tuple(v.item() if isinstance(v, np.generic) else v for v in value)


def _bias_pairs(value: object) -> tuple[tuple[int, float], ...]:
    """``logit_bias`` as (id, bias) pairs sorted by id, each checked."""
    if isinstance(value, Mapping):
        value = value.items()
    pairs = _as_tuple(value, "logit_bias")
    _check(len(pairs) <= MAX_LOGIT_BIAS, "logit_bias", f"at most {MAX_LOGIT_BIAS} tokens, got {len(pairs)}", None)
    _check(all(isinstance(p, tuple | list) and len(p) == 2 for p in pairs), "logit_bias", "must map token ids to numbers", value)
    pairs = tuple(_as_tuple(p, "logit_bias") for p in pairs)  # NumPy ids and numbers as Python's
    for token, bias in pairs:
        _check(_is_int(token) and 0 <= token <= INT32_MAX, "logit_bias", "keys must be token ids in [0, 2**31)", token)
        _check(_is_float32(bias) and abs(bias) <= LOGIT_BIAS_LIMIT, "logit_bias", f"values must be in [-{LOGIT_BIAS_LIMIT:g}, {LOGIT_BIAS_LIMIT:g}]", bias)
    ids = [token for token, _ in pairs]
    _check(len(set(ids)) == len(ids), "logit_bias", "names a token twice", None)
    return tuple(sorted((token, float(bias)) for token, bias in pairs))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_float32(value: object) -> bool:
    """A real number that stays finite as float32 (1e39 is finite in Python and infinite there);
    NaN and infinities fail the comparison."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= FLOAT32_MAX


def _check(ok: bool, field: str, rule: str, value: object) -> None:
    if not ok:
        got = "" if value is None else f", got {_short(value)}"
        raise ValueError(f"SamplingParams.{field} {rule}{got}")


def _short(value: object) -> str:
    """A value for an error message, cut so that a huge one cannot make the message huge."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
