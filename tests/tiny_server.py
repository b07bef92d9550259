"""The small server the front-end tests run as a subprocess: a seeded random model (so the tests
can build the identical model offline and compare tokens), with few slots and waiting places so
that overload and cancellation are reachable within a few requests."""

from __future__ import annotations

import re
import time
import urllib.request

import yaml

from jds.api import generation_pb2 as pb
from tests_paths import CONFIGS

MAX_SEQ_LEN = 512  # the longest request (about 0.7 s) outlasts the deadlines and disconnects the tests give it
SLOTS = 4
MAX_WAITING = 8  # requests (choices) waiting for prefill at once; more are refused as busy


def write_config(path, max_waiting: int = MAX_WAITING, cpus: list[int] | None = None, **server) -> None:
    """The tiny server's config; ``server`` adds keys of the config's ``server`` section."""
    tiny = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    tiny["model"]["max_seq_len"] = MAX_SEQ_LEN
    tiny["placement"] = {"mode": "colocated", "instances": [{"devices": [0], "slots": SLOTS, "max_batch": 2}], "cpus": cpus}
    # compile afresh: no run sees another's programs
    tiny["server"] = {"max_waiting": max_waiting, "drain_seconds": 30, "compile_cache": None, **server}
    path.write_text(yaml.safe_dump(tiny))


def wait_idle(stub, timeout: float = 10) -> pb.ModelInfoResponse:
    """ModelInfo once no slot is in use and nothing runs (or at the timeout)."""
    end = time.monotonic() + timeout
    while True:
        info = stub.ModelInfo(pb.ModelInfoRequest())
        if (info.slots_in_use == 0 and info.running == 0) or time.monotonic() > end:
            return info
        time.sleep(0.02)


def aborted_requests(metrics_url: str, timeout: float = 0.0, at_least: float = 0.0, reason: str = "abort") -> float:
    """The server's count of requests that finished as aborted (or for ``reason``), waited for until it reaches ``at_least``."""
    end = time.monotonic() + timeout
    while True:
        body = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
        match = re.search(rf'^jds_requests_total\{{finish_reason="{reason}"\}} (\S+)$', body, re.MULTILINE)
        value = float(match.group(1)) if match else 0.0
        if value >= at_least or time.monotonic() > end:
            return value
        time.sleep(0.02)
