"""One instance over several processes (``jax.distributed``): the leader and its followers run
every program in lockstep.

JAX runs a multi-process program only when every process calls it, in the same order, with the
same inputs. The leader (process 0) serves the router; before each program call it broadcasts
what the call needs (its host inputs, pickled, over the instance's own devices with
``multihost_utils.broadcast_one_to_all``), and each follower makes the identical call. Outputs
come out replicated, so the leader reads (or offers) its own copy and followers drop theirs.
Messages are padded to power-of-two sizes, so the broadcasts compile a bounded number of times.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

STOP = "stop"


def initialize(coordinator: str, processes: int, process: int) -> None:
    """Join the instance's processes; CPU collectives between processes go through gloo."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=processes, process_id=process)
    log.info("process %d of %d joined (coordinator %s): %d devices, %d local", process, processes, coordinator, jax.device_count(), jax.local_device_count())


def _broadcast_bytes(data: bytes | None) -> bytes:
    size = multihost_utils.broadcast_one_to_all(np.array([0 if data is None else len(data)], np.int32))
    n = int(size[0])
    padded = np.zeros(1 << max(n - 1, 0).bit_length(), np.uint8)
    if data is not None:
        padded[:n] = np.frombuffer(data, np.uint8)
    return multihost_utils.broadcast_one_to_all(padded)[:n].tobytes()


def lead(op: str, *args) -> None:
    """Leader: tell the followers the next call (``op`` with host-side ``args``)."""
    _broadcast_bytes(pickle.dumps((op, args)))


def follow(handlers: dict[str, Callable]) -> None:
    """Follower: make every call the leader announces, until it announces ``STOP``."""
    while True:
        op, args = pickle.loads(_broadcast_bytes(None))
        if op == STOP:
            return
        jax.block_until_ready(handlers[op](*args))
