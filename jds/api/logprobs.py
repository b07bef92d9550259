"""``jds.v1.TokenLogprob`` messages to and from the engine's ``TokenLogprob``, for the client
protocol and between processes alike."""

from __future__ import annotations

from jds.api import generation_pb2 as pb
from jds.engine.request import TokenLogprob


def logprob_message(entry: TokenLogprob | None, token: int | None = None) -> pb.TokenLogprob:
    """``entry`` as a message; ``None`` (a prompt's first token, ``token``) has no log-probability."""
    if entry is None:
        return pb.TokenLogprob(token_id=token or 0)
    ids, values = zip(*entry.top) if entry.top else ((), ())
    return pb.TokenLogprob(token_id=entry.token, logprob=entry.logprob, top_ids=ids, top_logprobs=values)


def logprob_from(message: pb.TokenLogprob) -> TokenLogprob | None:
    if not message.HasField("logprob"):
        return None
    return TokenLogprob(message.token_id, message.logprob, tuple(zip(message.top_ids, message.top_logprobs)))
