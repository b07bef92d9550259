"""The placements a planner may choose among, and whether each fits device memory.

A candidate is described by its parts (prefill tp, decode tp/pp/slots, colocated tp/slots/chunk)
and instance counts, and turned into the same ``Placement`` a config holds, with devices numbered
node by node. Memory per device follows ``jds.config.fit``'s rule: weights split over tp x pp, plus
the KV of every slot at the instance's full sequence length.
"""

from __future__ import annotations

import dataclasses

from jds.config.placement import ColocatedInstance, DecodeInstance, Placement, PrefillInstance
from jds.planner.profile import Profile

SLOT_CHOICES = (8, 16, 32, 64, 128, 256)
CHUNK_CHOICES = (256, 512)


@dataclasses.dataclass(frozen=True)
class PrefillShape:
    tp: int

    @property
    def devices(self) -> int:
        return self.tp

    def __str__(self) -> str:
        return f"P tp{self.tp}"


@dataclasses.dataclass(frozen=True)
class DecodeShape:
    tp: int
    pp: int
    slots: int

    @property
    def devices(self) -> int:
        return self.tp * self.pp

    def __str__(self) -> str:
        return f"D tp{self.tp} pp{self.pp} x{self.slots} slots"


@dataclasses.dataclass(frozen=True)
class ColocatedShape:
    tp: int
    slots: int
    chunk: int | None = None

    @property
    def devices(self) -> int:
        return self.tp

    def __str__(self) -> str:
        chunk = f", chunks of {self.chunk}" if self.chunk else ""
        return f"C tp{self.tp} x{self.slots} slots{chunk}"


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A whole placement: disaggregated (prefill and decode set) or colocated."""

    prefill: PrefillShape | None = None
    decode: DecodeShape | None = None
    colocated: ColocatedShape | None = None
    n_prefill: int = 0
    n_decode: int = 0
    n_colocated: int = 0

    @property
    def disaggregated(self) -> bool:
        return self.colocated is None

    @property
    def slots(self) -> int:
        if self.disaggregated:
            return self.n_decode * self.decode.slots
        return self.n_colocated * self.colocated.slots

    @property
    def devices(self) -> int:
        if self.disaggregated:
            return self.n_prefill * self.prefill.devices + self.n_decode * self.decode.devices
        return self.n_colocated * self.colocated.devices

    def __str__(self) -> str:
        if self.disaggregated:
            return f"{self.n_prefill} x [{self.prefill}] + {self.n_decode} x [{self.decode}]"
        return f"{self.n_colocated} x [{self.colocated}]"

    def placement(self, node_size: int) -> Placement:
        """The config placement, instances laid out on consecutive devices, never across a node
        boundary unless the instance is larger than a node."""
        cursor = [0]

        def take(n: int) -> list[int]:
            start = cursor[0]
            if n <= node_size and start // node_size != (start + n - 1) // node_size:
                start = (start // node_size + 1) * node_size  # the instance would straddle two nodes
            cursor[0] = start + n
            return list(range(start, start + n))

        if not self.disaggregated:
            c = self.colocated
            instances = [ColocatedInstance(devices=take(c.tp), tp=c.tp, slots=c.slots, chunked_prefill=c.chunk) for _ in range(self.n_colocated)]
            return Placement(mode="colocated", instances=instances)
        p, d = self.prefill, self.decode
        prefill = [PrefillInstance(devices=take(p.tp), tp=p.tp) for _ in range(self.n_prefill)]
        decode = [DecodeInstance(devices=take(d.devices), tp=d.tp, pp=d.pp, slots=d.slots) for _ in range(self.n_decode)]
        return Placement(mode="disaggregated", prefill=prefill, decode=decode)


def max_slots(profile: Profile, tp: int, pp: int, weights_copies: int = 1) -> int:
    """Slots of full sequence length that fit beside the weights on tp x pp devices."""
    m = profile.model
    budget = profile.device_memory_bytes * profile.memory_fraction * tp * pp - weights_copies * m.weight_bytes
    return max(0, int(budget // (m.kv_bytes_per_token * m.max_seq_len)))


def prefill_shapes(profile: Profile, devices: int) -> list[PrefillShape]:
    return [PrefillShape(e.tp) for e in profile.prefill if e.tp <= devices and _weights_fit(profile, e.tp)]


def decode_shapes(profile: Profile, devices: int) -> list[DecodeShape]:
    out = []
    for e in profile.decode:
        if e.tp * e.pp > devices:
            continue
        room = max_slots(profile, e.tp, e.pp)
        out += [DecodeShape(e.tp, e.pp, s) for s in SLOT_CHOICES if s <= room]
    return out


def colocated_shapes(profile: Profile, devices: int) -> list[ColocatedShape]:
    tps = {e.tp for e in profile.prefill} & {e.tp for e in profile.decode if e.pp == 1}
    out = []
    for tp in sorted(t for t in tps if t <= devices):
        room = max_slots(profile, tp, 1)
        out += [ColocatedShape(tp, s) for s in SLOT_CHOICES if s <= room]
    return out


def _weights_fit(profile: Profile, tp: int) -> bool:
    return profile.model.weight_bytes <= profile.device_memory_bytes * profile.memory_fraction * tp
