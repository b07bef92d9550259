"""A decode instance as its own process (``--role decode``): the ``DecodeInstance`` service.

A ``Decode`` RPC brings a prefilled request: its prompt, first token, sampling and KV offer. The
landing thread reserves a slot and pages (waiting for room if there is none), pulls the KV pages
from the prefill process, cuts them at this instance's stage boundaries and puts them on the
stages, then hands them to the decode thread (``DecodeWorker``, exactly as in one process). The RPC streams one message per
step. A pull that fails ends the RPC with FAILED_PRECONDITION (the router then fails or
re-prefills the request); a router that cancels the RPC aborts the request here.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time

import grpc
import jax
import numpy as np

from jds.api import instances_pb2 as ipb
from jds.api import instances_pb2_grpc as ipb_grpc
from jds.api.logprobs import logprob_message
from jds.cluster import lockstep
from jds.cluster.wire import offer_from, sequence_from
from jds.config.placement import DecodeInstance
from jds.engine import builders
from jds.engine.decode import KV_LOST, PREEMPTED, DecodeWorker, Delivery
from jds.engine.programs import Pipeline, compile_all
from jds.engine.sequence import Sequence
from jds.model.kv_cache import KVPages
from jds.model.loader import LoadedModel
from jds.scheduling.policy import pages_for
from jds.transfer import handoff
from jds.transfer.remote import KVTransfer, Offer, PullFailed

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05
PULL_FAILED = "KV pull failed"


def build_pipeline(model: LoadedModel, spec: DecodeInstance, warmup: bool, progress: bool) -> Pipeline:
    """The instance's stages over all its devices (those of every process it spans, in order)."""
    pipeline = builders.decode_instance(model, spec, jax.devices()[: len(spec.devices)])
    if warmup:
        compile_all(pipeline.compile(pipeline.insert_sizes(), pipeline.starts), progress)
    return pipeline


def place(pipeline: Pipeline, groups: list[KVPages]) -> list:
    """A request's groups of pages (all layers; on a device, or on the host) cut and put on the
    stages that own their layers, landed."""
    return jax.block_until_ready(handoff.place([handoff.cut(g, pipeline.starts) for g in groups], pipeline.targets))


def place_and_insert(pipeline: Pipeline, groups: list[KVPages], ids: np.ndarray) -> None:
    pipeline.insert(place(pipeline, groups), ids)


class LockstepPipeline:
    """The pipeline of a multi-process decode instance, as its leader drives it: each call is
    announced to the followers first (``jds.cluster.lockstep``). KV arrives on the host and is
    placed inside ``insert``, on every process, in the decode thread's order."""

    def __init__(self, pipeline: Pipeline):
        self._pipeline = pipeline

    def __getattr__(self, name: str):
        return getattr(self._pipeline, name)

    def forward(self, *args):
        lockstep.lead("forward", *args)
        return self._pipeline.forward(*args)

    def insert(self, host_groups: list[KVPages], ids: np.ndarray) -> None:
        lockstep.lead("insert", host_groups, ids)
        place_and_insert(self._pipeline, host_groups, ids)

    def reset(self) -> None:
        lockstep.lead("reset")
        self._pipeline.reset()

    def write_history(self, slot: int, ids) -> None:
        lockstep.lead("write_history", slot, np.asarray(ids, np.int32))
        self._pipeline.write_history(slot, ids)


def follow_leader(model: LoadedModel, spec: DecodeInstance, warmup: bool) -> None:
    """A follower process of a multi-process decode instance: the leader's calls, until it stops."""
    pipeline = build_pipeline(model, spec, warmup, progress=False)
    lockstep.follow(
        {
            "forward": pipeline.forward,
            "insert": lambda groups, ids: place_and_insert(pipeline, groups, ids),
            "reset": pipeline.reset,
            "write_history": pipeline.write_history,
        }
    )


def _error_code(error: str) -> grpc.StatusCode:
    """What the router does with a failed request: a KV pull that failed may be prefilled again
    (``cluster.on_pull_failure``); KV a device fault took is prefilled again once; a request
    preempted for pages is prefilled again whenever it happens; the rest fail."""
    if error.startswith(PULL_FAILED):
        return grpc.StatusCode.FAILED_PRECONDITION
    if error.startswith(KV_LOST):
        return grpc.StatusCode.ABORTED
    if error.startswith(PREEMPTED):  # its pages went to older requests: prefill it again
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.INTERNAL


class DecodeService(ipb_grpc.DecodeInstanceServicer):
    def __init__(
        self, name: str, model: LoadedModel, spec: DecodeInstance, kv: KVTransfer, pull_timeout: float, *, warmup: bool, progress: bool
    ):
        self.name = name
        self.kv = kv
        self.pull_timeout = pull_timeout
        self.max_seq_len = spec.max_seq_len
        pipeline = build_pipeline(model, spec, warmup, progress)
        self._lockstep = spec.processes > 1
        self._landing_device = jax.local_devices()[0]
        self._stop = threading.Event()
        self._slots_changed = threading.Condition()
        self.pool = builders.kv_pool(pipeline, self._slots_changed)
        self.worker = DecodeWorker(name, LockstepPipeline(pipeline) if self._lockstep else pipeline, self.pool, self._stop)
        self._landing: queue.SimpleQueue[tuple[Sequence, Offer]] = queue.SimpleQueue()
        self._running = 0
        self._outcomes = collections.Counter()
        self._lock = threading.Lock()
        self._lander = threading.Thread(target=self._land_loop, name=f"{name}-landing", daemon=True)
        for t in (self.worker.thread, self._lander):
            t.start()

    # -- landing: slot, pull, place -------------------------------------------------------------

    def _land_loop(self) -> None:
        while not self._stop.is_set():
            try:
                seq, offer = self._landing.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
            self._land(seq, offer)

    def _land(self, seq: Sequence, offer: Offer) -> None:
        slot = self._reserve(seq)
        if slot is None:
            seq.publish("abort")
            return
        begin = time.perf_counter()
        n = pages_for(seq.context_len, self.pool.page_size)
        try:
            arrays = self.kv.pull(offer, self._landing_device, self.pull_timeout)
            groups = [KVPages(k=k, v=v) for k, v in zip(arrays[::2], arrays[1::2])]
            if sum(g.num_pages for g in groups) != n:
                raise ValueError(f"{sum(g.num_pages for g in groups)} pages offered for a context of {n}")
            # A multi-process instance places them on every process, in the decode thread's order: keep them on the host.
            parts = [jax.tree.map(np.asarray, g) for g in groups] if self._lockstep else place(self.worker.pipeline, groups)
        except Exception as exc:  # PullFailed, or placing it on the stages failed
            self.pool.release(slot)
            prefix = PULL_FAILED if isinstance(exc, PullFailed) else "placing KV failed"
            log.warning("%s for %s: %s", prefix, seq.request_id, exc)
            seq.publish("error", f"{prefix}: {exc}")
            return
        seq.timings.transfer_seconds = time.perf_counter() - begin
        seq.timings.transfer_bytes = sum(a.nbytes for a in arrays)
        self.worker.inbox.put(Delivery(parts, [(seq, slot, n)]))

    def _reserve(self, seq: Sequence) -> int | None:
        """A slot with the pages of ``seq``'s context, waiting for room; None if the request was aborted meanwhile."""
        while not (seq.aborted.is_set() or self._stop.is_set()):
            with self._slots_changed:
                slot = self.pool.try_reserve(seq.context_len, seq.prompt_len + seq.limit)
                if slot is not None:
                    return slot
                self._slots_changed.wait(POLL_SECONDS)
        return None

    # -- the service ----------------------------------------------------------------------------

    def Decode(self, request: ipb.DecodeRequest, context: grpc.ServicerContext):
        seq = sequence_from(request.request_id, request.prompt_ids, request.sampling, self.max_seq_len)
        seq.resume_after_prefill(request.first_token)
        context.add_callback(seq.aborted.set)
        with self._lock:
            self._running += 1
        outcome = "aborted"  # also when the router stops reading (a stop string): the stream is closed here
        try:
            self._landing.put((seq, offer_from(request.kv)))
            first = True
            for message in seq.stream():
                if message.finish_reason == "error":
                    outcome = "failed"
                    context.abort(_error_code(message.error), message.error)
                if message.finish_reason == "abort":
                    context.abort(grpc.StatusCode.CANCELLED, "aborted")
                response = ipb.DecodeResponse(token_ids=message.token_ids, finished=message.finished, stopped=message.finish_reason == "stop")
                if message.logprobs:
                    response.logprobs.extend(logprob_message(entry) for entry in message.logprobs)
                if first:
                    response.transfer_seconds, response.transfer_bytes = seq.timings.transfer_seconds, seq.timings.transfer_bytes
                    first = False
                if message.finished:
                    outcome = "served"
                yield response
        finally:
            seq.aborted.set()  # a stream closed early (cancelled, or the router went away) frees the slot
            with self._lock:
                self._running -= 1
                self._outcomes[outcome] += 1

    def Status(self, request, context) -> ipb.InstanceStatus:
        with self._lock:
            running, outcomes = self._running, dict(self._outcomes)
        return ipb.InstanceStatus(
            role="decode", name=self.name, slots_total=self.pool.size, slots_free=self.pool.free, waiting=self._landing.qsize(),
            running=running, max_seq_len=self.max_seq_len, served=outcomes.get("served", 0), aborted=outcomes.get("aborted", 0),
            kv_pages_total=self.pool.pages.total, kv_pages_free=len(self.pool.pages), kv_pages_committed=self.pool.committed,
            kv_pages_used=self.pool.pages.used,
        )  # fmt: skip

    def shutdown(self) -> None:
        self._stop.set()
        for t in (self.worker.thread, self._lander):
            t.join()
        if self._lockstep:  # after the decode thread: no call may follow the stop
            lockstep.lead(lockstep.STOP)
