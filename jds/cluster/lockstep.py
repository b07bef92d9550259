"""One prefill instance over several processes (``jax.distributed``): the leader and its followers
run every program in lockstep.

JAX runs a multi-process program only when every process calls it, in the same order, with the
same inputs. The leader (process 0) serves the router and batches requests; before each call of
the prefill program it broadcasts the batch's host inputs (``multihost_utils.broadcast_one_to_all``
over the instance's own devices), and each follower makes the identical call. The KV comes out
replicated, so the leader offers its own copy; followers drop theirs.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
from jax.experimental import multihost_utils

from jds.engine.programs import PrefillProgram, empty_rows
from jds.model.sampling import SamplingRows

log = logging.getLogger(__name__)

RUN, STOP = 1, 0


def initialize(coordinator: str, processes: int, process: int) -> None:
    """Join the instance's processes; CPU collectives between processes go through gloo."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=processes, process_id=process)
    log.info("process %d of %d joined (coordinator %s): %d devices, %d local", process, processes, coordinator, jax.device_count(), jax.local_device_count())


def _header(op: int, batch: int, bucket: int) -> np.ndarray:
    return multihost_utils.broadcast_one_to_all(np.array([op, batch, bucket], np.int32))


def lead(inputs: tuple[np.ndarray, np.ndarray, SamplingRows]) -> None:
    """Leader: tell the followers which call comes next (``PrefillProgram.broadcast``)."""
    tokens = inputs[0]
    _header(RUN, *tokens.shape)
    multihost_utils.broadcast_one_to_all(inputs)


def stop_followers() -> None:
    _header(STOP, 0, 0)


def follow(program: PrefillProgram) -> None:
    """Follower: make every call the leader makes, until it says stop."""
    while True:
        op, batch, bucket = (int(v) for v in _header(STOP, 0, 0))
        if op == STOP:
            return
        shapes = (np.zeros((batch, bucket), np.int32), np.zeros(batch, np.int32), empty_rows(batch))
        tokens, lengths, rows = multihost_utils.broadcast_one_to_all(shapes)
        jax.block_until_ready(program.call(np.asarray(tokens), np.asarray(lengths), jax.tree.map(np.asarray, rows)))
