"""The package's floors: each module imports only from its own floor or those below, with no
loop, counting imports inside functions too; and the bottom floor (config schema, fit check,
scheduling policy) and the planner's simulator run without JAX."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "jds"
FLOORS = [
    ["jds.sampling_params", "jds.config", "jds.scheduling", "jds.model.architecture"],  # plain data and rules
    ["jds.model", "jds.mesh", "jds.transfer"],  # model math, sharding, moving KV
    ["jds.engine", "jds.intake", "jds.api"],  # one process serving requests
    ["jds.cluster", "jds.serving", "jds.llm"],  # processes and front ends
    ["jds.bench", "jds.planner", "jds.server", "jds.plan", "jds.launch", "jds.client", "jds.generate", "jds.convert", "jds"],
]


def _floor(module: str) -> int:
    """The floor of the longest prefix that names ``module``."""
    matches = [(len(p), k) for k, prefixes in enumerate(FLOORS) for p in prefixes if module == p or module.startswith(p + ".")]
    return max(matches)[1]


def _imports() -> dict[str, set[str]]:
    """Every jds module and the jds modules it imports anywhere in its body."""
    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_no_module_imports_from_a_floor_above_its_own():
    upward = [(m, t) for m, targets in _imports().items() for t in targets if _floor(t) > _floor(m)]
    assert upward == []


def test_the_imports_have_no_loop_even_inside_functions():
    graph, done, path = _imports(), set(), []

    def visit(m: str) -> None:
        if m in path:
            pytest.fail("import loop: " + " -> ".join(path[path.index(m) :] + [m]))
        if m in done:
            return
        path.append(m)
        for t in sorted(graph[m]):
            visit(t)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


def test_the_config_floor_the_policy_and_the_simulator_run_without_jax():
    code = (
        "import sys, jds.config, jds.config.fit, jds.config.placement, jds.config.stages, jds.scheduling.policy, jds.planner.simulator\n"
        "print(sorted(m for m in ('jax', 'jaxlib', 'flax') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PACKAGE.parent)
    assert out.stdout.strip() == "[]"
