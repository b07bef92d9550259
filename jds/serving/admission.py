"""Admission, shared by both network front ends (gRPC and the OpenAI HTTP API): build, then submit.

The request is built by ``jds.intake`` (every check, each naming its field). ``admit`` turns every
way a request can be refused into one ``Refused`` that each front end maps to its own status
codes, and counts it, so both front ends refuse the same requests for the same reasons.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import uuid
from collections.abc import Callable
from typing import Literal

from jds.engine.interface import ServingEngine
from jds.engine.request import Request
from jds.engine.running import DuplicateRequestId, QueueFull
from jds.engine.sequence import RequestStream
from jds.intake import MAX_REQUEST_ID_CHARS, InvalidRequest
from jds.serving.metrics import Metrics

RefusalKind = Literal["invalid", "not_found", "busy", "unavailable"]
GRPC_CODES: dict[RefusalKind, str] = {
    "invalid": "INVALID_ARGUMENT",
    "not_found": "NOT_FOUND",
    "busy": "RESOURCE_EXHAUSTED",
    "unavailable": "UNAVAILABLE",
}


class Refused(Exception):
    """A request turned away before it ran; ``field`` is set when one field is to blame."""

    def __init__(self, kind: RefusalKind, message: str, field: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.field = field


def admit(engine: ServingEngine, accepting: threading.Event, metrics: Metrics, build: Callable[[], Request]) -> tuple[Request, RequestStream]:
    """Build the request (``build`` runs every check) and submit it, or raise a counted ``Refused``."""
    return admit_all(engine, accepting, metrics, lambda: [build()])[0]


def admit_all(
    engine: ServingEngine, accepting: threading.Event, metrics: Metrics, build: Callable[[], list[Request]], unique_ids: bool = False
) -> list[tuple[Request, RequestStream]]:
    """Build requests that stand or fall together (the choices of one API call) and submit them:
    all of them, or none, with a counted ``Refused`` and the ones already submitted aborted.

    ``unique_ids``: the ids come from a header that proxies, tracing and a client's retry reuse,
    not from a field the caller chose to make unique; one already running is then submitted
    under the id with a suffix of its own rather than refused (the requests returned carry the
    ids they run under)."""
    admitted: list[tuple[Request, RequestStream]] = []
    try:
        if not accepting.is_set():
            raise Refused("unavailable", "server is shutting down")
        try:
            for request in build():
                try:
                    stream = engine.submit(request)
                except DuplicateRequestId:
                    if not unique_ids:
                        raise
                    unique = f"{request.request_id[: MAX_REQUEST_ID_CHARS - 9]}-{uuid.uuid4().hex[:8]}"  # within the id limit
                    request = dataclasses.replace(request, request_id=unique)
                    stream = engine.submit(request)
                admitted.append((request, stream))
            return admitted
        except InvalidRequest as exc:
            raise Refused("invalid", str(exc), exc.field) from None
        except QueueFull as exc:
            raise Refused("busy", f"server is busy: {exc}") from None
        except RuntimeError as exc:  # the engine has shut down
            raise Refused("unavailable", str(exc)) from None
        except ValueError as exc:  # the engine's own checks (stop ids, a request id already running)
            raise Refused("invalid", str(exc), _field_named(str(exc))) from None
    except BaseException as exc:
        for request, _ in admitted:
            engine.abort(request.request_id)
        if isinstance(exc, Refused):
            metrics.rejected.labels(GRPC_CODES[exc.kind]).inc()
        raise


def _field_named(message: str) -> str | None:
    """The field an engine check's message starts with (``"stop_token_ids: at most 8 ..."``,
    ``"request_id 'x' is already running"``), or None when its first word names none."""
    word = message.partition(" ")[0].rstrip(":")
    return word if re.fullmatch(r"[a-z][a-z0-9_]*", word) else None
