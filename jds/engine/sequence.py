"""One request's life inside the engine, and the stream its caller reads.

A ``Sequence`` is handed from thread to thread (waiting queue, prefill, transfer, decode) through
queues, so exactly one worker touches it at a time; only ``aborted`` is set from outside. Every
worker reports progress through ``publish``, which pushes a ``StreamOutput`` onto the caller's
stream: new token ids, the text they complete, and on the last message the finish reason and
timings.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

from jds.engine.request import FinishReason, PromptLogprobs, Request, RequestOutput, RequestTimings, StreamOutput, TokenLogprob
from jds.model.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger("jds.requests")


class Sequence:
    """Generated tokens, text, position, stop rules and timings of one request."""

    def __init__(self, request: Request, tokenizer: Tokenizer | None, stop_ids: tuple[int, ...], max_seq_len: int):
        self.request = request
        self.stop_ids = stop_ids
        skip = request.params.skip_special_tokens
        self.detok = IncrementalDetokenizer(tokenizer, request.prompt_ids, skip) if tokenizer is not None else None
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if request.params.logprobs is not None else None
        self.prompt_logprobs: PromptLogprobs | None = None  # set by prefill when the request asks
        self._sent_prompt_logprobs = False
        self.text = ""
        self.position = len(request.prompt_ids)  # where the newest token sits once it is fed back
        self.limit = request.params.token_limit(max_seq_len - len(request.prompt_ids))
        self.timings = RequestTimings(arrival=time.perf_counter())
        self.aborted = threading.Event()
        self.recomputed = False  # a device fault already sent it back to prefill once
        self.finish_reason: FinishReason | None = None
        self.on_finish: Callable[[Sequence], None] | None = None  # the engine forgets it here
        self._stream: queue.SimpleQueue[StreamOutput] = queue.SimpleQueue()
        self._wake: Callable[[], None] | None = None  # set while an asyncio reader waits
        self._sent_tokens = 0
        self._sent_chars = 0

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def context_ids(self) -> tuple[int, ...]:
        """What the cache must hold before the next decode step: the prompt and every generated
        token but the newest, which that step feeds. What a request sent back to prefill after a
        device fault (its KV lost) is prefilled with."""
        return self.request.prompt_ids + tuple(self.tokens[:-1])

    @property
    def context_len(self) -> int:
        return self.prompt_len + max(0, len(self.tokens) - 1)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int, is_stop: bool, logprob: TokenLogprob | None = None) -> FinishReason | None:
        """Record a sampled token (and its log-probabilities, if the request asked); the finish
        reason if the request is now done."""
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        now = time.perf_counter()
        if not self.tokens:
            self.timings.first_token = now
        self.timings.token_times.append(now)
        self.tokens.append(token)
        if is_stop:
            return "stop"
        if self.detok is not None:
            delta = self.detok.push(token)
            self.text += delta
            if len(self.tokens) > self.request.params.min_tokens and self._cut_at_stop_string(len(delta)):
                return "stop"
        return "length" if len(self.tokens) >= self.limit else None

    def add_drawn(self, drawn, row: int) -> FinishReason | None:
        """``add`` row ``row`` of a step's draw (a ``Sampled`` on the host), with its
        log-probabilities when the request asked for them."""
        token, entry = int(drawn.tokens[row]), None
        if self.logprobs is not None:
            n = self.request.params.logprobs
            top = tuple((int(t), float(v)) for t, v in zip(drawn.top_ids[row, :n], drawn.top_logprobs[row, :n]))
            entry = TokenLogprob(token, float(drawn.logprob[row]), top)
        return self.add(token, bool(drawn.is_stop[row]), entry)

    def resume_after_prefill(self, first_token: int) -> None:
        """Take over a request whose first token another process sampled (and already streamed)."""
        self.add(first_token, False, TokenLogprob(first_token, 0.0))  # (its log-probability went with it)
        self._sent_tokens = 1
        self._sent_prompt_logprobs = True

    def _cut_at_stop_string(self, delta_len: int) -> bool:
        stops = self.request.params.stop
        if not stops or not delta_len:
            return False
        start = max(0, len(self.text) - delta_len - max(map(len, stops)) + 1)
        hits = [(i, len(s)) for s in stops if (i := self.text.find(s, start)) >= 0]
        if hits:
            at, length = min(hits)
            self.text = self.text[: at + length if self.request.params.include_stop_str_in_output else at]
        return bool(hits)

    def publish(self, reason: FinishReason | None = None, error: str | None = None, unavailable: bool = False) -> None:
        """Send what is new since the last message; with ``reason``, the final message.

        Text that could still turn out to start a stop string is held back until it cannot.
        """
        if self.done:
            return
        if reason is not None:
            if reason in ("length", "abort") and self.detok is not None:
                self.text += self.detok.flush()
            self.finish_reason = reason
            self.timings.finished = time.perf_counter()
            upto = len(self.text)
        else:
            stops = self.request.params.stop
            upto = len(self.text) - (max(map(len, stops)) - 1 if stops else 0)
        upto = max(upto, self._sent_chars)
        new_tokens = self.tokens[self._sent_tokens :]
        if reason is None and not new_tokens:
            return
        prompt_logprobs = None if self._sent_prompt_logprobs else self.prompt_logprobs
        message = StreamOutput(
            self.request_id,
            new_tokens,
            self.text[self._sent_chars : upto],
            reason,
            error,
            self.timings if reason is not None else None,
            unavailable,
            None if self.logprobs is None else self.logprobs[self._sent_tokens : len(self.tokens)],
            prompt_logprobs,
        )
        self._sent_tokens, self._sent_chars = len(self.tokens), upto
        self._sent_prompt_logprobs = True
        if reason is not None:  # before the caller can see the end, the engine has forgotten it
            self._log_finished(reason, error)
            if self.on_finish is not None:
                self.on_finish(self)
        self._stream.put(message)
        wake = self._wake
        if wake is not None:
            wake()

    def _log_finished(self, reason: FinishReason, error: str | None) -> None:
        t = self.timings
        ms = lambda v: "-" if v is None else f"{v * 1e3:.1f}"  # noqa: E731
        log.debug(
            "request %s finished (%s%s): prompt %d, output %d tokens; queue %s ms, prefill %s ms, "
            "transfer %.3f ms (%d bytes), ttft %s ms, tpot %s ms",
            self.request_id, reason, f": {error}" if error else "", self.prompt_len, len(self.tokens),
            ms(t.queue), ms(t.prefill), t.transfer_seconds * 1e3, t.transfer_bytes, ms(t.ttft), ms(t.tpot),
        )  # fmt: skip

    def stream(self) -> RequestStream:
        return RequestStream(self)


class RequestStream:
    """Iterate to receive ``StreamOutput`` messages as they are produced; ``result()`` waits for all."""

    def __init__(self, seq: Sequence):
        self._seq = seq
        self._finished = False

    @property
    def request_id(self) -> str:
        return self._seq.request_id

    def __iter__(self) -> Iterator[StreamOutput]:
        while not self._finished:
            message = self._seq._stream.get()
            self._finished = message.finished
            yield message

    async def __aiter__(self) -> AsyncIterator[StreamOutput]:
        """The same messages for an asyncio reader: it awaits instead of holding a thread per stream.

        The engine's thread wakes the reader's loop after each message; the reader clears its event
        before looking, so a message published in between is never missed.
        """
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()

        def wake() -> None:
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # the reader's loop has closed: nobody is left to wake
                pass

        self._seq._wake = wake
        try:
            while not self._finished:
                ready.clear()
                try:
                    message = self._seq._stream.get_nowait()
                except queue.Empty:
                    await ready.wait()
                    continue
                self._finished = message.finished
                yield message
        finally:
            self._seq._wake = None

    def result(self) -> RequestOutput:
        """Block until the request ends; everything it produced, as one output."""
        tokens: list[int] = []
        text: list[str] = []
        logprobs: list | None = None
        prompt_logprobs = None
        last = None
        for last in self:
            tokens += last.token_ids
            text.append(last.text)
            if last.logprobs is not None:
                logprobs = (logprobs or []) + last.logprobs
            prompt_logprobs = prompt_logprobs or last.prompt_logprobs
        seq = self._seq
        return RequestOutput(
            seq.request_id, list(seq.request.prompt_ids), tokens, "".join(text), last.finish_reason, last.timings, last.error,
            logprobs, prompt_logprobs,
        )  # fmt: skip
