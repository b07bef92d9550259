"""Compiled programs kept on disk, so a restarted server loads what it compiled before.

Warm-up compiles every program shape before a server reports SERVING: 74 programs and about 40 s
for the default config on 2 CPU cores, most of its start-up. JAX's persistent compilation cache
files each executable under a key made of its program, the compiler options and the jax, jaxlib
and backend versions, so a restart of the same deployment reads them back (about 4 s)
and anything that changed (model, placement, buckets, jax) misses and compiles as before. Keep the
directory on the machine that compiled it: an executable is built for the CPU it was compiled on.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax

log = logging.getLogger(__name__)


def use_compile_cache(directory: str | None) -> None:
    """Read and write compiled programs under ``directory`` (None: compile everything afresh).

    Call it before the process compiles anything: JAX fixes its cache at the first compile.
    """
    if directory is None:
        return
    path = Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only home only costs start-up time
        log.warning("not keeping compiled programs: %s", exc)
        return
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Every program, however quick to compile: most take under a second, and 74 of them add up.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    log.info("compiled programs are kept in %s", path)
