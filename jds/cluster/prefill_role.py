"""A prefill instance as its own process (``--role prefill``): the ``PrefillInstance`` service.

Requests from the router wait in this process's FCFS queue and are batched exactly as in one
process (``PrefillWorker``, with its prefill and transfer threads). The program returns the KV
pages whole (gathered over ``tp`` inside it); the transfer thread, instead of copying them to
local decode stages, offers the pages each request's prompt fills for a decode process to pull,
under a lease. The RPC answers
with the first token and that offer. A router that cancels the RPC aborts the request here,
wherever it is. An instance spanning several processes (``processes: N``) runs this service in
its first process and ``follow_leader`` in the others (``jds.cluster.lockstep``).
"""

from __future__ import annotations

import collections
import logging
import threading
import time

import grpc
import jax

from jds.api import instances_pb2 as ipb
from jds.api import instances_pb2_grpc as ipb_grpc
from jds.api.logprobs import logprob_message
from jds.cluster import lockstep
from jds.cluster.wire import offer_message, sequence_from
from jds.config.placement import PrefillInstance
from jds.engine import builders
from jds.engine.kv_pool import KVPool
from jds.engine.prefill import PrefillWorker
from jds.engine.programs import BatchPages, Pipeline, PrefillProgram, TakenPages, compile_all
from jds.engine.sequence import Sequence
from jds.engine.waiting import WaitingQueue
from jds.model.loader import LoadedModel
from jds.scheduling.policy import pages_for
from jds.transfer.remote import KVTransfer, Offer

log = logging.getLogger(__name__)


class _Ticket:
    """Where the transfer thread leaves a request's offer for the RPC that waits for it."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.offer: Offer | None = None
        self.error: str | None = None
        self.offered_at = 0.0

    def settle(self, offer: Offer | None = None, error: str | None = None) -> None:
        self.offer, self.error, self.offered_at = offer, error, time.perf_counter()
        self.done.set()


def build_program(model: LoadedModel, spec: PrefillInstance, max_len: int, page_size: int) -> PrefillProgram:
    """The instance's prefill program over all its devices (those of every process it spans),
    returning the KV pages whole so that one process can offer them (without a prefix cache: only
    a one-process instance keeps one, and gathers each request's pages as it offers them)."""
    devices = jax.devices()[: len(spec.devices)]
    return builders.prefill_instance(model, spec, devices, max_len, page_size, gather_kv=not spec.prefix_caching)


def warm_up(program: PrefillProgram, pool: tuple[Pipeline, KVPool] | None, progress: bool) -> None:
    """Compile the instance's programs: prefill's, and those of its pool where it keeps one."""
    compile_all(builders.prefill_warmup(program, True, pool and pool[0]), progress)


def follow_leader(model: LoadedModel, spec: PrefillInstance, max_len: int, page_size: int, warmup: bool) -> None:
    """A follower process of a multi-process prefill instance: the leader's calls, until it stops."""
    program = build_program(model, spec, max_len, page_size)
    if warmup:
        warm_up(program, None, progress=False)
    lockstep.follow({"prefill": program.call, "score": program.score_call})


class PrefillService(ipb_grpc.PrefillInstanceServicer):
    def __init__(
        self, name: str, model: LoadedModel, spec: PrefillInstance, max_len: int, page_size: int, kv: KVTransfer, *, warmup: bool,
        progress: bool,
    ):  # fmt: skip
        self.name = name
        self.max_len = max_len
        self.kv = kv
        self.program = build_program(model, spec, max_len, page_size)
        pool = builders.prefill_pool(model, spec, self.program, threading.Condition())
        if warmup:
            warm_up(self.program, pool, progress)
        self._followers = spec.processes > 1
        if self._followers:
            self.program.broadcast = lockstep.lead
        self._waiting = WaitingQueue()
        self._stop = threading.Event()
        self._tickets: dict[str, _Ticket] = {}
        self._outcomes = collections.Counter()
        self._lock = threading.Lock()
        self.worker = PrefillWorker(name, self.program, self._waiting, self._offer, self._stop, *(pool or (None, None)))
        for t in self.worker.threads:
            t.start()

    def _offer(self, kv: BatchPages | TakenPages, going: list[tuple[int, Sequence]]) -> None:
        """The transfer thread's job here: one offer per request of the pages its prompt fills, on
        one device (no stage cuts: the decode process cuts for its own stages)."""
        here = kv.local()
        for row, seq in going:
            with self._lock:
                ticket = self._tickets.get(seq.request_id)
            if ticket is None or seq.aborted.is_set():
                continue  # its RPC is gone: nobody would pull it
            try:
                groups = here.groups([(row, pages_for(seq.context_len, self.program.page_size))])
                offer = self.kv.offer([a for ((_, group),) in groups for a in (group.k, group.v)])
            except Exception as exc:
                log.exception("offering KV of %s failed", seq.request_id)
                ticket.settle(error=f"offering KV failed: {exc}")
                continue
            ticket.settle(offer)

    def Prefill(self, request: ipb.PrefillRequest, context: grpc.ServicerContext) -> ipb.PrefillResponse:
        seq = sequence_from(request.request_id, request.prompt_ids, request.sampling, self.max_len)
        ticket = _Ticket()
        with self._lock:
            self._tickets[seq.request_id] = ticket
        context.add_callback(lambda: self._abort(seq))
        outcome = "aborted"
        try:
            self._waiting.put(seq)
            first = next(iter(seq.stream()))  # the first token, or how the request ended before it
            if first.finish_reason == "error":
                outcome = "failed"
                context.abort(grpc.StatusCode.INTERNAL, first.error)
            if first.finish_reason == "abort":
                context.abort(grpc.StatusCode.CANCELLED, "aborted")
            t = seq.timings
            response = ipb.PrefillResponse(is_stop=first.finish_reason == "stop", queue_seconds=t.queue, cached_tokens=t.cached_tokens)
            if first.token_ids:  # none when the request asked for nothing to be generated
                response.first_token = first.token_ids[0]
            if first.logprobs:
                response.first_logprob.CopyFrom(logprob_message(first.logprobs[0]))
            if first.prompt_logprobs is not None:
                response.prompt_logprobs.extend(logprob_message(e, token) for e, token in zip(first.prompt_logprobs, seq.request.prompt_ids))
            if first.finished:  # nothing left to decode: no KV was offered
                response.prefill_seconds = (t.first_token or t.finished) - t.prefill_start
                outcome = "served"
                return response
            while not ticket.done.wait(0.05):
                if not context.is_active() or self._stop.is_set():
                    context.abort(grpc.StatusCode.CANCELLED, "aborted before the KV was offered")
            if ticket.error is not None:
                outcome = "failed"
                context.abort(grpc.StatusCode.INTERNAL, ticket.error)
            response.kv.CopyFrom(offer_message(ticket.offer))
            response.prefill_seconds = ticket.offered_at - t.prefill_start
            outcome = "served"
            return response
        finally:
            with self._lock:
                self._tickets.pop(seq.request_id, None)
                self._outcomes[outcome] += 1

    def _abort(self, seq: Sequence) -> None:
        seq.aborted.set()
        if self._waiting.remove(seq):
            seq.publish("abort")

    def Release(self, request: ipb.ReleaseRequest, context) -> ipb.ReleaseResponse:
        return ipb.ReleaseResponse(released=self.kv.release(request.uuid))

    def Status(self, request, context) -> ipb.InstanceStatus:
        with self._lock:
            running, outcomes = len(self._tickets), dict(self._outcomes)
        pool = self.worker.pool  # None where the instance keeps no prefix cache
        queried, hits = (pool.prefix_queried, pool.prefix_hits) if pool is not None else (0, 0)
        pages_total, pages_free, pages_used = (pool.pages.total, len(pool.pages), pool.pages.used) if pool is not None else (0, 0, 0)
        return ipb.InstanceStatus(
            role="prefill", name=self.name, waiting=len(self._waiting), running=running, kv_offered=self.kv.outstanding,
            max_seq_len=self.max_len, served=outcomes.get("served", 0), aborted=outcomes.get("aborted", 0),
            kv_pages_total=pages_total, kv_pages_free=pages_free, kv_pages_used=pages_used,
            prefix_cache_queried_tokens=queried, prefix_cache_hit_tokens=hits,
        )  # fmt: skip

    def shutdown(self) -> None:
        self._stop.set()
        self._waiting.wake()
        for t in self.worker.threads:
            t.join()
        if self._followers:  # after the prefill thread: no call may follow the stop
            lockstep.lead(lockstep.STOP)
