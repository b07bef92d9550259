"""Both engines the front ends can be given implement ``ServingEngine`` whole, with its signatures."""

from __future__ import annotations

import inspect

import pytest

from jds.cluster.router import Router
from jds.engine.engine import Engine
from jds.engine.interface import ServingEngine

METHODS = {name: member for name, member in vars(ServingEngine).items() if not name.startswith("_")}


def test_the_interface_lists_what_the_front_ends_use():
    assert {"submit", "abort", "validate", "num_waiting", "num_running", "slot_usage", "drain", "shutdown"} <= set(METHODS)
    assert {"model", "placement", "max_seq_len"} <= set(ServingEngine.__annotations__)


@pytest.mark.parametrize("cls", [Engine, Router])
def test_each_engine_implements_every_member_with_its_signature(cls):
    for name, member in METHODS.items():
        have = getattr(cls, name, None)
        assert have is not None, f"{cls.__name__} lacks {name}"
        if isinstance(member, property):
            assert isinstance(have, property), f"{cls.__name__}.{name} is not a property"
        else:
            assert list(inspect.signature(have).parameters) == list(inspect.signature(member).parameters), name
    init = inspect.getsource(cls.__init__)
    for attribute in ServingEngine.__annotations__:
        assert f"self.{attribute} =" in init, f"{cls.__name__} does not set {attribute}"
