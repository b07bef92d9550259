"""A discrete-event replay of the engine's scheduling, with latencies from a profile.

Every decision is the engine's own, made by the same functions (``jds.scheduling.policy``): the
FCFS prefill batch and its padded shape, the prefill stall, the decode instance with the most
room, the lowest free slot, a round's rows and context bucket, when a colocated instance
prefills. What is modelled here is only time: when each decision is taken and how long the
device works on it, following the engine's threads:
- a decode loop dispatches its next round before it reads the one in flight, so the requests
  of round k + 1 are fixed when round k starts (KV that lands during round k joins round k + 2),
  a request's last round by length is known ahead, and its slot frees when that round is read;
- a colocated instance that prefills first reads the round in flight, then runs the prefill
  batch (or one chunk), then dispatches the next round with the new requests;
- KV pages: a request is admitted with the pages of its context, takes a page when its next
  token starts one (at the dispatch of that round, oldest request first), and when none is free
  the youngest request holding a slot is preempted: its pages and slot are freed, the tokens of
  its rounds not yet read are lost, and it goes to the front of the waiting queue to be
  prefilled again with its prompt and the tokens it has (no prefix cache is modelled);
- in one process, a prefill instance's transfer thread reserves a slot on the decode instance
  with the most room, waits when none is free, and moves the whole batch's KV; between
  processes, each request's row is pulled by the decode instance's landing thread, one at a time,
  once it holds a slot (and, where the profile says pulls wait for prefill, not before the
  prefill process finishes the batch it is computing).

Per-request results are ``RequestRecord``s, so attainment and goodput are computed by the very
functions the benchmark uses.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import gc
import heapq
import itertools
import sys
from collections.abc import Callable, Iterator, Sequence

from jds.bench.metrics import RequestRecord
from jds.bench.workloads import PlannedRequest
from jds.config.placement import ColocatedInstance, DecodeInstance, Placement
from jds.planner.latency import TransferModel
from jds.planner.profile import DecodeEntry, PrefillEntry, Profile
from jds.scheduling import policy
from jds.scheduling.policy import LowestFirst, PrefillBatches, pow2_at_least


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self._events: list = []
        self._order = itertools.count()

    def at(self, when: float, action: Callable[[], None], first: bool = False) -> None:
        """Run ``action`` at ``when``, after what is due then already; ``first``: before it (at most
        one such event may wait at a time: the next arrival, which is scheduled as the one before
        it comes yet runs as if all had been scheduled at the start)."""
        heapq.heappush(self._events, (when, -1 if first else next(self._order), action))

    def run(self) -> None:
        while self._events:
            self.now, _, action = heapq.heappop(self._events)
            action()


_NEVER = sys.maxsize  # a round no decoder reaches


class _Request:
    # Slots and plain attributes (not properties): the decode loop reads them every round.
    __slots__ = ("arrived", "committed", "context", "decoder", "done", "earlier", "epoch", "first", "generated",
                 "grows_from", "join", "last_round", "pages", "planned", "slot")  # fmt: skip

    def __init__(self, planned: PlannedRequest, order: int):
        self.planned = planned
        self.arrived = (planned.arrival, order)  # requests sent at one instant arrive in order, as the engine stamps them
        self.first: float | None = None  # when prefill published its token
        self.decoder: _Decoder | None = None
        self.join = 0  # index of its first round in its decoder's ``round_ends``
        self.last_round = 0  # index of its last round there (set when it joins)
        self.slot = 0  # which slot of its decoder it holds
        self.pages = 0  # KV pages it holds there, but those of rounds from ``grows_from`` on (``_Decoder.pages``)
        self.grows_from = _NEVER  # its first round, of those its ``pages`` do not count, whose token starts a page
        self.committed = 0  # pages it commits there: those of its prompt and every output token
        self.done = False  # no more rounds: its last was dispatched (or it needed none)
        self.generated = 0  # tokens it had when it (last) joined a decoder
        self.context = planned.input_len  # positions its (next) prefill computes: the prompt, its tokens but the newest
        self.earlier: tuple[float, ...] = ()  # times of its tokens decoded before it was preempted
        self.epoch = 0  # joins so far: heap entries of an earlier join are stale

    def keep(self, tokens: list[float]) -> None:
        """Tokens decoded (at these times) before a preemption stay its own: its next prefill computes them too."""
        self.earlier += tuple(tokens)
        self.generated += len(tokens)
        self.context = self.planned.input_len + max(0, self.generated - 1)

    def first_token(self, when: float) -> bool:
        """Prefill's token is out (unless this was a prefill after a preemption); whether the
        request goes on to decode."""
        if self.first is None:
            self.first, self.generated = when, 1
            self.done = self.planned.output_len == 1
        return not self.done

    def record(self) -> RequestRecord:
        times = [self.first, *self.earlier]
        if self.decoder is not None:
            times += self.decoder.round_ends[self.join : self.last_round + 1]
        return RequestRecord(self.planned.input_len, self.planned.output_len, sent=self.planned.arrival, token_times=times, end=times[-1])


def _memo(seconds: Callable[[int, int], float]) -> Callable[[int, int], float]:
    """A profile entry's seconds by shape, each shape's worked out once: shapes recur, and an
    entry's lookup (in a pydantic model) is slow."""
    return functools.lru_cache(maxsize=None)(seconds)


def _take(waiting: collections.deque, batches: PrefillBatches, limit: int, decoder: _Decoder | None = None) -> list[_Request]:
    """The requests the next prefill call takes from the head of the queue; ``decoder``: those an
    instance that decodes what it prefills admits (each then holds a slot and its pages)."""
    if decoder is not None:
        limit = min(limit, decoder.admits([r.context for r in itertools.islice(waiting, limit)]))
    n = batches.take((r.context for r in waiting), limit)
    taken = [waiting.popleft() for _ in range(n)]
    if decoder is not None:
        for r in taken:
            decoder.reserve(r)
    return taken


def _prefill_seconds(seconds: Callable[[int, int], float], batches: PrefillBatches, batch: list[_Request]) -> float:
    """The padded batch's time (``seconds``: a ``PrefillEntry``'s ``batch_seconds``)."""
    return seconds(pow2_at_least(len(batch)), batches.bucket(max(r.context for r in batch)))


class _Decoder:
    """One decode instance (or a colocated instance's decode half): its slots, and its rounds
    as the host dispatches and reads them.

    A round's cost depends only on the rows it computes and the longest sequence, so a round is
    simulated in O(1) whatever the batch, but for the requests that join or leave in it: each
    request's token times are the times its rounds were read (``_Request.record``), requests
    leave off a heap keyed by their last round, and the longest one and the highest slot in use
    are looked up again only when requests come or go (off a heap keyed by position at round 0
    and a heap of slots). A running request's token starts a page every ``page_size`` rounds, so
    the requests are grouped by the round (modulo ``page_size``) at which theirs do: a round in
    which there are pages for all of its group takes them at once, and a request's pages are
    added up only when it frees them. ``microbatches`` above 1 computes every slot.
    """

    def __init__(
        self,
        clock: _Clock,
        latency: DecodeEntry,
        slots: int,
        microbatches: int,
        max_seq_len: int,
        pages: tuple[int, int],
        on_free: Callable[[], None],
    ):
        """``pages``: (pages, page_size) of the instance's KV."""
        self.clock = clock
        self.latency = latency
        self.slots = LowestFirst(slots)
        self.free = slots  # ``len(self.slots)``, which the loops read every pass
        self.pages_total, self.page_size = pages
        self.pages_free = self.pages_total
        self.committed = 0  # pages the requests holding slots would hold at their longest (routing's measure)
        self.holding: dict[int, _Request] = {}  # slot -> the request holding it
        # by round modulo page_size: the requests taking part whose token of such a round starts a page
        self._growing: list[dict[_Request, None]] = [{} for _ in range(self.page_size)]
        self._joined: list[_Request] = []  # joined, and grouped once the pages of their first round are settled
        self.requeue: Callable[[_Request], None] = lambda r: None  # where a preempted request goes
        self.row_buckets = policy.row_buckets(slots) if microbatches == 1 else [slots]
        self.contexts = policy.context_buckets(max_seq_len, self.page_size)
        self.reserved_elsewhere = 0  # sent here by a router but not yet holding a slot
        self.reserved_elsewhere_pages = 0  # the pages those commit
        self.dispatched = 0  # rounds dispatched
        self.round_ends: list[float] = []  # when each round was read
        self.in_flight: collections.deque[float] = collections.deque()  # the ends of rounds dispatched, not read
        self.device_free = 0.0  # when the device finishes what it was given
        self.members = 0  # requests taking part in the next round dispatched
        self._on_free = on_free
        self._leaving: list = [(_NEVER, -1, None, 0)]  # (last round, order, request, epoch), over one never leaving
        self._freeing: dict[int, list[_Request]] = collections.defaultdict(list)  # round -> slots it frees when read
        self._longest: list = []  # (-(position at round 0), order, request); done ones linger until on top
        self._order = itertools.count()
        self._in_use = [False] * slots
        self._highest: list[int] = []  # negated slots taken; freed ones linger until on top
        self._changed = False  # members came or went since the highest slot and the longest were looked up
        self._top_slot = 0  # the highest slot in use
        self._start = 0  # the longest member's position at round 0
        self._cost: dict[tuple[int, int], float] = {}  # round seconds by (rows, context)
        self.landed: list[_Request] = []  # KV that arrived, for the loop's next pass
        self.looping = False

    def admits(self, contexts: Sequence[int]) -> int:
        """How many requests of these context lengths (the queue's head, in order) admission takes now."""
        needs = [policy.admission_pages(n, self.page_size) for n in contexts]
        return policy.admits(needs, self.free, self.pages_free, self.pages_total)

    def commits(self, r: _Request) -> int:
        """The pages ``r`` commits here: those of its prompt and every output token."""
        return policy.pages_for(r.planned.input_len + r.planned.output_len, self.page_size)

    def remote_room(self) -> tuple[bool, int]:
        """The room a router sees here (``policy.remote_decode_room``): the requests it sent that
        have not finished are those still landing and those holding slots."""
        sent = self.reserved_elsewhere + self.slots.size - self.free
        return policy.remote_decode_room(
            self.slots.size, self.free, sent, self.pages_total, self.committed, self.reserved_elsewhere_pages + self.committed
        )  # fmt: skip

    def reserve(self, r: _Request) -> None:
        """Give an admitted request a slot and the pages of its context."""
        r.slot, r.pages, r.grows_from = self.slots.take(), policy.admission_pages(r.context, self.page_size), _NEVER
        r.committed = max(r.pages, self.commits(r))
        self.free -= 1
        self.pages_free -= r.pages
        self.committed += r.committed

    def free_held(self, r: _Request) -> None:
        self.slots.give_back(r.slot)
        self.free += 1
        self.pages_free += self.pages(r)
        self.committed -= r.committed
        r.pages = r.committed = 0
        self.holding.pop(r.slot, None)

    def join(self, requests: list[_Request]) -> None:
        """Requests (each holding a reserved slot and pages) take part from the next round dispatched."""
        k = self.dispatched
        for r in requests:
            r.decoder, r.join, r.done = self, k, False
            r.last_round = k + r.planned.output_len - r.generated - 1
            r.epoch += 1
            self.holding[r.slot] = r
            self._in_use[r.slot] = True
            heapq.heappush(self._highest, -r.slot)
            heapq.heappush(self._leaving, (r.last_round, next(self._order), r, r.epoch))
            heapq.heappush(self._longest, (k - r.context, next(self._order), r, r.epoch))
            # round k feeds the token at position ``context + k - join``; its pages hold those below pages * page_size
            r.grows_from = k + r.pages * self.page_size - r.context
            if r.grows_from <= r.last_round:
                self._joined.append(r)
        if requests:
            self.members += len(requests)
            self._changed = True

    def pages(self, r: _Request) -> int:
        """The pages ``r`` holds: ``r.pages``, and one for each round dispatched from ``r.grows_from``
        on whose token started one (every ``page_size`` rounds up to its last)."""
        rounds = min(r.last_round, self.dispatched - 1) - r.grows_from
        return r.pages + (rounds // self.page_size + 1 if rounds >= 0 else 0)

    def _group_joined(self) -> None:
        """The requests that joined take a page with their group from the round after they joined
        on (their first token to start one is at least a round away)."""
        for r in self._joined:
            if self.holding.get(r.slot) is r:  # not preempted in the meantime
                self._growing[r.grows_from % self.page_size][r] = None
        self._joined = []

    def _retire(self, k: int) -> None:
        """Requests whose last round is ``k`` or before take part in no later round (callers look
        at ``self._leaving[0]`` first: most rounds are no one's last)."""
        while self._leaving[0][0] <= k:
            _, _, r, epoch = heapq.heappop(self._leaving)
            if epoch != r.epoch or r.decoder is not self or r.slot not in self.holding:
                continue  # preempted: its entry is of an earlier join
            r.done, self._in_use[r.slot] = True, False
            self._growing[r.grows_from % self.page_size].pop(r, None)
            self.members -= 1
            self._changed = True
            self._freeing[r.last_round].append(r)

    def _make_room(self, k: int, due: dict[_Request, None]) -> None:
        """Pages for round ``k``'s tokens that start one, oldest request first, preempting the
        youngest request holding a slot while none is free (``DecodeBatch._make_room``). When
        there are pages for all of them, neither order nor preemption comes in: they are taken
        at once, and each request's added up when it frees them (``pages``). ``due``: round ``k``'s group."""
        if len(due) <= self.pages_free:
            self.pages_free -= len(due)
            return
        for r in sorted(due, key=lambda r: r.arrived):
            while self.pages_free < 1 and self.holding.get(r.slot) is r:
                self._preempt(self.holding[policy.preemption_victim({s: h.arrived for s, h in self.holding.items()})])
            if self.holding.get(r.slot) is r:
                r.pages, r.grows_from = self.pages(r) + 1, k + self.page_size  # those before round k, and round k's
                self.pages_free -= 1

    def _preempt(self, r: _Request) -> None:
        """``r`` gives up its slot and pages; the tokens of its rounds already read stay its own."""
        read = max(0, min(len(self.round_ends), r.last_round + 1) - r.join)
        if r.done:  # its last round was dispatched, not read: its slot was to free then
            self._freeing[r.last_round].remove(r)
        else:
            self._in_use[r.slot] = False
            self._growing[r.grows_from % self.page_size].pop(r, None)
            self.members -= 1
        self._changed = True
        r.keep(self.round_ends[r.join : r.join + read])
        r.decoder, r.done = None, False
        self.free_held(r)
        self.requeue(r)
        self.clock.at(self.clock.now, self._on_free)  # once this round is dispatched: handoffs waiting for room look again

    def _look_up_extremes(self) -> None:
        """The highest slot in use and the longest member's position at round 0, once members came or went."""
        longest, highest = self._longest, self._highest
        while longest[0][2].done or longest[0][3] != longest[0][2].epoch or longest[0][2].decoder is not self:
            heapq.heappop(longest)
        while not self._in_use[-highest[0]]:
            heapq.heappop(highest)
        self._start, self._top_slot = -longest[0][0], -highest[0]
        self._changed = False

    def dispatch(self) -> bool:
        """Dispatch the next round now, if any request takes part; it runs once the device is free."""
        k = self.dispatched
        if self._leaving[0][0] < k:
            self._retire(k - 1)
        due = self._growing[k % self.page_size]
        if due:
            self._make_room(k, due)
        if self._joined:
            self._group_joined()
        if not self.members:
            return False
        if self._changed:
            self._look_up_extremes()
        shape = policy.round_shape(self.row_buckets, self.contexts, self._top_slot, self._start + k)
        seconds = self._cost.get(shape)
        if seconds is None:
            seconds = self._cost[shape] = self.latency.seconds(*shape)
        self.device_free = max(self.clock.now, self.device_free) + seconds
        self.in_flight.append(self.device_free)
        self.dispatched = k + 1
        return True

    def read(self) -> None:
        """The host reads the oldest round in flight (now, at or after its end): its tokens are
        out, and the slots of requests it ended are free."""
        k = len(self.round_ends)  # rounds are read in order
        self.in_flight.popleft()
        self.round_ends.append(self.clock.now)
        if self._leaving[0][0] <= k:
            self._retire(k)
        freed = self._freeing.pop(k, None)
        if freed:
            for r in freed:
                self.free_held(r)
            self._on_free()

    def run(self, seconds: float) -> float:
        """Other work on this device (a colocated prefill), after what it was given; when it ends."""
        self.device_free = max(self.clock.now, self.device_free) + seconds
        return self.device_free

    # -- a decode instance's own loop --------------------------------------------------------

    def land(self, requests: list[_Request]) -> None:
        """KV that arrived: it joins the next round the loop dispatches (at once if it is idle)."""
        self.landed += requests
        if not self.looping:
            self.looping = True
            self._iterate()

    def _iterate(self) -> None:
        """One pass of the decode loop: what landed joins, the next round is dispatched, and the
        round before it is read (at its end)."""
        if self.landed:
            self.join(self.landed)
            self.landed = []
        previous = self.in_flight[0] if self.in_flight else None
        dispatched = self.dispatch()
        if previous is not None:
            self.clock.at(previous, self._read_and_iterate)
        elif dispatched:
            self.clock.at(self.clock.now, self._iterate)
        else:
            self.looping = False

    def _read_and_iterate(self) -> None:
        self.read()
        self._iterate()


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
        # one process: per prefill instance, its batches waiting to ship (rows left, done)
        self.batches: dict[int, list[tuple[list[_Request], Callable[[], None]]]] = collections.defaultdict(list)
        self.shipping: set[int] = set()

    def send(self, source: _Prefiller, batch: list[_Request], done: Callable[[], None]) -> None:
        """Prefill instance ``source`` hands over a batch; ``done`` once every row has left it."""
        if self.between_processes:
            for r in batch:
                d = self.decoders[policy.most_room([d.remote_room() for d in self.decoders])]
                d.reserved_elsewhere += 1
                d.reserved_elsewhere_pages += d.commits(r)
                self.landing[id(d)].append((r, source))
                self._land_next(d)
            done()
            return
        self.batches[id(source)].append((list(batch), done))
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
        rows, done = queue[0]
        groups: dict[int, tuple[_Decoder, list[_Request]]] = {}
        while rows:
            d = self.decoders[policy.most_room([policy.decode_room(d.free, d.pages_total, d.committed) for d in self.decoders])]
            if not d.admits([rows[0].context]):
                break
            r = rows.pop(0)
            d.reserve(r)
            groups.setdefault(id(d), (d, []))[1].append(r)
        if not groups:
            return
        if not rows:
            queue.pop(0)
        seconds = sum(self.link.seconds(sum(self._bytes(d, r) for r in g)) for d, g in groups.values())  # the rows' pages (``send_pages``)
        self.shipping.add(source)

        def landed() -> None:
            self.shipping.discard(source)
            for d, g in groups.values():
                d.land(g)
            if not rows:
                done()
            self._ship(source)

        self.clock.at(self.clock.now + seconds, landed)

    def _bytes(self, d: _Decoder, r: _Request) -> int:
        """The bytes of the pages ``r``'s context fills on ``d``: what a handoff moves."""
        return policy.pages_for(r.context, d.page_size) * d.page_size * self.kv_per_token

    def _land_next(self, d: _Decoder) -> None:
        queue = self.landing[id(d)]
        if self.landing_busy[id(d)] or not queue or not d.admits([queue[0][0].context]):
            return
        r, source = queue.popleft()
        d.reserve(r)
        d.reserved_elsewhere -= 1
        d.reserved_elsewhere_pages -= d.commits(r)
        self.landing_busy[id(d)] = True

        def landed() -> None:
            self.landing_busy[id(d)] = False
            d.land([r])
            self._land_next(d)

        def asked() -> None:
            # After everything else due now: a prefill that starts as its previous batch hands over
            # is running by the time the pull reaches its process.
            answered = max(self.clock.now, source.busy_until) if self.pulls_wait else self.clock.now
            self.clock.at(answered + self.link.seconds(self._bytes(d, r)), landed)

        self.clock.at(self.clock.now, asked)


class _Prefiller:
    """One prefill instance of a disaggregated placement."""

    def __init__(self, clock: _Clock, latency: PrefillEntry, batches: PrefillBatches, waiting: collections.deque, handoff: _Handoff):
        self.clock = clock
        self.batch_seconds = _memo(latency.batch_seconds)
        self.batches = batches
        self.waiting = waiting
        self.handoff = handoff
        self.running = False
        self.busy_until = 0.0  # when the batch being computed ends
        self.pending = 0

    def poke(self) -> None:
        if self.running or self.pending >= policy.UNSHIPPED_BATCHES or not self.waiting:
            return
        batch = _take(self.waiting, self.batches, self.batches.max_batch)
        seconds = _prefill_seconds(self.batch_seconds, self.batches, batch)
        self.running = True
        self.busy_until = self.clock.now + seconds
        self.clock.at(self.busy_until, lambda: self._done(batch))

    def _done(self, batch: list[_Request]) -> None:
        self.running = False
        going = [r for r in batch if r.first_token(self.clock.now)]
        if going:
            self.pending += 1
            self.handoff.send(self, going, self._shipped)
        self.poke()

    def _shipped(self) -> None:
        self.pending -= 1
        self.poke()


class _Colocated:
    """One colocated instance's loop: prefill first whenever the policy says so, then a round."""

    def __init__(
        self,
        clock: _Clock,
        spec: ColocatedInstance,
        prefill: PrefillEntry,
        decode: DecodeEntry,
        batches: PrefillBatches,
        waiting: collections.deque,
        pages: tuple[int, int],
    ):
        self.clock = clock
        self.spec = spec
        self.batch_seconds, self.chunk_seconds = _memo(prefill.batch_seconds), _memo(prefill.chunk_seconds)
        self.batches = batches
        self.waiting = waiting
        self.decoder = _Decoder(clock, decode, spec.slots, 1, spec.max_seq_len, pages, lambda: None)
        self.chunking: tuple[_Request, int] | None = None  # (request, prompt tokens done)
        self.busy = False  # a pass of the loop is under way

    def poke(self) -> None:
        if not self.busy:
            self.busy = True
            self._iterate()

    def _iterate(self) -> None:
        d = self.decoder
        if not policy.colocated_prefills(d.free, len(self.waiting), self.chunking is not None):
            self._step()
        elif d.in_flight:  # the round in flight is read first
            self.clock.at(d.in_flight[0], self._read_and_prefill)
        else:
            self._prefill_now()

    def _read_and_prefill(self) -> None:
        self.decoder.read()
        self._prefill_now()

    def _prefill_now(self) -> None:
        d = self.decoder
        if self.spec.chunked_prefill is None:
            batch = _take(self.waiting, self.batches, self.batches.max_batch, d)
            if not batch:  # another instance took them meanwhile
                self._step()
                return
            seconds = _prefill_seconds(self.batch_seconds, self.batches, batch)
            self.clock.at(d.run(seconds), lambda: self._prefilled(batch))
            return
        if self.chunking is None:
            taken = _take(self.waiting, self.batches, 1, d)
            if not taken:
                self._step()
                return
            self.chunking = (taken[0], 0)
        done = self.chunking[1]
        seconds = self.chunk_seconds(self.spec.chunked_prefill, policy.bucket(d.contexts, done))
        self.clock.at(d.run(seconds), self._chunked)

    def _prefilled(self, batch: list[_Request]) -> None:
        going = [r for r in batch if r.first_token(self.clock.now)]
        for r in batch:
            if r.done:
                self.decoder.free_held(r)
        self.decoder.join(going)
        self._step()

    def _chunked(self) -> None:
        r, done = self.chunking
        done += self.spec.chunked_prefill
        if done < r.context:
            self.chunking = (r, done)
        else:
            self.chunking = None
            if r.first_token(self.clock.now):
                self.decoder.join([r])
            else:
                self.decoder.free_held(r)
        self._step()

    def _step(self) -> None:
        """The decode step of a pass: the next round dispatched, the one before it read."""
        d = self.decoder
        previous = d.in_flight[0] if d.in_flight else None
        dispatched = d.dispatch()
        if previous is not None:
            self.clock.at(previous, self._read_and_iterate)
        elif dispatched or policy.colocated_prefills(d.free, len(self.waiting), self.chunking is not None):
            self.clock.at(self.clock.now, self._iterate)
        else:
            self.busy = False

    def _read_and_iterate(self) -> None:
        self.decoder.read()
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
    with _collector_paused():
        return _replay(placement, profile, requests, max_seq_len, link)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cycle collector off for a run: its objects (requests, heap entries, records) live
    until it ends, so the collector's passes over them as they pile up free nothing, and on runs
    of many requests they took as long as the run's own work."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _replay(
    placement: Placement, profile: Profile, requests: Sequence[PlannedRequest], max_seq_len: int, link: str
) -> list[RequestRecord]:
    clock = _Clock()
    placement = placement.resolved(max_seq_len)
    waiting: collections.deque[_Request] = collections.deque()
    workers: list[_Prefiller | _Colocated] = []
    decoders: list[_Decoder] = []
    if placement.mode == "colocated":
        for spec in placement.instances:
            prefill, decode = profile.prefill_latency(spec.tp), profile.decode_latency(spec.tp, 1)
            batches = PrefillBatches.up_to(spec.max_seq_len, spec.max_batch, spec.max_batch_tokens)
            workers.append(_Colocated(clock, spec, prefill, decode, batches, waiting, _pages(profile, spec)))
            decoders.append(workers[-1].decoder)
    else:
        handoff_ref: list[_Handoff] = []
        for spec in placement.decode:
            decoders.append(_decoder(clock, profile, spec, lambda: handoff_ref[0].slot_freed()))
        handoff = _Handoff(clock, decoders, profile.link(link), profile.model.kv_bytes_per_token, link != "device", profile.pulls_wait_for_prefill)
        handoff_ref.append(handoff)
        for spec in placement.prefill:
            batches = PrefillBatches.up_to(placement.max_seq_len, spec.max_batch, spec.max_batch_tokens)
            workers.append(_Prefiller(clock, profile.prefill_latency(spec.tp), batches, waiting, handoff))
    sims = [_Request(r, i) for i, r in enumerate(requests)]

    def requeue(r: _Request) -> None:  # a preempted request, first in line for prefill again
        waiting.appendleft(r)
        for w in workers:
            w.poke()

    for d in decoders:
        d.requeue = requeue

    _Arrivals(clock, sims, waiting, workers)
    clock.run()
    return [r.record() for r in sims]


class _Arrivals:
    """The requests, by the instant they are sent: those sent at one instant are queued together.

    Only the next instant is on the clock at a time (ahead of whatever else is due then, as if all
    had been scheduled at the start). Nothing holds the requests once the last has come, so they
    are freed as soon as the run ends, not left for the cycle collector."""

    def __init__(
        self,
        clock: _Clock,
        requests: list[_Request],
        waiting: collections.deque,
        workers: Sequence[_Prefiller | _Colocated],
    ):
        self.clock = clock
        self.waiting = waiting
        self.workers = workers
        by_time = collections.defaultdict(list)
        for r in requests:
            by_time[r.planned.arrival].append(r)
        self._due = sorted(by_time.items(), key=lambda item: item[0], reverse=True)  # (instant, requests), next last
        self._schedule_next()

    def _schedule_next(self) -> None:
        if self._due:
            self.clock.at(self._due[-1][0], self._arrive, first=True)

    def _arrive(self) -> None:
        self.waiting.extend(self._due.pop()[1])
        self._schedule_next()
        for w in self.workers:
            w.poke()


def _decoder(clock: _Clock, profile: Profile, spec: DecodeInstance, on_free: Callable[[], None]) -> _Decoder:
    latency, microbatches = profile.decode_latency(spec.tp, spec.pp), spec.num_microbatches(profile.cpu)
    return _Decoder(clock, latency, spec.slots, microbatches, spec.max_seq_len, _pages(profile, spec), on_free)


def _pages(profile: Profile, spec: DecodeInstance | ColocatedInstance) -> tuple[int, int]:
    """(pages, page_size) of an instance's KV, as ``jds.config.fit.instance_pages`` counts them."""
    return spec.num_pages(profile.model.kv_bytes_per_token * spec.page_size), spec.page_size
