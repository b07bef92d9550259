"""KV between processes with ``jax.experimental.transfer``: offered by prefill, pulled by decode.

Each process runs one transfer server. The prefill side offers a request's KV pages (the groups
``jds.transfer.handoff`` cuts them into, K and V of each) under a fresh id
(``await_pull``) with a lease: when it ends, the transfer server drops the KV if nobody pulled it
(measured: memory stays flat over many unpulled offers with a lease, and grows by each offer
without one), so a request aborted between the phases, or a decode process that died, strands
memory for at most the lease. An offer no decode process was ever told about is released at once
by pulling it locally. The decode side pulls by id onto one of its devices, naming the exact shapes
and dtype offered, then reshards locally into its stages (``handoff.place``).

Pulling an id that expired or was never offered does not fail: the array never fills. So a pull
is refused outright when the lease is about to end, and waited for with a timeout otherwise; a
pull that times out fails its request (``PullFailed``) instead of hanging it.

The arrays are single-device on both ends: the prefill side gathers a request's pages onto one
device before offering them. That keeps the two sides' layouts trivially equal whatever their ``tp``
(the library needs matching shard shapes); the local reshard on the decode side is a
device-to-device copy.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import logging
import secrets
import threading
import time

import jax
import numpy as np
from jax.experimental import transfer

log = logging.getLogger(__name__)

PULL_MARGIN_SECONDS = 1.0  # no pull starts this close to the end of a lease


@dataclasses.dataclass(frozen=True)
class Offer:
    """What a decode process needs to pull one request's KV."""

    address: str
    uuid: int
    shapes: tuple[tuple[int, ...], ...]  # of each array offered, in order
    dtype: str
    expires_at: float  # unix time


class PullFailed(RuntimeError):
    """The KV could not be pulled: its lease ended, or its prefill process is gone."""


class KVTransfer:
    """This process's transfer server: offers (prefill side) and pulls (decode side)."""

    def __init__(self, host: str = "127.0.0.1", lease_seconds: float = 30.0):
        client = jax.devices()[0].client
        self._server = transfer.start_transfer_server(client, f"{host}:0", [f"{host}:0"] * jax.local_device_count())
        self.address: str = self._server.address()
        self.lease_seconds = lease_seconds
        self._connections: dict[str, object] = {}
        self._lock = threading.Lock()
        # Ids are unique across processes too: a random prefix per process, then a counter.
        self._ids = itertools.count((secrets.randbits(31) << 32) + 1)
        self._offers: dict[int, tuple[list[jax.ShapeDtypeStruct], float]] = {}  # id -> (what, lease end)

    # -- prefill side ---------------------------------------------------------------------------

    def offer(self, arrays: list[jax.Array]) -> Offer:
        """Make ``arrays`` (one dtype) pullable once, until the lease ends; the transfer server
        holds the references."""
        uuid = next(self._ids)
        expires_at = time.time() + self.lease_seconds
        self._server.await_pull(uuid, arrays, timeout=datetime.datetime.fromtimestamp(expires_at))
        with self._lock:
            self._prune()
            self._offers[uuid] = ([jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding) for a in arrays], expires_at)
        return Offer(self.address, uuid, tuple(tuple(a.shape) for a in arrays), str(arrays[0].dtype), expires_at)

    def release(self, uuid: int) -> bool:
        """Free an offer nobody was told about, now rather than at its lease: pull it here and drop it."""
        with self._lock:
            self._prune()
            specs, expires_at = self._offers.pop(uuid, (None, 0.0))
        if specs is None or time.time() > expires_at - PULL_MARGIN_SECONDS:
            return False
        _arrival(self._connection(self.address).pull(uuid, specs))  # lands in the background, then is dropped with the thread
        return True

    @property
    def outstanding(self) -> int:
        """Offers neither released nor past their lease (pulled ones count until their lease ends)."""
        with self._lock:
            self._prune()
            return len(self._offers)

    def _prune(self) -> None:
        now = time.time()
        for uuid in [u for u, (_, end) in self._offers.items() if end <= now]:
            del self._offers[uuid]

    # -- decode side ----------------------------------------------------------------------------

    def pull(self, offer: Offer, device: jax.Device, timeout: float) -> list[jax.Array]:
        """The offered arrays, on ``device``; ``PullFailed`` (never a hang) if they cannot arrive."""
        left = offer.expires_at - time.time()
        if left < PULL_MARGIN_SECONDS:
            raise PullFailed(f"KV {offer.uuid} from {offer.address}: its lease ended (or ends in {max(left, 0):.1f} s) before the pull")
        where = jax.sharding.SingleDeviceSharding(device)
        specs = [jax.ShapeDtypeStruct(shape, np.dtype(offer.dtype), sharding=where) for shape in offer.shapes]
        try:
            kv = self._connection(offer.address).pull(offer.uuid, specs)
        except Exception as exc:  # the library's own errors: the peer closed, refused, ...
            raise PullFailed(f"KV {offer.uuid} from {offer.address}: {exc}") from exc
        landed = _arrival(kv)
        if not landed.done.wait(min(timeout, left)):
            raise PullFailed(f"KV {offer.uuid} from {offer.address} did not arrive within {min(timeout, left):.1f} s")
        if landed.error is not None:
            raise PullFailed(f"KV {offer.uuid} from {offer.address}: {landed.error}") from landed.error
        return kv

    def _connection(self, address: str):
        with self._lock:
            if address not in self._connections:
                self._connections[address] = self._server.connect(address)
            return self._connections[address]


class _Arrival:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: Exception | None = None


def _arrival(arrays: list[jax.Array]) -> _Arrival:
    """Wait for ``arrays`` to land on a daemon thread: a pull that never lands must not keep the
    process from exiting (a pool's worker threads would be joined at exit, forever)."""
    arrival = _Arrival()

    def wait() -> None:
        try:
            jax.block_until_ready(arrays)
        except Exception as exc:
            arrival.error = exc
        finally:
            arrival.done.set()

    threading.Thread(target=wait, name="kv-arrival", daemon=True).start()
    return arrival
