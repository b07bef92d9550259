"""OpenAI's shapes for log-probabilities: the completions API's parallel lists (``tokens``,
``token_logprobs``, ``top_logprobs``, ``text_offset``) and the chat API's ``content`` entries.

A token is shown as the text it decodes to on its own, special tokens included (a token that
ends inside a UTF-8 character decodes to U+FFFD, as vLLM shows it), with the bytes it stands for
in chat's ``bytes``; a model served without a tokenizer shows ``token_id:N``, vLLM's form for that.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from jds.engine.request import TokenLogprob
from jds.model.tokenizer import Tokenizer


class LogprobShapes:
    def __init__(self, tokenizer: Tokenizer | None):
        self._tokenizer = tokenizer
        self.text = lru_cache(maxsize=65536)(self._text)
        self._bytes = lru_cache(maxsize=65536)(self._token_bytes)

    def _text(self, token: int) -> str:
        if self._tokenizer is None:
            return f"token_id:{token}"
        return self._tokenizer.decode([token], skip_special=False)

    def decode(self, tokens: list[int]) -> str:
        """The text of several tokens decoded together (so a character split between two of them
        is whole), special tokens included: how an echoed prompt of ids reads."""
        if self._tokenizer is None:
            return "".join(self.text(t) for t in tokens)
        return self._tokenizer.decode(tokens, skip_special=False)

    def completion(self, entries: list[tuple[int, TokenLogprob | None]], offset: int = 0) -> dict[str, Any]:
        """Completions' ``logprobs``: one position per ``(token, entry)`` (a prompt's first token
        has no entry), ``text_offset`` counted from ``offset`` in the choice's text. Each
        position's ``top_logprobs`` holds its own token first, then the likeliest (OpenAI's legacy
        API: "up to logprobs+1 elements"), as vLLM's does."""
        shaped: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, entry in entries:
            text = self.text(token)
            shaped["tokens"].append(text)
            shaped["token_logprobs"].append(None if entry is None else entry.logprob)
            top = None if entry is None else {text: entry.logprob}
            for t, lp in entry.top if entry is not None else ():
                top.setdefault(self.text(t), lp)  # two tokens may read alike (U+FFFD): the first keeps its value
            shaped["top_logprobs"].append(top)
            shaped["text_offset"].append(offset)
            offset += len(text)
        return shaped

    def chat(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        """Chat's ``logprobs``: ``content``, one entry per generated token."""
        return {"content": [{**self._token(entry.token, entry.logprob), "top_logprobs": [self._token(t, lp) for t, lp in entry.top]} for entry in entries]}

    def _token_bytes(self, token: int) -> list[int]:
        if self._tokenizer is None:
            return list(self.text(token).encode())
        return list(self._tokenizer.token_bytes(token))

    def _token(self, token: int, logprob: float) -> dict[str, Any]:
        """A chat entry: ``bytes`` are the token's own, so a character split over tokens joins again."""
        return {"token": self.text(token), "logprob": logprob, "bytes": self._bytes(token)}
