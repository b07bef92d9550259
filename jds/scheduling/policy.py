"""How jds schedules: plain data in, decisions out (no JAX, no threads, no clock).

Every rule that decides which requests run together lives here once: the engine's workers, the
cluster's roles and the planner's simulator all decide through these functions, so a simulated
placement makes the decisions a served one makes, and a change of policy is made in one place.
Callers own the state (queues, slots, clocks) and pass in what a rule reads.

The rules:
- prefill takes the longest FCFS prefix of the waiting queue whose padded shape (a power-of-two
  batch of the longest prompt's length bucket) fits the instance's ``max_batch`` and
  ``max_batch_tokens``; the head is never skipped, and a single prompt always fits;
- a prefill instance stalls while ``UNSHIPPED_BATCHES`` of its batches wait for decode room;
- a request is admitted to a decode or colocated instance when a slot is free and the pages of
  its context and its next token are, less a small reserve (``ADMIT_RESERVE``) kept for the
  running requests to grow into; the queue's head is admitted first;
- a prefilled request goes to the decode instance with the most room (``decode_room``: a free
  slot, then the fewest pages committed; the first on ties), once that one admits it;
- slots are handed out lowest first, and a decode round computes the rows up to the highest one
  in use, rounded up to a row bucket, reading the context bucket of its longest sequence;
- a running request that needs a page when none is free preempts the youngest running request
  (itself, if it is the youngest), which goes back to the front of the waiting queue;
- a colocated instance prefills (a batch, or a prompt's next chunk) whenever it has free slots
  and requests wait or a prompt is half chunked, then runs a decode round.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
from collections.abc import Iterable, Mapping, Sequence

MIN_BUCKET = 16  # the shortest padded prompt length
PENDING_BATCHES = 2  # prefilled batches queued for the transfer thread, per prefill instance
# Prefilled batches not yet shipped when a prefill instance stops computing: the queue's, the one
# the transfer thread holds while it waits for decode room, and the one computed that cannot be queued.
UNSHIPPED_BATCHES = PENDING_BATCHES + 2
ADMIT_RESERVE = 0.01  # share of an instance's pages admission leaves free for running requests to grow into


def pow2_at_least(n: int) -> int:
    return 1 << (n - 1).bit_length()


def length_buckets(max_len: int) -> list[int]:
    """Powers of two from MIN_BUCKET, capped by (and ending at) ``max_len``: the padded prompt
    lengths prefill compiles, and the cache positions a decode round may read."""
    buckets, b = [], MIN_BUCKET
    while b < max_len:
        buckets.append(b)
        b *= 2
    return buckets + [max_len]


def context_buckets(max_len: int, page_size: int) -> list[int]:
    """The cache positions a decode round may read: ``length_buckets`` rounded up to whole pages
    (a round reads whole pages), each once."""
    return sorted({pages_for(b, page_size) * page_size for b in length_buckets(max_len)})


def row_buckets(size: int) -> list[int]:
    """How many rows of a microbatch of ``size`` slots a decode round may compute: 1, 8, 64, ...
    below ``size``, then ``size``.

    On 2 CPU cores a SmolLM2 step takes 20 ms for 1 row, 39 ms for 8 and 94 ms for 32. Each
    bucket costs one more compile per context (about 0.5 s each), so the buckets are far apart:
    the default 8 slots add one, batch 1.
    """
    buckets, rows = [], 1
    while rows < size:
        buckets.append(rows)
        rows *= 8
    return buckets + [size]


def bucket(buckets: Sequence[int], n: int) -> int:
    """The smallest of ``buckets`` (ascending) holding ``n``; the largest if none does."""
    return buckets[min(bisect.bisect_left(buckets, n), len(buckets) - 1)]


@dataclasses.dataclass(frozen=True)
class PrefillBatches:
    """Which waiting requests one prefill call of an instance takes, and at what padded shape."""

    buckets: tuple[int, ...]  # padded prompt lengths
    max_batch: int
    max_batch_tokens: int

    @classmethod
    def up_to(cls, max_len: int, max_batch: int, max_batch_tokens: int) -> PrefillBatches:
        return cls(tuple(length_buckets(max_len)), max_batch, max_batch_tokens)

    def bucket(self, length: int) -> int:
        return bucket(self.buckets, length)

    def cost(self, lengths: Sequence[int]) -> int:
        """Padded tokens a batch of these prompt lengths occupies."""
        return self.bucket(max(lengths)) * pow2_at_least(len(lengths))

    def fits(self, lengths: Sequence[int]) -> bool:
        """Whether these prompts may share one call (a single prompt always may)."""
        return len(lengths) == 1 or (len(lengths) <= self.max_batch and self.cost(lengths) <= self.max_batch_tokens)

    def take(self, lengths: Iterable[int], limit: int) -> int:
        """How many requests from the head of the queue (``lengths``: theirs, in queue order, up to
        the first this instance cannot serve) the next call takes: the longest prefix of at most
        ``limit`` that fits."""
        taken: list[int] = []
        for n in lengths:
            if len(taken) >= limit or not self.fits(taken + [n]):
                break
            taken.append(n)
        return len(taken)

    def shapes(self) -> list[tuple[int, int]]:
        """Every (batch, bucket) a call can have: what warm-up compiles."""
        out = []
        for length in self.buckets:
            batch = 1
            while batch == 1 or (batch <= self.max_batch and batch * length <= self.max_batch_tokens):
                out.append((batch, length))
                batch *= 2
        return out


def pages_for(tokens: int, page_size: int) -> int:
    """Pages that hold ``tokens`` positions."""
    return -(-tokens // page_size)


def admission_pages(context_len: int, page_size: int) -> int:
    """Pages a request takes when admitted: its context and the position of its next token."""
    return pages_for(context_len + 1, page_size)


def admits(needs: Sequence[int], free_slots: int, free_pages: int, total_pages: int) -> int:
    """How many requests from the head of the queue (``needs``: the pages each takes, in order) an
    instance admits now: while slots are free and their pages leave ``ADMIT_RESERVE`` of the
    instance's pages free. A request alone on an idle instance (no page in use) is admitted if
    its pages exist at all."""
    reserve = int(ADMIT_RESERVE * total_pages)
    n, left = 0, free_pages
    for need in needs:
        if n >= free_slots or need > left - (reserve if left < total_pages else 0):
            break
        n, left = n + 1, left - need
    return n


def preemption_victim(arrivals: Mapping[int, float | tuple[float, int]]) -> int:
    """Which running request gives its pages up when one needs a page and none is free: the
    youngest (the latest arrival; ``arrivals`` maps each running slot to its request's arrival,
    a time or anything ordered like one)."""
    return max(arrivals, key=lambda slot: (arrivals[slot], slot))


def most_room(rooms: Sequence) -> int | None:
    """Which decode instance a prefilled request goes to: the one with the most room (the first
    on ties); None when there is none to choose from. Room may be zero or negative (a queue)."""
    return max(range(len(rooms)), key=lambda i: rooms[i], default=None)


def prefill_choice(matched: Sequence[int], in_flight: Sequence[int], balance: int) -> int | None:
    """Which prefill instance a prompt goes to (cache-aware, as SGLang's router): the one thought
    to hold the longest run of the prompt's leading pages (``matched``), so that it computes the
    least, unless it has more than ``balance`` requests in flight beyond the least loaded one: a
    popular prefix must not pile every request onto one instance while another idles. With no
    match anywhere, the least loaded (the first on ties); None when there is none to choose from."""
    if not in_flight:
        return None
    least = min(range(len(in_flight)), key=lambda i: in_flight[i])
    best = max(range(len(matched)), key=lambda i: (matched[i], -in_flight[i], -i))
    if matched[best] == 0 or in_flight[best] - in_flight[least] > balance:
        return least
    return best


def decode_room(free_slots: int, total_pages: int, committed_pages: int) -> tuple[bool, int]:
    """The room of a decode instance in one process, for routing: whether it has a free slot, then
    the pages its running requests would leave even at their longest (``committed_pages``: the
    pages of each one's prompt plus its ``max_tokens``). Committed rather than free pages: they
    change only as requests come and go, not with each step's growth, so where a request goes does
    not depend on how fast the steps ran; and an instance whose requests will grow long is fuller
    than its pages in use say."""
    return free_slots > 0, total_pages - committed_pages


def remote_room(total: int, free: int, sent: int) -> int:
    """The room a router sees on a decode process: its slots less the larger of those it reports
    in use and the requests this router sent there that have not finished (some may not have
    landed, or been reported, yet)."""
    return total - max(sent, total - free)


def remote_decode_room(
    slots_total: int, slots_free: int, sent: int, pages_total: int, pages_committed: int, sent_pages: int
) -> tuple[bool, int]:  # fmt: skip
    """``decode_room`` as a router sees a decode process: whether a slot is free once the requests
    it sent there and that have not finished are counted (``remote_room``), then the pages left by
    the larger of those the process reports committed and those of the requests sent
    (``sent_pages``: each one's prompt and ``max_tokens``)."""
    return remote_room(slots_total, slots_free, sent) > 0, pages_total - max(sent_pages, pages_committed)


def round_shape(rows: Sequence[int], contexts: Sequence[int], highest: int, longest: int) -> tuple[int, int]:
    """A decode round's (rows, context): the rows up to ``highest`` (the highest row in use),
    rounded up to one of ``rows``, and the context bucket holding ``longest`` (the furthest
    position a row writes)."""
    return bucket(rows, highest + 1), bucket(contexts, longest)


def steps_again(generated: int, in_flight: bool, limit: int) -> bool:
    """Whether a running request takes part in the next decode round. A round is dispatched
    before the host reads the one in flight, so a request whose token in flight is its last by
    length (known ahead, unlike a stop) takes no part."""
    return not (in_flight and generated + 1 >= limit)


def colocated_prefills(free: int, waiting: int, chunking: bool) -> bool:
    """Whether a colocated instance prefills (a batch, or the next chunk of a prompt) before its
    next decode round: whenever a prompt is half chunked, or slots are free and requests wait."""
    return chunking or (free > 0 and waiting > 0)


class LowestFirst:
    """Free slot numbers, handed out lowest first: keeping busy slots low keeps a light round's
    rows (up to the highest slot in use) few."""

    def __init__(self, slots: int):
        self.size = slots
        self._free = list(range(slots))  # a heap

    def __len__(self) -> int:
        return len(self._free)

    def take(self) -> int | None:
        return heapq.heappop(self._free) if self._free else None

    def give_back(self, slot: int) -> None:
        if slot in self._free:
            raise RuntimeError(f"slot {slot} released twice")
        heapq.heappush(self._free, slot)
