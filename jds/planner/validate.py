"""Simulated against measured: the planner's predictions checked on real servers.

Each case is a config and the profile of its device kind. The workload is sent to its server at
each rate, and the very same requests (same seed, lengths and arrival times) are simulated. A
shared machine moves measured attainment by tens of points between identical runs, so every
point is measured ``repeats`` times, the cases taking turns (each round starts every case's
server afresh, in alternating order), and the table gives the median and range of the measured
attainment beside the simulated one, and whether the simulation falls inside that range.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

from jds.bench.metrics import summarize
from jds.bench.workloads import SLO, Workload, plan
from jds.planner.profile import Profile
from jds.planner.simulator import simulate


@dataclasses.dataclass(frozen=True)
class Case:
    config: Path
    profile_path: Path

    @property
    def label(self) -> str:
        return self.config.stem


def link_of(config) -> str:
    """How the config's KV moves: between processes when its roles run as processes."""
    return "process" if config.cluster.prefill or config.cluster.decode else "device"


def measure(cases: list[Case], workload: Workload, slo: SLO, rates: list[float], num_requests: int, seed: int, repeats: int, out: Path) -> list[dict]:
    """One row per case, rate and repeat: the measured summary (and, on the first repeat, the simulated one)."""
    from jds.bench.loadgen import model_info, run_load
    from jds.bench.server_process import ServerProcess
    from jds.config import load_config

    rows = []
    for repeat in range(repeats):
        for case in cases if repeat % 2 == 0 else cases[::-1]:
            config, profile = load_config(case.config), Profile.load(case.profile_path)
            server = ServerProcess(case.config.resolve(), out / f"server-{case.label}-{repeat}.log")
            try:
                info = model_info(server.address)
                for rate in rates:
                    requests = plan(workload, rate, info.max_seq_len, seed, num_requests)
                    desc = f"{case.label} @ {rate:g} req/s, run {repeat + 1}/{repeats}"
                    row = {"config": str(case.config), "profile": str(case.profile_path), "rate": rate, "repeat": repeat}
                    row["measured"] = summarize(run_load(server.address, requests, info, seed, desc=desc), slo)
                    if repeat == 0:
                        row["simulated"] = summarize(simulate(config.placement, profile, requests, info.max_seq_len, link_of(config)), slo)
                    rows.append(row)
            finally:
                server.stop()
    return rows


def points(rows: list[dict]) -> list[dict]:
    """Per case and rate: the measured attainments of every repeat (their median and range), the
    simulated attainment, and whether it lies inside the measured range."""
    grouped: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        grouped.setdefault((r["config"], r["rate"]), []).append(r)
    out = []
    for (config, rate), runs in grouped.items():
        measured = sorted(r["measured"]["attainment"] for r in runs)
        simulated = next(r["simulated"] for r in runs if "simulated" in r)
        p50 = lambda key: statistics.median(r["measured"][key]["p50"] for r in runs)  # noqa: E731
        out.append({
            "config": config, "rate": rate, "runs": len(runs), "measured": measured, "median": statistics.median(measured),
            "simulated": simulated["attainment"], "inside": measured[0] <= simulated["attainment"] <= measured[-1],
            "ttft_p50": p50("ttft"), "tpot_p50": p50("tpot"), "sim_ttft_p50": simulated["ttft"]["p50"], "sim_tpot_p50": simulated["tpot"]["p50"],
        })  # fmt: skip
    return out


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1000 * x:.0f}"


def markdown(rows: list[dict], title: str, command: str) -> str:
    table = points(rows)
    lines = [
        f"# {title}",
        "",
        f"`{command}`",
        "",
        "| config | rate (req/s) | measured attainment: median (range) | runs | simulated | inside the range? | TTFT p50 measured / simulated (ms) | TPOT p50 measured / simulated (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in table:
        lo, hi = p["measured"][0], p["measured"][-1]
        lines.append(
            f"| {Path(p['config']).stem} | {p['rate']:g} | {100 * p['median']:.1f}% ({100 * lo:.1f}-{100 * hi:.1f}%) | {p['runs']} | "
            f"{100 * p['simulated']:.1f}% | {'yes' if p['inside'] else 'no'} | {_ms(p['ttft_p50'])} / {_ms(p['sim_ttft_p50'])} | "
            f"{_ms(p['tpot_p50'])} / {_ms(p['sim_tpot_p50'])} |"
        )
    inside = sum(p["inside"] for p in table)
    worst = max(abs(p["simulated"] - p["median"]) for p in table)
    lines += [
        "",
        f"The simulation falls inside the measured range at {inside} of {len(table)} points; its largest distance from a "
        f"measured median is {100 * worst:.1f} percentage points. Measured figures are medians over the runs.",
        "",
    ]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = points(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for config in dict.fromkeys(p["config"] for p in table):
        mine = [p for p in table if p["config"] == config]
        rates = [p["rate"] for p in mine]
        median = [100 * p["median"] for p in mine]
        spread = [[m - 100 * p["measured"][0] for m, p in zip(median, mine)], [100 * p["measured"][-1] - m for m, p in zip(median, mine)]]
        bars = ax.errorbar(rates, median, yerr=spread, fmt="o-", capsize=3, label=f"{Path(config).stem} measured (median, range)")
        ax.plot(rates, [100 * p["simulated"] for p in mine], "s--", color=bars.lines[0].get_color(), label=f"{Path(config).stem} simulated")
    ax.set_xlabel("rate (requests/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(-5, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(rows: list[dict], out: Path, title: str, command: str, meta: dict) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({**meta, "points": points(rows), "runs": rows}, indent=1) + "\n")
    text = markdown(rows, title, command)
    (out / "results.md").write_text(text)
    plot(rows, out / "attainment_measured_vs_simulated.png")
    return text
