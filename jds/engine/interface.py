"""What the front ends use of an engine, as one explicit interface.

The gRPC service, the OpenAI API, request intake, metrics and the server's shutdown are typed
against ``ServingEngine`` only. Two classes implement it: ``jds.engine.engine.Engine`` serves a
placement in this process, ``jds.cluster.router.Router`` forwards each request to prefill and
decode processes. Anything a front end needs is added here first, so neither can drift.
"""

from __future__ import annotations

from typing import Protocol

from jds.config.placement import Placement
from jds.engine.request import Request
from jds.engine.sequence import RequestStream
from jds.model.loader import LoadedModel


class ServingEngine(Protocol):
    model: LoadedModel  # name, architecture, tokenizer (weights released or never loaded)
    placement: Placement
    max_seq_len: int  # the longest sequence any of its decode instances holds
    max_waiting: int | None  # requests that may wait for prefill at once (None: no bound)

    def validate(self, request: Request) -> tuple[int, ...]:
        """Raise ValueError naming the field if ``request`` cannot run; else its stop ids."""
        ...

    def submit(self, request: Request) -> RequestStream:
        """Queue a request (``QueueFull`` when too many wait; RuntimeError once shut down)."""
        ...

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is, freeing its slot and KV; False if it is not running."""
        ...

    @property
    def num_waiting(self) -> int:
        """Requests not yet prefilled."""
        ...

    @property
    def num_running(self) -> int:
        """Requests admitted and not finished."""
        ...

    def slot_usage(self) -> tuple[int, int]:
        """(decode slots in use, decode slots in all)."""
        ...

    def page_usage(self) -> tuple[int, int]:
        """(KV pages in use, KV pages in all) over the decode-capable instances; in use: held by a
        request or kept by the prefix cache."""
        ...

    def prefill_page_usage(self) -> tuple[int, int]:
        """(KV pages in use, KV pages in all) over the prefill instances' prefix-cache pools (0, 0
        without any); between batches only the cache keeps pages there."""
        ...

    def prefix_cache_usage(self) -> tuple[int, int]:
        """(prompt positions looked up in a prefix cache, of those the cache held) since start."""
        ...

    def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for every running request to finish; how many have not."""
        ...

    def shutdown(self) -> None:
        """Stop; requests still running end with finish reason ``abort``."""
        ...
