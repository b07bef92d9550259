"""Command-line values shared by ``python -m jds.bench`` and ``python -m jds.plan``.

A benchmark, a profile or a search runs for minutes, so every value it is given is checked before
it starts: argparse types that refuse a bad value with the flag's name (exit 2, as argparse does),
and checks of the files a run reads and the paths it writes, which name the flag too.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from jds.bench.workloads import SLO, get_workload, load_workloads
from jds.config import Config, load_config

Number = TypeVar("Number", int, float)


def positive(cast: Callable[[str], Number]) -> Callable[[str], Number]:
    """An argparse type: a finite number above zero (NaN and infinity would run, and report NaN)."""
    what = "a whole number >= 1" if cast is int else "a finite number > 0"

    def parse(text: str) -> Number:
        try:
            value = cast(text)
            if math.isfinite(value) and value > 0:
                return value
        except ValueError:
            pass
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")

    return parse


def seed(text: str) -> int:
    """An argparse type: a workload's seed, a whole number >= 0 (NumPy's generators take no other)."""
    try:
        value = int(text)
        if value >= 0:
            return value
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")


def positive_list(cast: Callable[[str], Number]) -> Callable[[str], list[Number]]:
    """An argparse type: comma-separated ``positive`` numbers."""
    one = positive(cast)

    def parse(text: str) -> list[Number]:
        return [one(part) for part in text.split(",")]

    return parse


def fraction(text: str) -> float:
    """An argparse type: a share in (0, 1], such as an attainment target."""
    value = positive(float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def rate_range(text: str) -> tuple[float, float]:
    """An argparse type: ``LOW:HIGH``, two rates to bisect between."""
    low, sep, high = text.partition(":")
    try:
        rates = positive(float)(low), positive(float)(high)
        if sep and rates[0] < rates[1]:
            return rates
    except argparse.ArgumentTypeError:
        pass
    raise argparse.ArgumentTypeError(f"expected LOW:HIGH, two rates with 0 < LOW < HIGH, got {text!r}")


def names(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: one or more comma-separated names out of ``choices``."""

    def parse(text: str) -> list[str]:
        given = text.split(",")
        unknown = [name for name in given if name not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(choices)}")
        return given

    return parse


def slo(text: str) -> SLO:
    """An argparse type: ``ttft=SECONDS,tpot=SECONDS``."""
    try:
        return SLO.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """``--workload``, ``--slo`` and ``--slo-scale``: the load and what it must meet (``chosen_slo``)."""
    parser.add_argument("--workload", default="chatbot", choices=list(load_workloads()), help="a workload of jds/bench/workloads.yaml")
    parser.add_argument("--slo", type=slo, default=None, help="ttft=SECONDS,tpot=SECONDS (default: the workload's)")
    parser.add_argument("--slo-scale", type=positive(float), default=1.0, help="multiply both SLOs (tighter < 1 < looser)")


def chosen_slo(args: argparse.Namespace) -> SLO:
    """The SLO of ``add_workload_args``' flags: ``--slo`` or the workload's, times ``--slo-scale``."""
    return (args.slo or get_workload(args.workload).slo).scaled(args.slo_scale)


def writable(path: str | os.PathLike, flag: str, folder: bool = False) -> Path:
    """``path`` if a run can write it (as a ``folder`` of files, or a file), else a ValueError
    naming ``flag``: missing folders on the way count, since the writers create them."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: a file is there, not a folder")
    if not folder and path.is_dir():
        raise ValueError(f"{flag} {path}: a folder is there, not a file")
    nearest = path if folder else path.parent
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir():
        raise ValueError(f"{flag} {path}: {nearest} is a file, not a folder")
    try:  # a file made and dropped there: permissions alone say nothing of a read-only file system, or to root
        with tempfile.TemporaryFile(dir=nearest):
            pass
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot write in {nearest} ({exc.strerror})") from None
    if path.is_file() and not os.access(path, os.W_OK):
        raise ValueError(f"{flag} {path}: not writable")
    return path


def config_at(path: str | os.PathLike | None, flag: str) -> Config:
    """The deployment config at ``path`` (None: the default one), a bad one refused naming ``flag``."""
    try:
        return load_config(path)
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None
