"""The engine: builds every instance of a placement, and is the one door requests come through.

``submit`` validates a request and queues it; the caller reads its ``RequestStream``. Threads,
one per role (JetStream style): per prefill instance a prefill thread and a transfer thread, per
decode instance a decode thread, per colocated instance one thread for both phases. Requests
flow between them through the shared waiting queue, bounded per-instance transfer queues and
decode inboxes. ``abort`` only sets a flag (or takes the request out of the waiting queue); the
thread that holds the request frees its slot and KV at its next check, within one decode step.
"""

from __future__ import annotations

import logging
import threading

import jax

from jds.config.fit import check_placement
from jds.config.placement import Placement
from jds.engine import builders
from jds.engine.colocated import ColocatedWorker
from jds.engine.decode import DecodeWorker
from jds.engine.kv_pool import KVPool
from jds.engine.prefill import DecodeRouter, PrefillWorker
from jds.engine.programs import compile_all
from jds.engine.request import Request
from jds.engine.running import RunningRequests
from jds.engine.sequence import RequestStream
from jds.engine.waiting import WaitingQueue
from jds.model.loader import LoadedModel
from jds.model.matrices import held_weight_itemsize

log = logging.getLogger(__name__)


class Engine:
    """All instances of one placement in this process; thread-safe ``submit`` / ``abort``.

    ``max_waiting`` bounds the requests waiting for prefill; beyond it ``submit`` raises
    ``QueueFull`` (from ``jds.engine.running``; a server turns it into RESOURCE_EXHAUSTED).
    """

    def __init__(
        self,
        model: LoadedModel,
        placement: Placement,
        *,
        warmup: bool = False,
        progress: bool = False,
        max_waiting: int | None = None,
    ):
        if model.params is None:
            raise ValueError("the model's parameters were released; load the model again for a new engine")
        self.model = model
        self.placement = placement = placement.resolved(model.max_seq_len)
        self.max_waiting = max_waiting
        devices = jax.devices()
        weight_itemsize = held_weight_itemsize(model.quantization, model.dtype.itemsize)
        check_placement(placement, model.arch, model.dtype.itemsize, model.max_seq_len, devices, weight_itemsize)
        self._stop = threading.Event()
        self._slots_changed = threading.Condition()
        self._waiting = WaitingQueue()
        self.prefill_workers: list[PrefillWorker] = []
        self.decode_workers: list[DecodeWorker] = []
        self.colocated_workers: list[ColocatedWorker] = []
        if placement.mode == "disaggregated":
            self._build_disaggregated(devices)
        else:
            self._build_colocated(devices)
        self.max_seq_len = placement.max_seq_len
        self.model = model.without_params()  # every instance holds its own placed copy
        kv_positions = max(p.pages.total * p.page_size for p in self._pools)
        self._running = RunningRequests(self.model, self.max_seq_len, max_waiting, lambda: kv_positions)
        log.info("placement: %s", placement.describe())
        if warmup:
            self.warmup(progress)
        for t in self._threads():
            t.start()

    # -- building ---------------------------------------------------------------------------

    def _build_disaggregated(self, devices) -> None:
        for i, spec in enumerate(self.placement.decode):
            pipeline = builders.decode_instance(self.model, spec, [devices[d] for d in spec.devices])
            pool = builders.kv_pool(pipeline, self._slots_changed)
            self.decode_workers.append(DecodeWorker(f"decode{i}", pipeline, pool, self._stop, self._waiting.put_front))
        router = DecodeRouter(self.decode_workers, self._slots_changed, self._stop)
        cuts = tuple(sorted(set().union(*(w.pipeline.cuts for w in self.decode_workers))))
        for i, spec in enumerate(self.placement.prefill):
            program = builders.prefill_instance(
                self.model, spec, [devices[d] for d in spec.devices], self.placement.max_seq_len, self.placement.page_size, cuts
            )
            pool = builders.prefill_pool(self.model, spec, program, self._slots_changed) or (None, None)
            self.prefill_workers.append(PrefillWorker(f"prefill{i}", program, self._waiting, router.send, self._stop, *pool))

    def _build_colocated(self, devices) -> None:
        for i, spec in enumerate(self.placement.instances):
            program, pipeline = builders.colocated_instance(self.model, spec, [devices[d] for d in spec.devices])
            pool = builders.kv_pool(pipeline, self._slots_changed, spec.enable_prefix_caching)
            self.colocated_workers.append(
                ColocatedWorker(f"colocated{i}", program, pipeline, pool, self._waiting, spec.chunked_prefill, self._stop)
            )

    def _threads(self) -> list[threading.Thread]:
        return (
            [t for w in self.prefill_workers for t in w.threads]
            + [w.thread for w in self.decode_workers]
            + [w.thread for w in self.colocated_workers]
        )

    def warmup(self, progress: bool = False) -> None:
        """Compile every program shape ahead of time, so no request waits for a compile.

        Nothing runs: ``lower().compile()`` fills the same cache the calls use.
        """
        jobs = [job for w in self.prefill_workers for job in builders.prefill_warmup(w.program, True, w.prompts and w.prompts.pipeline)]
        jobs += [job for w in self.colocated_workers for job in builders.prefill_warmup(w.program, hands_off=False)]
        for w in self.decode_workers:
            jobs += w.pipeline.compile(w.pipeline.insert_sizes(), self.prefill_workers[0].program.starts)
        for w in self.colocated_workers:
            jobs += w.pipeline.compile(w.program.page_counts(), w.program.starts, w.chunk)
        compile_all(jobs, progress)

    # -- requests ---------------------------------------------------------------------------

    def validate(self, request: Request) -> tuple[int, ...]:
        """Raise ValueError naming the problem if the engine cannot run ``request``; else its stop ids."""
        return self._running.validate(request)

    def submit(self, request: Request) -> RequestStream:
        """Queue a request; its stream yields tokens and text as they are produced."""
        if self._stop.is_set():
            raise RuntimeError("engine is shut down")
        return self._running.admit(request, lambda: len(self._waiting), self._waiting.put).stream()

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is; its slot and KV are freed. False if it is not running."""
        seq = self._running.get(request_id)
        if seq is None:
            return False
        seq.aborted.set()
        if self._waiting.remove(seq):
            seq.publish("abort")
        return True

    # -- state ------------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def _pools(self) -> list[KVPool]:
        return [w.pool for w in self.decode_workers + self.colocated_workers]

    @property
    def _prefill_pools(self) -> list[KVPool]:
        """The pools of the prefill instances that cache prefixes."""
        return [w.pool for w in self.prefill_workers if w.pool is not None]

    def slot_usage(self) -> tuple[int, int]:
        """(slots in use, total slots) over every decode-capable instance."""
        return sum(p.in_use for p in self._pools), sum(p.size for p in self._pools)

    def page_usage(self) -> tuple[int, int]:
        """(KV pages in use, total KV pages) over every decode-capable instance."""
        return _pages_used_and_total(self._pools)

    def prefill_page_usage(self) -> tuple[int, int]:
        """(KV pages in use, total KV pages) over the prefill instances' prefix-cache pools."""
        return _pages_used_and_total(self._prefill_pools)

    def prefix_cache_usage(self) -> tuple[int, int]:
        """(prompt positions looked up in the instances' prefix caches, of those found cached)."""
        pools = self._pools + self._prefill_pools
        return sum(p.prefix_queried for p in pools), sum(p.prefix_hits for p in pools)

    def drain(self, timeout: float) -> int:
        return self._running.wait_finished(timeout)

    def shutdown(self) -> None:
        """Stop every thread; requests still running end with ``abort``."""
        self._stop.set()
        self._waiting.wake()
        for t in self._threads():
            if t.is_alive():
                t.join()
        for seq in self._running.all():
            seq.publish("abort")


def _pages_used_and_total(pools: list[KVPool]) -> tuple[int, int]:
    return sum(p.pages.used for p in pools), sum(p.pages.total for p in pools)
