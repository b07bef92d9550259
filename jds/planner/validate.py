"""Simulated against measured: the planner's predictions checked on real servers.

Each case is a config and the profile of its device kind. Its server is started as the benchmark
starts it, the workload is sent at each rate, and the very same requests (same seed, lengths and
arrival times) are simulated; the two attainments, and the latency percentiles behind them, go
side by side into one table.
"""

from __future__ import annotations

import dataclasses
import json
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


def run_case(case: Case, workload: Workload, slo: SLO, rates: list[float], num_requests: int, seed: int, out: Path) -> list[dict]:
    from jds.bench.loadgen import model_info, run_load
    from jds.bench.server_process import ServerProcess
    from jds.config import load_config

    config = load_config(case.config)
    profile = Profile.load(case.profile_path)
    rows = []
    server = ServerProcess(case.config.resolve(), out / f"server-{case.label}.log")
    try:
        info = model_info(server.address)
        for rate in rates:
            requests = plan(workload, rate, info.max_seq_len, seed, num_requests)
            measured = summarize(run_load(server.address, requests, info, seed, desc=f"{case.label} @ {rate:g} req/s"), slo)
            simulated = summarize(simulate(config.placement, profile, requests, info.max_seq_len, link_of(config)), slo)
            rows.append({"config": str(case.config), "profile": str(case.profile_path), "rate": rate, "measured": measured, "simulated": simulated})
    finally:
        server.stop()
    return rows


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1000 * x:.0f}"


def markdown(rows: list[dict], title: str, command: str) -> str:
    lines = [
        f"# {title}",
        "",
        f"`{command}`",
        "",
        "| config | rate (req/s) | measured attainment | simulated | difference (pp) | TTFT p50/p90 measured (ms) | simulated | TPOT p50/p90 measured (ms) | simulated |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m, s = r["measured"], r["simulated"]
        lines.append(
            f"| {Path(r['config']).stem} | {r['rate']:g} | {100 * m['attainment']:.1f}% | {100 * s['attainment']:.1f}% | "
            f"{100 * (s['attainment'] - m['attainment']):+.1f} | {_ms(m['ttft']['p50'])} / {_ms(m['ttft']['p90'])} | "
            f"{_ms(s['ttft']['p50'])} / {_ms(s['ttft']['p90'])} | {_ms(m['tpot']['p50'])} / {_ms(m['tpot']['p90'])} | "
            f"{_ms(s['tpot']['p50'])} / {_ms(s['tpot']['p90'])} |"
        )
    worst = max(abs(r["simulated"]["attainment"] - r["measured"]["attainment"]) for r in rows)
    lines += ["", f"Largest difference in attainment: {100 * worst:.1f} percentage points over {len(rows)} runs.", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for config in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == config]
        rates = [r["rate"] for r in mine]
        line = ax.plot(rates, [100 * r["measured"]["attainment"] for r in mine], "o-", label=f"{Path(config).stem} measured")[0]
        ax.plot(rates, [100 * r["simulated"]["attainment"] for r in mine], "s--", color=line.get_color(), label=f"{Path(config).stem} simulated")
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
    (out / "results.json").write_text(json.dumps({**meta, "runs": rows}, indent=1) + "\n")
    text = markdown(rows, title, command)
    (out / "results.md").write_text(text)
    plot(rows, out / "attainment_measured_vs_simulated.png")
    return text
