"""Engine requests and KV offers to and from the messages of ``instances.proto``."""

from __future__ import annotations

from jds.api import instances_pb2 as ipb
from jds.engine.request import Request
from jds.engine.sequence import Sequence
from jds.sampling_params import SamplingParams
from jds.transfer.remote import Offer


def sampling_message(seq: Sequence) -> ipb.Sampling:
    """How ``seq`` samples and stops, resolved (stop ids with EOS, the token limit) for another process."""
    p = seq.request.params
    return ipb.Sampling(
        temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=seq.request.seed, stop_ids=seq.stop_ids, max_tokens=seq.limit,
        min_p=p.min_p, min_tokens=p.min_tokens, presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty, logprobs=p.logprobs, prompt_logprobs=p.prompt_logprobs, logit_bias=dict(p.logit_bias),
    )  # fmt: skip


def sequence_from(request_id: str, prompt_ids, sampling: ipb.Sampling, max_seq_len: int) -> Sequence:
    """The instance-side twin of the router's sequence: token ids only (the router owns the text)."""
    given = lambda name, default=None: getattr(sampling, name) if sampling.HasField(name) else default  # noqa: E731
    params = SamplingParams(
        max_tokens=sampling.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p or 1.0, top_k=sampling.top_k,
        seed=sampling.seed, ignore_eos=True, min_p=sampling.min_p, min_tokens=min(sampling.min_tokens, sampling.max_tokens),
        presence_penalty=sampling.presence_penalty, frequency_penalty=sampling.frequency_penalty,
        repetition_penalty=given("repetition_penalty", 1.0), logprobs=given("logprobs"), prompt_logprobs=given("prompt_logprobs"),
        logit_bias=dict(sampling.logit_bias),
    )  # fmt: skip
    request = Request(request_id, tuple(prompt_ids), params, sampling.seed)
    return Sequence(request, None, tuple(sampling.stop_ids), max_seq_len)


def offer_message(offer: Offer) -> ipb.KVOffer:
    return ipb.KVOffer(
        transfer_address=offer.address, uuid=offer.uuid, arrays=[ipb.ArrayShape(dims=s) for s in offer.shapes], dtype=offer.dtype,
        expires_at=offer.expires_at,
    )  # fmt: skip


def offer_from(message: ipb.KVOffer) -> Offer:
    shapes = tuple(tuple(a.dims) for a in message.arrays)
    return Offer(message.transfer_address, message.uuid, shapes, message.dtype, message.expires_at)
