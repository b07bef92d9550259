"""The router (``--role router``): the engine's interface, served by prefill and decode processes.

``Router`` has what the front ends use of ``Engine`` (``submit``, ``abort``, the load figures), so
the gRPC service and the OpenAI API run on it unchanged. Each request gets a driver thread:

1. prefill: a healthy prefill instance runs the prompt and offers its KV: by default the one the
   prompt's leading pages were sent to before (its prefix cache may hold them), else the least
   loaded. If that instance fails or stops answering, the request goes to another one.
2. the first token streams to the client at once (TTFT), through the router's own ``Sequence``,
   which owns the text, stop strings and limits, exactly as in one process.
3. decode: the decode instance with the most room pulls the KV and streams tokens. A
   decode instance that dies fails its requests with UNAVAILABLE; a failed pull fails the request
   (or, with ``cluster.on_pull_failure: reprefill``, prefills it again, once). A request whose KV
   a device fault took (ABORTED) is prefilled again once, one preempted for pages
   (RESOURCE_EXHAUSTED) each time, and decoded from its first token; the tokens the client
   already has come again and are skipped.

Aborts cancel whichever RPC is in flight, which aborts the request in that process; KV offered
and never pulled is released by the prefill side's lease (the router also says so at once).
"""

from __future__ import annotations

import logging
import threading
import time

import grpc

from jds.api import instances_pb2 as ipb
from jds.api.logprobs import logprob_from
from jds.cluster.registry import Instance, Registry
from jds.cluster.wire import sampling_message
from jds.config import ClusterSection
from jds.config.placement import Placement
from jds.engine.request import Request
from jds.engine.running import RunningRequests
from jds.engine.sequence import RequestStream, Sequence
from jds.model.loader import LoadedModel
from jds.scheduling.pages import page_keys
from jds.scheduling.policy import pages_for

log = logging.getLogger(__name__)


class _Outcome(Exception):
    """How a phase ended a request early: ``publish`` arguments."""

    def __init__(self, reason: str, error: str | None = None, unavailable: bool = False):
        super().__init__(error or reason)
        self.reason, self.error, self.unavailable = reason, error, unavailable


class _PullFailed(Exception):
    pass


class _KVLost(Exception):
    """A device fault on the decode instance took the request's KV: prefill it again, once."""


class _Preempted(Exception):
    """The decode instance needed the request's KV pages for older requests: prefill it again
    (as often as it happens: each time older requests went on)."""


class Router:
    def __init__(self, model: LoadedModel, placement: Placement, cluster: ClusterSection, max_waiting: int | None = None):
        self.model = model
        self.placement = placement = placement.resolved(model.max_seq_len)
        self.cluster = cluster
        self.max_waiting = max_waiting
        self.max_seq_len = placement.max_seq_len
        self.registry = Registry(cluster.prefill, cluster.decode, cluster.health_seconds, cluster.policy, cluster.cache_balance)
        self._running = RunningRequests(model, self.max_seq_len, max_waiting, self._kv_positions)
        self._lock = threading.Lock()  # guards _calls and _waiting
        self._calls: dict[str, grpc.Future | grpc.Call] = {}  # the RPC each request waits on
        self._waiting = 0  # requests not yet past prefill
        self._stop = threading.Event()

    def _kv_positions(self) -> int | None:
        """The most KV positions a decode instance holds, as the instances last said."""
        pages = self.registry.largest_decode_pool()
        return None if pages is None else pages * self.placement.page_size

    # -- the engine's interface -----------------------------------------------------------------

    def validate(self, request: Request) -> tuple[int, ...]:
        return self._running.validate(request)

    def submit(self, request: Request) -> RequestStream:
        if self._stop.is_set():
            raise RuntimeError("router is shut down")
        seq = self._running.admit(request, lambda: self._waiting, self._count_waiting)
        seq.on_finish = self._forget
        threading.Thread(target=self._drive, args=(seq,), name=f"request-{request.request_id[:8]}", daemon=True).start()
        return seq.stream()

    def _count_waiting(self, seq: Sequence) -> None:
        with self._lock:
            self._waiting += 1

    def abort(self, request_id: str) -> bool:
        seq = self._running.get(request_id)
        with self._lock:
            call = self._calls.get(request_id)
        if seq is None:
            return False
        seq.aborted.set()
        if call is not None:
            call.cancel()
        return True

    @property
    def num_waiting(self) -> int:
        return self._waiting

    @property
    def num_running(self) -> int:
        return len(self._running)

    def slot_usage(self) -> tuple[int, int]:
        return self.registry.slot_usage()

    def page_usage(self) -> tuple[int, int]:
        return self.registry.page_usage()

    def prefill_page_usage(self) -> tuple[int, int]:
        return self.registry.page_usage("prefill")

    def prefix_cache_usage(self) -> tuple[int, int]:
        return self.registry.prefix_cache_usage()

    def drain(self, timeout: float) -> int:
        return self._running.wait_finished(timeout)

    def shutdown(self) -> None:
        self._stop.set()
        for seq in self._running.all():
            self.abort(seq.request_id)
        self.drain(10)
        self.registry.close()

    def _forget(self, seq: Sequence) -> None:
        self._running.forget(seq)
        with self._lock:
            self._calls.pop(seq.request_id, None)

    def _track(self, seq: Sequence, call) -> None:
        with self._lock:
            self._calls[seq.request_id] = call
        if seq.aborted.is_set():  # an abort that came before the call existed
            call.cancel()

    # -- one request ----------------------------------------------------------------------------

    def _drive(self, seq: Sequence) -> None:
        waiting = True
        offered = None  # (prefill instance, KV id) while no decode instance knows of the KV
        try:
            retried = False  # prefilled again after a failed pull or lost KV (preemptions do not count)
            while True:
                prefill, offer_from = self._prefill(seq)
                offered = (offer_from, prefill.kv.uuid) if prefill.HasField("kv") else None
                if waiting:
                    with self._lock:
                        self._waiting -= 1
                    waiting = False
                if prefill.prompt_logprobs and seq.prompt_logprobs is None:
                    seq.prompt_logprobs = [logprob_from(m) for m in prefill.prompt_logprobs]
                if not prefill.HasField("first_token"):  # max_tokens 0: the prompt was all it asked about
                    seq.publish("length")
                    return
                if not seq.tokens:
                    first = logprob_from(prefill.first_logprob) if prefill.HasField("first_logprob") else None
                    reason = seq.add(prefill.first_token, prefill.is_stop, first)
                    seq.publish(reason)
                    if reason is not None:
                        return
                if not prefill.HasField("kv"):
                    raise _Outcome("error", "prefill returned no KV for a request that goes on")
                decoder = self._acquire(seq, "decode")
                offered = None  # from here a decode instance may pull it: only its lease may free it
                try:
                    self._decode(seq, decoder, prefill.kv)
                    return
                except _PullFailed as exc:
                    if self.cluster.on_pull_failure != "reprefill" or retried:
                        raise _Outcome("error", str(exc), unavailable=True) from None  # transient: a retry may succeed
                    log.warning("%s: %s; prefilling it again", seq.request_id, exc)
                    retried = True
                except _KVLost as exc:
                    if retried:
                        raise _Outcome("error", str(exc)) from None
                    log.warning("%s: %s; prefilling it again", seq.request_id, exc)
                    retried = True
                except _Preempted as exc:
                    log.info("%s: %s; prefilling it again", seq.request_id, exc)
        except _Outcome as out:
            if offered is not None:  # nobody will pull it: have it released now, not at its lease
                self._release(*offered)
            seq.publish(out.reason, out.error, out.unavailable)
        except Exception as exc:  # never leave a client waiting on a request nobody drives
            log.exception("routing %s failed", seq.request_id)
            seq.publish("error", f"routing failed: {exc}")
        finally:
            if waiting:
                with self._lock:
                    self._waiting -= 1

    def _commits(self, seq: Sequence, role: str) -> int:
        """The KV pages ``seq`` commits on an instance of ``role`` (decode: its prompt and max_tokens)."""
        return pages_for(seq.prompt_len + seq.limit, self.placement.page_size) if role == "decode" else 0

    def _acquire(self, seq: Sequence, role: str, keys: list[bytes] | tuple = ()) -> Instance:
        need, pages = seq.prompt_len + seq.limit, self._commits(seq, role)
        instance = self.registry.acquire(role, need, self.cluster.instance_wait_seconds, seq.aborted, pages, keys)
        if instance is None:
            if seq.aborted.is_set() or self._stop.is_set():
                raise _Outcome("abort")
            raise _Outcome("error", f"no {role} instance is serving", unavailable=True)
        return instance

    def _prefill(self, seq: Sequence) -> tuple[ipb.PrefillResponse, Instance]:
        """Prefill on some healthy instance; one that fails or stops answering hands the request on."""
        request = ipb.PrefillRequest(request_id=seq.request_id, prompt_ids=seq.request.prompt_ids, sampling=sampling_message(seq))
        keys = page_keys(seq.request.prompt_ids, self.placement.page_size) if self.cluster.policy == "cache_aware" else ()
        while True:
            instance = self._acquire(seq, "prefill", keys)
            try:
                future = instance.stub.Prefill.future(request)
                self._track(seq, future)
                response = future.result()
            except grpc.FutureCancelledError:
                raise _Outcome("abort") from None
            except grpc.RpcError as err:
                if seq.aborted.is_set() or err.code() == grpc.StatusCode.CANCELLED:
                    raise _Outcome("abort") from None
                if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    self.registry.mark_down(instance, f"{err.code().name}: {err.details()}")
                    log.warning("%s: %s failed (%s); trying another prefill instance", seq.request_id, instance.name, err.code().name)
                    continue
                raise _Outcome("error", f"prefill on {instance.name} failed: {err.details()}") from None
            finally:
                self.registry.release(instance)
            if not seq.tokens:  # the first prefill of this request sets its timings
                seq.timings.prefill_start = time.perf_counter() - response.prefill_seconds
                seq.timings.cached_tokens = response.cached_tokens
            seq.timings.route.append(instance.name)
            return response, instance

    def _decode(self, seq: Sequence, instance: Instance, kv: ipb.KVOffer) -> None:
        request = ipb.DecodeRequest(
            request_id=seq.request_id, prompt_ids=seq.request.prompt_ids, first_token=seq.tokens[0], sampling=sampling_message(seq), kv=kv
        )
        seq.timings.route.append(instance.name)
        # After a fault took its KV, a request is decoded again from its first token: the tokens
        # the client already has come again (sampling is a function of the seed and the step)
        # and are checked and skipped.
        known = list(seq.tokens[1:])
        try:
            call = instance.stub.Decode(request)
            self._track(seq, call)
            for response in call:
                if response.transfer_bytes:
                    seq.timings.transfer_seconds += response.transfer_seconds
                    seq.timings.transfer_bytes += response.transfer_bytes
                added = False
                for i, token in enumerate(response.token_ids):
                    if known:
                        if token != known.pop(0):
                            call.cancel()
                            raise _Outcome("error", f"{instance.name} decoded other tokens than before the fault")
                        continue
                    last = i == len(response.token_ids) - 1
                    reason = seq.add(token, response.stopped and last, logprob_from(response.logprobs[i]) if response.logprobs else None)
                    added = True
                    if reason is not None:  # a stop string, or the limit: done, whatever the instance does
                        call.cancel()
                        seq.publish(reason)
                        return
                if added:
                    seq.publish()
            raise _Outcome("error", f"{instance.name} ended the stream early")
        except grpc.RpcError as err:
            code = err.code()
            if seq.aborted.is_set() or code == grpc.StatusCode.CANCELLED:
                raise _Outcome("abort") from None
            if code == grpc.StatusCode.FAILED_PRECONDITION:
                raise _PullFailed(err.details()) from None
            if code == grpc.StatusCode.ABORTED:
                raise _KVLost(err.details()) from None
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise _Preempted(err.details()) from None
            if code == grpc.StatusCode.UNAVAILABLE:
                self.registry.mark_down(instance, f"UNAVAILABLE: {err.details()}")
                raise _Outcome("error", f"{instance.name} became unavailable: {err.details()}", unavailable=True) from None
            raise _Outcome("error", f"decode on {instance.name} failed: {err.details()}") from None
        finally:
            self.registry.release(instance, self._commits(seq, "decode"))

    def _release(self, instance: Instance, uuid: int) -> None:
        try:
            instance.stub.Release(ipb.ReleaseRequest(uuid=uuid), timeout=2)
        except grpc.RpcError:
            pass  # the lease frees it anyway
