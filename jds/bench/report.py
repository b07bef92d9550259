"""Benchmark output: JSON with every record, a Markdown table, and PNG plots.

All functions take one or more labelled sweeps, so a single run and a side-by-side comparison of
placements are written by the same code (the comparison's plots overlay the sweeps).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jds.bench.metrics import RequestRecord, attainment, goodput, summarize  # noqa: E402
from jds.bench.workloads import SLO  # noqa: E402

SLO_SCALES = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)


@dataclasses.dataclass
class Sweep:
    """One placement (or server) run at several rates under one workload."""

    label: str
    slo: SLO
    devices: int
    target: float
    records: dict[float, list[RequestRecord]]  # rate -> records

    def attainments(self, scale: float = 1.0) -> dict[float, float]:
        slo = self.slo.scaled(scale)
        return {rate: attainment(records, slo) for rate, records in self.records.items()}

    @property
    def goodput(self) -> float:
        return goodput(self.attainments(), self.target)

    @classmethod
    def from_json(cls, data: dict) -> Sweep:
        """A sweep back from ``results.json``, e.g. to redraw its plots."""
        records = {float(rate): [RequestRecord(**r) for r in run["records"]] for rate, run in data["rates"].items()}
        return cls(data["label"], SLO(**data["slo"]), data["devices"], data["attainment_target"], records)

    def to_json(self) -> dict:
        return {
            "label": self.label,
            "slo": self.slo.model_dump(),
            "devices": self.devices,
            "attainment_target": self.target,
            "goodput_rps": self.goodput,
            "goodput_rps_per_device": self.goodput / self.devices,
            "attainment_vs_slo_scale": {str(s): {str(r): a for r, a in self.attainments(s).items()} for s in SLO_SCALES},
            "rates": {
                str(rate): {"summary": summarize(records, self.slo), "records": [dataclasses.asdict(r) for r in records]}
                for rate, records in sorted(self.records.items())
            },
        }


def _ms(value: float | None) -> str:
    """Milliseconds: whole ones, but a sub-10 ms figure (a KV transfer) keeps two decimals."""
    if value is None:
        return "-"
    return f"{value * 1e3:.2f}" if value < 0.01 else f"{value * 1e3:.0f}"


def markdown(sweeps: list[Sweep], title: str) -> str:
    lines = [f"# {title}", ""]
    for sweep in sweeps:
        slo = ", ".join(f"{k} {v:g} s" for k, v in sweep.slo.model_dump().items() if v is not None)
        lines.append(
            f"**{sweep.label}**: goodput {sweep.goodput:.3g} req/s ({sweep.goodput / sweep.devices:.3g} per device, "
            f"{sweep.devices} devices) at {sweep.target:.0%} attainment of {slo}"
        )
    lines += [
        "",
        "| placement | rate (req/s) | attainment | TTFT p50 / p90 (ms) | TPOT p50 / p90 (ms) | transfer p50 (ms) | throughput (req/s) | tokens/s "
        "| peak decoding | prompt cached | failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for sweep in sweeps:
        for rate, records in sorted(sweep.records.items()):
            s = summarize(records, sweep.slo)
            lines.append(
                f"| {sweep.label} | {rate:g} | {s['attainment']:.0%} | {_ms(s['ttft']['p50'])} / {_ms(s['ttft']['p90'])} | "
                f"{_ms(s['tpot']['p50'])} / {_ms(s['tpot']['p90'])} | {_ms(s['server_transfer']['p50'])} | "
                f"{s['throughput_rps']:.3g} | {s['output_tokens_per_s']:.3g} | {s['peak_decoding']} | {s['cached_prompt_share']:.0%} | "
                f"{s['failed']} |"
            )
    if len(sweeps) == 2:
        a, b = sweeps
        if b.goodput > 0:
            ratio = f"{a.goodput / b.goodput:.2f}x (per device {a.goodput / a.devices / (b.goodput / b.devices):.2f}x)"
        else:
            ratio = f"undefined: {b.label} reached {b.target:.0%} attainment at none of the rates"
        lines += ["", f"Goodput ratio {a.label} / {b.label}: {ratio}"]
    return "\n".join(lines) + "\n"


def _cdf(ax, values: list[float], label: str) -> None:
    if values:
        v = np.sort(values)
        ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=label)


def plots(sweeps: list[Sweep], out: Path) -> list[Path]:
    files = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for sweep in sweeps:
        att = sorted(sweep.attainments().items())
        ax.plot([r for r, _ in att], [a for _, a in att], marker="o", label=sweep.label)
    ax.axhline(sweeps[0].target, color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel="rate (requests/s)", ylabel="SLO attainment", ylim=(0, 1.05), title="Attainment vs rate")
    ax.legend()
    files.append(_save(fig, out / "attainment_vs_rate.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for sweep in sweeps:
        for rate in sorted(sweep.records):
            ax.plot(SLO_SCALES, [sweep.attainments(s)[rate] for s in SLO_SCALES], marker="o", label=f"{sweep.label} @ {rate:g} req/s")
    ax.axhline(sweeps[0].target, color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel="SLO scale (x the SLOs of the run)", ylabel="SLO attainment", ylim=(0, 1.05), title="Attainment vs SLO scale")
    ax.legend(fontsize="small")
    files.append(_save(fig, out / "attainment_vs_slo_scale.png"))

    for metric in ("ttft", "tpot"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for sweep in sweeps:
            for rate, records in sorted(sweep.records.items()):
                _cdf(ax, [v for r in records if (v := getattr(r, metric)) is not None], f"{sweep.label} @ {rate:g}")
        limit = getattr(sweeps[0].slo, metric)
        if limit:
            ax.axvline(limit, color="grey", linestyle="--", linewidth=1)
        ax.set(xlabel=f"{metric.upper()} (s)", ylabel="fraction of requests", title=f"{metric.upper()} CDF")
        ax.legend(fontsize="small")
        files.append(_save(fig, out / f"{metric}_cdf.png"))
    return files


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(sweeps: list[Sweep], out: Path, title: str, meta: dict) -> Path:
    """results.json, results.md and the plots into ``out``; returns the Markdown file."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({**meta, "sweeps": [s.to_json() for s in sweeps]}, indent=1) + "\n")
    plots(sweeps, out)
    md = out / "results.md"
    md.write_text(markdown(sweeps, title))
    return md
