"""The requests admitted and not yet finished, by id: what ``Engine`` and the cluster's ``Router``
both own, and the one place each of them checks, admits, finds and forgets a request."""

from __future__ import annotations

import threading
from collections.abc import Callable

from jds.engine.request import Request, validate_prompt
from jds.engine.sequence import Sequence
from jds.model.loader import LoadedModel
from jds.sampling_params import MAX_STOP_TOKEN_IDS


class QueueFull(RuntimeError):
    """More requests wait for prefill than the engine was told to hold; try again later."""


class DuplicateRequestId(ValueError):
    """A request named like one still running: ids name one request each, for ``abort``."""


class RunningRequests:
    def __init__(
        self, model: LoadedModel, max_seq_len: int, max_waiting: int | None, kv_positions: Callable[[], int | None] = lambda: None
    ):  # fmt: skip
        """``kv_positions``: the most KV positions one request may hold now (the largest
        instance's pages), where known: a request that could not finish even alone there is refused."""
        self._model = model
        self._max_seq_len = max_seq_len
        self._max_waiting = max_waiting
        self._kv_positions = kv_positions
        self._lock = threading.Condition()  # notified whenever a request is forgotten
        self._by_id: dict[str, Sequence] = {}

    def validate(self, request: Request) -> tuple[int, ...]:
        """Raise ValueError naming the problem if ``request`` cannot run; else its stop ids (EOS first)."""
        vocab = self._model.arch.vocab_size
        if not (isinstance(request.request_id, str) and request.request_id):
            raise ValueError(f"request_id: must be a non-empty string, got {request.request_id!r}")
        if not 0 <= request.seed < 2**32:
            raise ValueError(f"seed: must be in [0, 2**32), got {request.seed}")
        if request.params.n != 1:  # the front ends run each of n samples as a request of its own
            raise ValueError(f"n: an engine request is one sample; got n={request.params.n}")
        validate_prompt(request.prompt_ids, vocab, self._max_seq_len)
        prompt = len(request.prompt_ids)
        need = prompt + request.params.token_limit(self._max_seq_len - prompt)
        held = self._kv_positions()
        if held is not None and need > held:
            raise ValueError(
                f"max_tokens: the prompt's {prompt} tokens and max_tokens {request.params.max_tokens} need {need} KV positions, "
                f"more than any instance holds ({held}: its kv_pages x page_size)"
            )
        tok = self._model.tokenizer
        eos = () if request.params.ignore_eos or tok is None else tok.eos_ids
        ids = tuple(dict.fromkeys(eos + request.params.stop_token_ids))
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} stop token ids per request (EOS included), got {len(ids)}")
        if any(t >= vocab for t in ids):
            raise ValueError(f"stop_token_ids: ids must be in [0, {vocab}); got {[t for t in ids if t >= vocab][:8]}")
        biased = [t for t, _ in request.params.logit_bias if t >= vocab]
        if biased:
            raise ValueError(f"logit_bias: ids must be in [0, {vocab}); got {biased[:8]}")
        return ids

    def admit(self, request: Request, waiting: Callable[[], int], enqueue: Callable[[Sequence], None]) -> Sequence:
        """Check ``request`` (ValueError naming the problem), refuse a duplicate id or a full
        waiting queue (``QueueFull``), else ``enqueue`` its new sequence, atomically with those
        checks so that concurrent callers never exceed ``max_waiting``."""
        seq = Sequence(request, self._model.tokenizer, self.validate(request), self._max_seq_len)
        seq.on_finish = self.forget
        with self._lock:
            if request.request_id in self._by_id:
                raise DuplicateRequestId(f"request_id {request.request_id!r} is already running")
            if self._max_waiting is not None and waiting() >= self._max_waiting:
                raise QueueFull(f"{waiting()} requests are already waiting (limit {self._max_waiting})")
            self._by_id[request.request_id] = seq
            enqueue(seq)
        return seq

    def forget(self, seq: Sequence) -> None:
        with self._lock:
            self._by_id.pop(seq.request_id, None)
            self._lock.notify_all()

    def wait_finished(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds until no request is running; how many still are."""
        with self._lock:
            self._lock.wait_for(lambda: not self._by_id, timeout)
            return len(self._by_id)

    def get(self, request_id: str) -> Sequence | None:
        with self._lock:
            return self._by_id.get(request_id)

    def all(self) -> list[Sequence]:
        with self._lock:
            return list(self._by_id.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_id)
