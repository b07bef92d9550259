"""A discrete-event replay of the engine's scheduling, with latencies from a profile.

It follows the engine's rules rather than an idealised queue, because attainment near the knee
depends on them:
- one FCFS waiting queue; a batch is the longest prefix that fits ``max_batch`` and
  ``max_batch_tokens`` (padded to the length bucket and a power-of-two batch, as the program is);
- a prefill instance stalls while ``PENDING_BATCHES`` of its batches wait for decode slots;
- in one process, a prefill instance's transfer thread reserves a slot on the decode instance with
  the most free slots, waits when none is free, and moves the whole batch's KV; between processes,
  each request's row is pulled by the decode instance's landing thread, one at a time, once it
  holds a slot (and, where the profile says pulls wait for prefill, not before the prefill process
  finishes the batch it is computing);
- slots are handed out lowest first; a decode round computes the slots up to the highest in use,
  rounded up to a row bucket (every slot when an instance runs several microbatches), at the
  context bucket of the longest sequence, and KV that landed joins at the next round;
- a colocated instance runs a prefill batch (or one chunk) whenever it has free slots and requests
  wait, then a decode round: the interference disaggregation removes.

Per-request results are ``RequestRecord``s, so attainment and goodput are computed by the very
functions the benchmark uses.
"""

from __future__ import annotations

import bisect
import collections
import heapq
import itertools
from collections.abc import Callable, Sequence

from jds.bench.metrics import RequestRecord
from jds.bench.workloads import PlannedRequest
from jds.engine.prefill import PENDING_BATCHES
from jds.engine.programs import length_buckets, pow2_at_least, row_buckets
from jds.mesh.placement import ColocatedInstance, DecodeInstance, Placement, PrefillBatching
from jds.planner.latency import TransferModel
from jds.planner.profile import DecodeEntry, PrefillEntry, Profile


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self._events: list = []
        self._order = itertools.count()

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (when, next(self._order), action))

    def run(self) -> None:
        while self._events:
            self.now, _, action = heapq.heappop(self._events)
            action()


class _Request:
    def __init__(self, planned: PlannedRequest):
        self.planned = planned
        self.first: float | None = None  # when prefill published its token
        self.decoder: _Decoder | None = None
        self.join = 0  # index of its first round in its decoder's ``round_ends``
        self.slot = 0  # which slot of its decoder it holds
        self.finished = False

    def first_token(self, when: float) -> bool:
        """Prefill's token is out; whether the request goes on to decode."""
        self.first = when
        self.finished = self.planned.output_len == 1
        return not self.finished

    def record(self) -> RequestRecord:
        times = [self.first]
        if self.decoder is not None:
            times += self.decoder.round_ends[self.join : self.join + self.planned.output_len - 1]
        return RequestRecord(self.planned.input_len, self.planned.output_len, sent=self.planned.arrival, token_times=times, end=times[-1])


def bucket(buckets: list[int], n: int) -> int:
    """The smallest of ``buckets`` (ascending) holding ``n``; the largest if none does."""
    return buckets[min(bisect.bisect_left(buckets, n), len(buckets) - 1)]


def _take(waiting: collections.deque, batching: PrefillBatching, buckets: list[int], limit: int) -> list[_Request]:
    """The FCFS prefix one prefill batch takes (``WaitingQueue.take`` with ``PrefillProgram.fits``)."""
    batch: list[_Request] = []
    while waiting and len(batch) < min(limit, batching.max_batch):
        lengths = [r.planned.input_len for r in batch] + [waiting[0].planned.input_len]
        cost = bucket(buckets, max(lengths)) * pow2_at_least(len(lengths))
        if len(lengths) > 1 and cost > batching.max_batch_tokens:
            break
        batch.append(waiting.popleft())
    return batch


def _prefill_seconds(latency: PrefillEntry, buckets: list[int], batch: list[_Request]) -> tuple[float, int]:
    """The padded batch's time and its padded length."""
    length = bucket(buckets, max(r.planned.input_len for r in batch))
    return latency.batch_seconds(pow2_at_least(len(batch)), length), length


class _Decoder:
    """One decode instance (or a colocated instance's decode half): slots and rounds.

    A round's cost depends only on the rows it computes and the longest sequence, so a round is
    simulated in O(log n) whatever the batch: each request's token times are the round end
    times from its first round on (``_Request.record``), finishing requests come off a heap
    keyed by their last round, the longest one off a heap keyed by its length at round 0, and
    the highest slot in use off a heap of slots. ``microbatches`` above 1 computes every slot.
    """

    def __init__(self, clock: _Clock, latency: DecodeEntry, slots: int, microbatches: int, max_seq_len: int, on_free: Callable[[], None]):
        self.clock = clock
        self.latency = latency
        self.slots = slots
        self.row_buckets = row_buckets(slots) if microbatches == 1 else [slots]
        self.free = slots
        self.reserved_elsewhere = 0  # sent here by a router but not yet holding a slot
        self.contexts = length_buckets(max_seq_len)
        self.round_ends: list[float] = []
        self.active = 0
        self.landed: list[_Request] = []
        self.stepping = False
        self._on_free = on_free
        self._finishing: list = []  # (index of its last round, order, request)
        self._longest: list = []  # (-(position at round 0), order, request); finished ones linger until on top
        self._order = itertools.count()
        self._free_slots = list(range(slots))  # a heap: lowest first, as the engine's SlotPool
        self._in_use = [False] * slots
        self._highest: list[int] = []  # negated slots taken; freed ones linger until on top
        self._cost: dict[tuple[int, int], float] = {}  # round seconds by (rows, context)

    @property
    def busy(self) -> bool:
        return self.active > 0

    def join(self, requests: list[_Request]) -> None:
        """Requests take part from the next round on (their slots already counted off ``free``)."""
        k = len(self.round_ends)
        for r in requests:
            r.decoder, r.join, r.slot = self, k, heapq.heappop(self._free_slots)
            self._in_use[r.slot] = True
            heapq.heappush(self._highest, -r.slot)
            self.active += 1
            heapq.heappush(self._finishing, (k + r.planned.output_len - 2, next(self._order), r))
            heapq.heappush(self._longest, (k - r.planned.input_len, next(self._order), r))

    def round_seconds(self) -> float:
        """The next round: the rows up to the highest slot in use, at the context bucket of the longest sequence."""
        while self._longest[0][2].finished:
            heapq.heappop(self._longest)
        while not self._in_use[-self._highest[0]]:
            heapq.heappop(self._highest)
        rows = bucket(self.row_buckets, 1 - self._highest[0])
        context = bucket(self.contexts, len(self.round_ends) - self._longest[0][0])  # the longest one's position
        if (rows, context) not in self._cost:
            self._cost[rows, context] = self.latency.seconds(rows, context)
        return self._cost[rows, context]

    def finish_round(self) -> None:
        k = len(self.round_ends)
        self.round_ends.append(self.clock.now)
        freed = 0
        while self._finishing and self._finishing[0][0] == k:
            r = heapq.heappop(self._finishing)[2]
            r.finished, self._in_use[r.slot] = True, False
            heapq.heappush(self._free_slots, r.slot)
            freed += 1
        if freed:
            self.active -= freed
            self.free += freed
            self._on_free()

    def land(self, requests: list[_Request]) -> None:
        """KV that arrived: it joins the next round (starting one if the instance is idle)."""
        self.landed += requests
        if not self.stepping:
            self.step()

    def step(self) -> None:
        """Start a round if anything is active (standalone decode instances drive themselves)."""
        if self.landed:
            self.join(self.landed)
            self.landed = []
        if not self.active:
            self.stepping = False
            return
        self.stepping = True
        self.clock.at(self.clock.now + self.round_seconds(), self._round_done)

    def _round_done(self) -> None:
        self.finish_round()
        self.step()


class _Handoff:
    """Prefilled requests to decode slots: each prefill instance's transfer thread (one process),
    or each decode instance's landing thread (processes)."""

    def __init__(
        self, clock: _Clock, decoders: list[_Decoder], link: TransferModel, kv_per_token: int, between_processes: bool, pulls_wait: bool
    ):
        self.clock = clock
        self.decoders = decoders
        self.link = link
        self.kv_per_token = kv_per_token
        self.between_processes = between_processes
        self.pulls_wait = pulls_wait  # a pull is answered only once its prefill process is not computing
        self.landing = {id(d): collections.deque() for d in decoders}  # requests sent to a decode process
        self.landing_busy = {id(d): False for d in decoders}
        # one process: per prefill instance, its batches waiting to ship (rows left, transit bytes, done)
        self.batches: dict[int, list[tuple[list[_Request], int, Callable[[], None]]]] = collections.defaultdict(list)
        self.shipping: set[int] = set()

    def send(self, source: _Prefiller, batch: list[_Request], length: int, padded_rows: int, done: Callable[[], None]) -> None:
        """Prefill instance ``source`` hands over a batch (``padded_rows`` rows of ``length``
        tokens were computed); ``done`` once every row has left it."""
        if self.between_processes:
            for r in batch:
                d = max(self.decoders, key=lambda d: d.free - d.reserved_elsewhere)
                d.reserved_elsewhere += 1
                self.landing[id(d)].append((r, length, source))
                self._land_next(d)
            done()
            return
        self.batches[id(source)].append((list(batch), padded_rows * length * self.kv_per_token, done))
        self._ship(id(source))

    def slot_freed(self) -> None:
        if self.between_processes:
            for d in self.decoders:
                self._land_next(d)
        else:
            for source in list(self.batches):
                self._ship(source)

    def _ship(self, source: int) -> None:
        """Reserve slots for the head batch's rows in order and move them; wait when none is free."""
        queue = self.batches[source]
        if source in self.shipping or not queue:
            return
        rows, nbytes, done = queue[0]
        groups: dict[int, tuple[_Decoder, list[_Request]]] = {}
        while rows:
            d = max(self.decoders, key=lambda d: d.free)
            if not d.free:
                break
            d.free -= 1
            groups.setdefault(id(d), (d, []))[1].append(rows.pop(0))
        if not groups:
            return
        if not rows:
            queue.pop(0)
        seconds = len(groups) * self.link.seconds(nbytes)  # every ship moves the whole batch's KV (``send_kv``)
        self.shipping.add(source)

        def landed() -> None:
            self.shipping.discard(source)
            for d, g in groups.values():
                d.land(g)
            if not rows:
                done()
            self._ship(source)

        self.clock.at(self.clock.now + seconds, landed)

    def _land_next(self, d: _Decoder) -> None:
        queue = self.landing[id(d)]
        if self.landing_busy[id(d)] or not queue or not d.free:
            return
        r, length, source = queue.popleft()
        d.free -= 1
        d.reserved_elsewhere -= 1
        self.landing_busy[id(d)] = True

        def landed() -> None:
            self.landing_busy[id(d)] = False
            d.land([r])
            self._land_next(d)

        def asked() -> None:
            # After everything else due now: a prefill that starts as its previous batch hands over
            # is running by the time the pull reaches its process.
            answered = max(self.clock.now, source.busy_until) if self.pulls_wait else self.clock.now
            self.clock.at(answered + self.link.seconds(length * self.kv_per_token), landed)

        self.clock.at(self.clock.now, asked)


class _Prefiller:
    """One prefill instance of a disaggregated placement."""

    def __init__(self, clock: _Clock, latency: PrefillEntry, batching: PrefillBatching, buckets: list[int], waiting: collections.deque, handoff: _Handoff):
        self.clock = clock
        self.latency = latency
        self.batching = batching
        self.buckets = buckets
        self.waiting = waiting
        self.handoff = handoff
        self.running = False
        self.busy_until = 0.0  # when the batch being computed ends
        self.pending = 0

    def poke(self) -> None:
        if self.running or self.pending >= PENDING_BATCHES or not self.waiting:
            return
        batch = _take(self.waiting, self.batching, self.buckets, self.batching.max_batch)
        seconds, length = _prefill_seconds(self.latency, self.buckets, batch)
        self.running = True
        self.busy_until = self.clock.now + seconds
        self.clock.at(self.busy_until, lambda: self._done(batch, length))

    def _done(self, batch: list[_Request], length: int) -> None:
        self.running = False
        going = [r for r in batch if r.first_token(self.clock.now)]
        if going:
            self.pending += 1
            self.handoff.send(self, going, length, pow2_at_least(len(batch)), self._shipped)
        self.poke()

    def _shipped(self) -> None:
        self.pending -= 1
        self.poke()


class _Colocated:
    """One colocated instance: prefill first whenever slots are free, then a decode round."""

    def __init__(self, clock: _Clock, spec: ColocatedInstance, prefill: PrefillEntry, decode: DecodeEntry, buckets: list[int], waiting: collections.deque, max_seq_len: int):
        self.clock = clock
        self.spec = spec
        self.prefill = prefill
        self.buckets = buckets
        self.waiting = waiting
        self.decoder = _Decoder(clock, decode, spec.slots, 1, spec.max_seq_len or max_seq_len, lambda: None)
        self.chunking: tuple[_Request, int] | None = None  # (request, prompt tokens done)
        self.busy = False

    def poke(self) -> None:
        if not self.busy:
            self._iterate()

    def _iterate(self) -> None:
        self.busy = True
        d = self.decoder
        if self.spec.chunked_prefill is None and d.free and self.waiting:
            batch = _take(self.waiting, self.spec, self.buckets, d.free)
            d.free -= len(batch)
            seconds, _ = _prefill_seconds(self.prefill, self.buckets, batch)
            self.clock.at(self.clock.now + seconds, lambda: self._prefilled(batch))
        elif self.spec.chunked_prefill is not None and (self.chunking or (d.free and self.waiting)):
            if self.chunking is None:
                d.free -= 1
                self.chunking = (self.waiting.popleft(), 0)
            chunk = self.spec.chunked_prefill
            done = self.chunking[1]
            context = bucket(d.contexts, done)
            self.clock.at(self.clock.now + self.prefill.chunk_seconds(chunk, context), self._chunked)
        else:
            self._decode_round()

    def _prefilled(self, batch: list[_Request]) -> None:
        going = [r for r in batch if r.first_token(self.clock.now)]
        self.decoder.free += len(batch) - len(going)
        self.decoder.join(going)
        self._decode_round()

    def _chunked(self) -> None:
        r, done = self.chunking
        done += self.spec.chunked_prefill
        if done < r.planned.input_len:
            self.chunking = (r, done)
        else:
            self.chunking = None
            if r.first_token(self.clock.now):
                self.decoder.join([r])
            else:
                self.decoder.free += 1
        self._decode_round()

    def _decode_round(self) -> None:
        d = self.decoder
        if not d.busy:
            if (d.free and self.waiting) or self.chunking:
                self._iterate()
            else:
                self.busy = False
            return
        self.clock.at(self.clock.now + d.round_seconds(), self._round_done)

    def _round_done(self) -> None:
        self.decoder.finish_round()
        self._iterate()


def simulate(
    placement: Placement,
    profile: Profile,
    requests: Sequence[PlannedRequest],
    max_seq_len: int,
    link: str = "device",
) -> list[RequestRecord]:
    """What each request would see under ``placement``: one ``RequestRecord`` per request, in order.

    ``link`` is how KV moves: ``device`` within one serving process (a batch at a time); ``process``
    or ``network`` between processes (a config with a ``cluster:`` section), one request at a time.
    """
    clock = _Clock()
    waiting: collections.deque[_Request] = collections.deque()
    buckets = length_buckets(max_seq_len)
    workers: list[_Prefiller | _Colocated] = []
    if placement.mode == "colocated":
        for spec in placement.instances:
            prefill, decode = profile.prefill_latency(spec.tp), profile.decode_latency(spec.tp, 1)
            workers.append(_Colocated(clock, spec, prefill, decode, buckets, waiting, max_seq_len))
    else:
        decoders: list[_Decoder] = []
        handoff_ref: list[_Handoff] = []
        for spec in placement.decode:
            decoders.append(_decoder(clock, profile, spec, max_seq_len, lambda: handoff_ref[0].slot_freed()))
        handoff = _Handoff(clock, decoders, profile.link(link), profile.model.kv_bytes_per_token, link != "device", profile.pulls_wait_for_prefill)
        handoff_ref.append(handoff)
        for spec in placement.prefill:
            workers.append(_Prefiller(clock, profile.prefill_latency(spec.tp), spec, buckets, waiting, handoff))
    sims = [_Request(r) for r in requests]

    def arrive(r: _Request) -> None:
        waiting.append(r)
        for w in workers:
            w.poke()

    for r in sims:
        clock.at(r.planned.arrival, lambda r=r: arrive(r))
    clock.run()
    return [r.record() for r in sims]


def _decoder(clock: _Clock, profile: Profile, spec: DecodeInstance, max_seq_len: int, on_free: Callable[[], None]) -> _Decoder:
    latency, microbatches = profile.decode_latency(spec.tp, spec.pp), spec.num_microbatches(profile.cpu)
    return _Decoder(clock, latency, spec.slots, microbatches, spec.max_seq_len or max_seq_len, on_free)
