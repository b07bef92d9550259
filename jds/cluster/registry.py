"""The router's view of its instances: addresses, health, load, and which one a request goes to.

A health thread asks every instance for its ``Status`` every ``health_seconds``. One that does
not answer is taken out of rotation at once (also when a call to it fails); it is put back when it
answers again, e.g. after a restart on the same address. The policy picks among the healthy ones.
Decode instances: the one with the most room (a free slot, then the fewest KV pages committed,
counting requests sent there that may not have landed yet). Prefill instances: ``cache_aware``
(the default) remembers the page keys of the prompts it sent to each instance and sends a prompt
where the longest run of its leading pages was sent before, so that instance's prefix cache
serves it, unless that instance has more than ``cache_balance`` requests in flight beyond the
least loaded one; with no such run, the least loaded. ``least_loaded`` takes the prefill instance
with the fewest requests in flight from this router; ``round_robin`` takes instances of both
roles in turn, a baseline to compare against.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from typing import Literal

import grpc

from jds.api import instances_pb2 as ipb
from jds.api import instances_pb2_grpc as ipb_grpc
from jds.scheduling import policy
from jds.scheduling.pages import PrefixIndex

log = logging.getLogger(__name__)

Role = Literal["prefill", "decode"]
CHANNEL_OPTIONS = [  # reconnect quickly to an instance that restarts on the same address
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclasses.dataclass(eq=False)
class Instance:
    name: str
    role: Role
    address: str
    stub: object
    channel: grpc.Channel
    healthy: bool = False
    status: ipb.InstanceStatus | None = None
    in_flight: int = 0  # requests this router has sent here and not yet finished
    in_flight_pages: int = 0  # the pages those requests commit (decode: prompt and max_tokens)
    prefixes: PrefixIndex = dataclasses.field(default_factory=PrefixIndex)  # prefill: the page keys of prompts sent here


class Registry:
    def __init__(self, prefill: list[str], decode: list[str], health_seconds: float, policy: str = "cache_aware", cache_balance: int = 4):
        self.policy = policy
        self.cache_balance = cache_balance
        self._turn = {"prefill": 0, "decode": 0}
        self.instances: list[Instance] = []
        for role, addresses, stub in (("prefill", prefill, ipb_grpc.PrefillInstanceStub), ("decode", decode, ipb_grpc.DecodeInstanceStub)):
            for i, address in enumerate(addresses):
                channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
                self.instances.append(Instance(f"{role}{i}", role, address, stub(channel), channel))
        self.health_seconds = health_seconds
        self.changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="health", daemon=True)
        self._thread.start()

    def of(self, role: Role) -> list[Instance]:
        return [i for i in self.instances if i.role == role]

    # -- health -----------------------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.is_set():
            for instance in self.instances:
                self.check(instance)
            self._stop.wait(self.health_seconds)

    def check(self, instance: Instance) -> bool:
        try:
            status = instance.stub.Status(ipb.InstanceStatusRequest(), timeout=max(1.0, self.health_seconds))
        except grpc.RpcError as err:
            self.mark_down(instance, f"{err.code().name}: {err.details()}")
            return False
        with self.changed:
            if instance.status is not None and status.prefix_cache_queried_tokens < instance.status.prefix_cache_queried_tokens:
                instance.prefixes.clear()  # restarted between two checks: its cache is empty
            instance.status = status
            if not instance.healthy:
                log.info("%s at %s is serving: in rotation", instance.name, instance.address)
            instance.healthy = True
            self.changed.notify_all()
        return True

    def mark_down(self, instance: Instance, why: str) -> None:
        with self.changed:
            if instance.healthy:
                log.warning("%s at %s stopped answering (%s): out of rotation", instance.name, instance.address, why)
            instance.healthy = False
            instance.prefixes.clear()  # if it comes back, it may be a new process with an empty cache
            self.changed.notify_all()

    def wait_ready(self, timeout: float) -> bool:
        """Until every instance answered once (or ``timeout``); whether they all did."""
        with self.changed:
            return self.changed.wait_for(lambda: all(i.healthy for i in self.instances), timeout)

    # -- choice -----------------------------------------------------------------------------------

    def acquire(
        self, role: Role, need: int, timeout: float, cancelled: threading.Event, pages: int = 0, keys: Sequence[bytes] = ()
    ) -> Instance | None:  # fmt: skip
        """The healthy instance of ``role`` the policy picks among those that fit ``need``
        positions (decode: and hold the ``pages`` the request commits), counted as taken with those
        pages (prefill: the prompt's page ``keys`` are remembered there). Busy instances queue
        requests themselves, so this waits only while none is healthy, up to ``timeout``; None if
        none came back or ``cancelled`` was set."""
        with self.changed:
            end = None
            while not cancelled.is_set() and not self._stop.is_set():
                best = self._best(role, need, keys, pages)
                if best is not None:
                    best.in_flight += 1
                    best.in_flight_pages += pages
                    if keys:
                        best.prefixes.add(keys, best.status.kv_pages_total)
                    return best
                now = time.monotonic()
                end = now + timeout if end is None else end
                if now >= end:
                    return None
                self.changed.wait(min(0.05, end - now))
            return None

    def _best(self, role: Role, need: int, keys: Sequence[bytes], pages: int) -> Instance | None:
        ready = [i for i in self.of(role) if i.healthy and i.status is not None and i.status.max_seq_len >= need]
        if role == "decode":  # one whose pool could not hold the request alone would preempt it for ever
            ready = [i for i in ready if i.status.kv_pages_total >= pages]
        if self.policy == "round_robin" and ready:
            self._turn[role] += 1
            return ready[self._turn[role] % len(ready)]
        if role == "prefill":
            matched = [i.prefixes.matched(keys) if self.policy == "cache_aware" else 0 for i in ready]
            chosen = policy.prefill_choice(matched, [i.in_flight for i in ready], self.cache_balance)
            return None if chosen is None else ready[chosen]
        best = policy.most_room([
            policy.remote_decode_room(
                s.slots_total, s.slots_free, i.in_flight, s.kv_pages_total, s.kv_pages_committed, i.in_flight_pages
            )
            for i, s in ((i, i.status) for i in ready)
        ])  # fmt: skip
        return None if best is None else ready[best]

    def release(self, instance: Instance, pages: int = 0) -> None:
        """A request ``acquire`` counted here (with its ``pages``) has finished."""
        with self.changed:
            instance.in_flight -= 1
            instance.in_flight_pages -= pages
            self.changed.notify_all()

    # -- totals -----------------------------------------------------------------------------------

    def _serving(self, role: Role) -> list:
        return [i.status for i in self.of(role) if i.healthy and i.status is not None]

    def largest_decode_pool(self) -> int | None:
        """The most KV pages a decode instance holds, of those that answered (now or before); None
        before any has."""
        totals = [i.status.kv_pages_total for i in self.of("decode") if i.status is not None]
        return max(totals, default=None)

    def slot_usage(self) -> tuple[int, int]:
        """(slots in use, total slots) over the decode instances now serving."""
        statuses = self._serving("decode")
        return sum(s.slots_total - s.slots_free for s in statuses), sum(s.slots_total for s in statuses)

    def page_usage(self, role: Role = "decode") -> tuple[int, int]:
        """(KV pages in use: held or cached, total KV pages) over the instances of ``role`` now serving."""
        statuses = self._serving(role)
        return sum(s.kv_pages_used for s in statuses), sum(s.kv_pages_total for s in statuses)

    def prefix_cache_usage(self) -> tuple[int, int]:
        """(prompt positions looked up, of those found cached) over the prefill instances' prefix
        caches, as of their last status."""
        statuses = self._serving("prefill")
        return sum(s.prefix_cache_queried_tokens for s in statuses), sum(s.prefix_cache_hit_tokens for s in statuses)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for instance in self.instances:
            instance.channel.close()
