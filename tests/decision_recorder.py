"""Records the decisions ``jds.scheduling.policy`` makes in a process: every prefill call's
lengths, every routing choice (with the rooms it chose among) and every decode round's shape.

``install`` wraps the policy's functions in place (the engine, the roles and the simulator all
call them through the module, so every caller is seen); in a role process it is installed at
start-up by ``decision_site/sitecustomize.py`` when ``JDS_DECISIONS_DIR`` is set, and each
decision is appended to a JSON-lines file named after the process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from jds.scheduling import policy

Record = Callable[[str, object], None]  # (kind, decision)


def wrappers(record: Record) -> dict[tuple[object, str], Callable]:
    """(owner, name) -> the recording stand-in for the policy function of that name."""
    take, most_room, round_shape = policy.PrefillBatches.take, policy.most_room, policy.round_shape

    def recorded_take(batches, lengths, limit):
        lengths = list(lengths)
        n = take(batches, iter(lengths), limit)
        if n:
            record("prefill", lengths[:n])
        return n

    def recorded_room(rooms):
        chosen = most_room(rooms)
        record("route", [list(rooms), chosen])
        return chosen

    def recorded_round(rows, contexts, highest, longest):
        shape = round_shape(rows, contexts, highest, longest)
        record("round", [list(rows), list(contexts), list(shape)])
        return shape

    return {(policy.PrefillBatches, "take"): recorded_take, (policy, "most_room"): recorded_room, (policy, "round_shape"): recorded_round}


def install(record: Record, set_attribute: Callable[[object, str, object], None] = setattr) -> None:
    for (owner, name), stand_in in wrappers(record).items():
        set_attribute(owner, name, stand_in)


def install_to_file(folder: str) -> None:
    path = Path(folder) / f"{os.getpid()}.jsonl"

    def record(kind: str, decision: object) -> None:
        with path.open("a") as f:
            f.write(json.dumps([kind, decision]) + "\n")

    install(record)


def read_folder(folder: Path) -> list[list]:
    """Every process's decisions, each file in its own order."""
    return [[json.loads(line) for line in p.read_text().splitlines()] for p in sorted(folder.glob("*.jsonl"))]
