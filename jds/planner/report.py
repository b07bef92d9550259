"""What a search hands back: the ranked table, the verdict, and the winner as a config file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml

from jds.planner.search import Scored


def _ms(summary: dict | None, key: str, pct: str) -> str:
    value = summary and summary[key][pct]
    return "-" if value is None else f"{1000 * value:.0f}"


def table(scored: Sequence[Scored], top: int | None = None) -> str:
    lines = [
        "| rank | placement | devices | goodput (req/s) | per device | TTFT p50 / p90 (ms) | TPOT p50 / p90 (ms) | search |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, s in enumerate(scored[:top], 1):
        m = s.summary
        lines.append(
            f"| {i} | {s.candidate} | {s.candidate.devices} | {s.goodput:.3g} | {s.per_device:.3g} | "
            f"{_ms(m, 'ttft', 'p50')} / {_ms(m, 'ttft', 'p90')} | {_ms(m, 'tpot', 'p50')} / {_ms(m, 'tpot', 'p90')} | {s.note} |"
        )
    return "\n".join(lines)


def ratio_table(scored: Sequence[Scored]) -> str:
    """Goodput at each prefill:decode split of the best per-phase shapes (the high-affinity search)."""
    rows = sorted((s for s in scored if s.note == "high affinity"), key=lambda s: s.candidate.n_prefill)
    lines = ["| prefill : decode instances | placement | devices | goodput (req/s) | per device |", "|---|---|---|---|---|"]
    lines += [f"| {s.candidate.n_prefill} : {s.candidate.n_decode} | {s.candidate} | {s.candidate.devices} | {s.goodput:.3g} | {s.per_device:.3g} |" for s in rows]
    return "\n".join(lines)


def verdict(scored: Sequence[Scored]) -> str:
    """One sentence: which kind of placement wins, and by how much over the best of the other kind."""
    if not scored or scored[0].goodput == 0:
        return "No placement meets the SLOs at any rate: loosen the SLOs, or add devices."
    best = scored[0]
    other = next((s for s in scored if s.candidate.disaggregated != best.candidate.disaggregated), None)
    kind = "Disaggregated" if best.candidate.disaggregated else "Colocated"
    if other is None or other.goodput == 0:
        return f"{kind} serving wins: no placement of the other kind meets the SLOs at any rate."
    ratio = best.per_device / other.per_device
    if best.candidate.disaggregated:
        return f"Disaggregation wins: {ratio:.2f}x the goodput per device of the best colocated placement ({other.candidate})."
    return f"Colocated serving wins: do not disaggregate here. It has {ratio:.2f}x the goodput per device of the best disaggregated placement ({other.candidate})."


def write_config(best: Scored, base_config: Path, node_size: int, path: Path, why: str) -> None:
    """The winner as a ready-to-run config: the base config's model (and server) sections, the new placement."""
    base = yaml.safe_load(base_config.read_text()) or {}
    placement = best.candidate.placement(node_size).model_dump(mode="json", exclude_defaults=True)
    placement["mode"] = "disaggregated" if best.candidate.disaggregated else "colocated"
    body = {"model": base.get("model", {}), "placement": placement}
    if "server" in base:
        body["server"] = base["server"]
    header = "".join(f"# {line}\n" for line in why.splitlines())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(body, sort_keys=False, default_flow_style=None))
