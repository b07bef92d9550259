"""results.md: each run's TTFT and time per output token as guidellm and jds.bench report them.

jds.bench's TPOT is a request's time from its first to its last token over the tokens after the
first: what guidellm calls inter-token latency (ITL). guidellm's own TPOT divides the whole
request latency, first token included, by all output tokens; it is listed too."""

import json
import sys
from pathlib import Path


def guidellm_row(path: Path) -> dict:
    metrics = json.loads(path.read_text())["benchmarks"][0]["metrics"]

    def pct(name: str, p: str) -> float:
        return metrics[name]["successful"]["percentiles"][p]

    return {
        "requests": metrics["request_totals"]["successful"],
        "failed": metrics["request_totals"]["errored"],
        "ttft": (pct("time_to_first_token_ms", "p50"), pct("time_to_first_token_ms", "p90")),
        "tpot": (pct("inter_token_latency_ms", "p50"), pct("inter_token_latency_ms", "p90")),
        "guidellm_tpot": (pct("time_per_output_token_ms", "p50"), pct("time_per_output_token_ms", "p90")),
    }


def bench_row(path: Path) -> dict:
    (rate,) = json.loads(path.read_text())["sweeps"][0]["rates"].values()
    s = rate["summary"]
    return {
        "requests": s["requests"] - s["failed"],
        "failed": s["failed"],
        "ttft": (1000 * s["ttft"]["p50"], 1000 * s["ttft"]["p90"]),
        "tpot": (1000 * s["tpot"]["p50"], 1000 * s["tpot"]["p90"]),
        "guidellm_tpot": None,
    }


def main(folder: str) -> None:
    out = Path(folder)
    rows = []
    for run in range(1, len(list(out.glob("guidellm-*.json"))) + 1):
        rows.append((f"guidellm, round {run}", guidellm_row(out / f"guidellm-{run}.json")))
        rows.append((f"jds.bench, round {run}", bench_row(out / f"bench-{run}" / "results.json")))
    lines = [
        "| tool | requests ok / failed | TTFT p50 / p90 (ms) | TPOT (first to last token) p50 / p90 (ms) | guidellm's TPOT p50 / p90 (ms) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        own = "-" if r["guidellm_tpot"] is None else "%.1f / %.1f" % r["guidellm_tpot"]
        lines.append(f"| {name} | {r['requests']} / {r['failed']} | %.0f / %.0f | %.1f / %.1f | {own} |" % (*r["ttft"], *r["tpot"]))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1])
