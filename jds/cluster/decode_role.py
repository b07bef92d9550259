"""A decode instance as its own process (``--role decode``): the ``DecodeInstance`` service.

A ``Decode`` RPC brings a prefilled request: its prompt, first token, sampling and KV offer. The
landing thread reserves a slot (waiting for one if all are busy), pulls the KV from the prefill
process, cuts it at this instance's stage boundaries and puts it on the stages, then hands it to
the decode thread (``DecodeWorker``, exactly as in one process). The RPC streams one message per
step. A pull that fails ends the RPC with FAILED_PRECONDITION (the router then fails or
re-prefills the request); a router that cancels the RPC aborts the request here.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading

import grpc
import jax

from jds.api import instances_pb2 as ipb
from jds.api import instances_pb2_grpc as ipb_grpc
from jds.cluster.wire import offer_from, sequence_from
from jds.engine.decode import DecodeWorker, Delivery
from jds.engine.programs import Pipeline, length_buckets
from jds.engine.sequence import Sequence
from jds.engine.slots import SlotPool
from jds.mesh.placement import DecodeInstance
from jds.mesh.stages import stage_spans
from jds.model.loader import LoadedModel
from jds.transfer.handoff import send_kv
from jds.transfer.remote import KVTransfer, Offer, PullFailed

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05
PULL_FAILED = "KV pull failed"


class DecodeService(ipb_grpc.DecodeInstanceServicer):
    def __init__(
        self, name: str, model: LoadedModel, spec: DecodeInstance, kv: KVTransfer, pull_timeout: float, *, warmup: bool, progress: bool
    ):
        devices = jax.devices()
        arch = model.arch
        self.name = name
        self.kv = kv
        self.pull_timeout = pull_timeout
        self.max_seq_len = spec.max_seq_len or model.max_seq_len
        spans = stage_spans(arch.num_layers, spec.pp, spec.layers_per_stage)
        stage_devices = [[devices[i] for i in range(s * spec.tp, (s + 1) * spec.tp)] for s in range(spec.pp)]
        cpu = devices[0].platform == "cpu"
        pipeline = Pipeline(arch, model.params, spans, stage_devices, spec.slots, self.max_seq_len, spec.num_microbatches(cpu))
        self._stop = threading.Event()
        self._slots_changed = threading.Condition()
        self.pool = SlotPool(spec.slots, self._slots_changed)
        self.worker = DecodeWorker(name, pipeline, self.pool, self._stop)
        self._starts = (0, *sorted(pipeline.cuts))
        self._landing: queue.SimpleQueue[tuple[Sequence, Offer]] = queue.SimpleQueue()
        self._running = 0
        self._outcomes = collections.Counter()
        self._lock = threading.Lock()
        if warmup:
            from tqdm.auto import tqdm

            jobs = pipeline.compile([(1, b) for b in length_buckets(self.max_seq_len)], self._starts)
            for job in tqdm(jobs, desc="compiling", unit="program", disable=not progress):
                job()
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
        try:
            kv = self.kv.pull(offer, self.worker.targets[0].sharding.mesh.devices.flat[0], self.pull_timeout)
            pieces = [(a, kv[:, a:b]) for a, b in zip(self._starts, (*self._starts[1:], kv.shape[1]))]
            handoff = send_kv(pieces, self.worker.targets)
        except Exception as exc:  # PullFailed, or placing it on the stages failed
            self.pool.release(slot)
            prefix = PULL_FAILED if isinstance(exc, PullFailed) else "placing KV failed"
            log.warning("%s for %s: %s", prefix, seq.request_id, exc)
            seq.publish("error", f"{prefix}: {exc}")
            return
        seq.timings.transfer_seconds = handoff.seconds
        seq.timings.transfer_bytes = kv.nbytes
        self.worker.inbox.put(Delivery(handoff.parts, [(0, seq, slot)], 1))

    def _reserve(self, seq: Sequence) -> int | None:
        """A free slot, waiting for one; None if the request was aborted meanwhile."""
        while not (seq.aborted.is_set() or self._stop.is_set()):
            with self._slots_changed:
                if self.pool.free:
                    return self.pool.try_reserve()
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
                    code = grpc.StatusCode.FAILED_PRECONDITION if message.error.startswith(PULL_FAILED) else grpc.StatusCode.INTERNAL
                    context.abort(code, message.error)
                if message.finish_reason == "abort":
                    context.abort(grpc.StatusCode.CANCELLED, "aborted")
                response = ipb.DecodeResponse(token_ids=message.token_ids, finished=message.finished, stopped=message.finish_reason == "stop")
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
        )  # fmt: skip

    def shutdown(self) -> None:
        self._stop.set()
        for t in (self.worker.thread, self._lander):
            t.join()
