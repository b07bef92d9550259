"""``python -m jds.plan``: choose a placement from measurements instead of guesses.

profile   measure this machine's prefill, decode and KV handoff latencies; fit the latency models
calibrate measure how much slower the phases run in a real server of a config than alone
simulate  predict a config's SLO attainment and latencies under a workload, from a profile
search    rank disaggregated and colocated placements of N devices by goodput; write the winner
validate  run a benchmark and the simulator on the same requests, for each config, side by side
"""

from __future__ import annotations

import argparse
import logging
import platform
import shlex
import sys
from pathlib import Path

from jds.bench.options import add_workload_args, chosen_slo, config_at, fraction, positive, positive_list, seed, writable
from jds.bench.workloads import Workload, get_workload, load_trace, load_workloads, plan
from jds.config import DEFAULT_CONFIG
from jds.planner.profile import Profile


def _workload_args(parser: argparse.ArgumentParser, requests: int) -> None:
    add_workload_args(parser)
    parser.add_argument("--num-requests", type=positive(int), default=requests, help="requests per simulated (or measured) rate")
    parser.add_argument("--seed", type=seed, default=0)


def _profile_at(path: str, flag: str) -> Profile:
    """The profile at ``path``, a bad one refused naming ``flag``."""
    try:
        return Profile.load(path)
    except ValueError as exc:
        raise ValueError(f"{flag} {exc}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jds.plan", description=__doc__.splitlines()[0].replace("``", ""))
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("profile", help="measure this machine and fit the latency models")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="the model to profile (its model section; default: %(default)s)")
    p.add_argument("--out", default="profile.json", help="the profile to write (default: %(default)s)")
    p.add_argument("--cores-per-device", type=positive(int), default=1, help="on a CPU machine: cores that make one device")
    p.add_argument("--max-tokens", type=positive(int), default=2048, help="largest padded prefill batch (batch x length) to time")
    p.add_argument("--slots", type=positive_list(int), default="1,4,8,16", help="decode batch sizes to time")
    p.add_argument("--contexts", type=positive_list(int), default="16,32,64,128,256,512,1024", help="decode context lengths to time")
    p.add_argument("--repeats", type=positive(int), default=2)
    p.add_argument("--source", default=None, help="what to record as the profile's source")

    c = commands.add_parser("calibrate", help="measure a real server's overhead over the profile's programs")
    c.add_argument("--profile", required=True, help="updated in place (or written to --out)")
    c.add_argument("--config", required=True, help="the server to measure: a placement of the profile's device kind")
    c.add_argument("--out", default=None)
    c.add_argument("--workload", default="code", choices=list(load_workloads()), help="the load to calibrate with (default: %(default)s)")
    c.add_argument("--rate", type=positive(float), default=None, help="requests per second (default 0.6), best near the knee")
    c.add_argument("--num-requests", type=positive(int), default=None, help="default 48")
    c.add_argument("--seed", type=seed, default=None, help="default 1, unlike validate's, so that validation sees other requests")

    s = commands.add_parser("simulate", help="predict a config under a workload")
    s.add_argument("--profile", required=True)
    s.add_argument("--config", default=DEFAULT_CONFIG, help="the config to simulate (default: %(default)s)")
    s.add_argument("--rates", type=positive_list(float), default="1", help="requests per second, comma-separated")
    s.add_argument("--trace", default=None, help="replay JSONL {timestamp ms, input_length, output_length} instead of --rates")
    _workload_args(s, 200)

    q = commands.add_parser("search", help="rank placements of N devices by goodput and write the best")
    q.add_argument("--profile", required=True)
    q.add_argument("--devices", type=positive(int), required=True)
    q.add_argument("--node-size", type=positive(int), default=None, help="devices per node (default: the profile's)")
    q.add_argument("--attainment", type=fraction, default=0.9, help="SLO attainment target, in (0, 1]")
    q.add_argument("--config", default=DEFAULT_CONFIG, help="base config: the model and server sections of the written config (default: %(default)s)")
    q.add_argument("--out", default=None, help="write the winner here as a config")
    q.add_argument("--top", type=positive(int), default=15, help="rows of the ranked table")
    _workload_args(q, 200)

    v = commands.add_parser("validate", help="simulated vs measured attainment on the same requests")
    v.add_argument("--case", action="append", required=True, metavar="CONFIG=PROFILE", help="a config and the profile of its devices; repeatable")
    v.add_argument("--rates", type=positive_list(float), required=True)
    v.add_argument("--out", default="plan-validation", help="folder for results.json, results.md and the plot")
    v.add_argument("--repeats", type=positive(int), default=5, help="measured runs of every point, the cases taking turns")
    _workload_args(v, 40)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    try:
        return {"profile": _profile, "calibrate": _calibrate, "simulate": _simulate, "search": _search, "validate": _validate}[args.command](args)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 1


def _profile(args: argparse.Namespace) -> int:
    from jds.planner.latency import relative_errors
    from jds.planner.profiler import Grid, profile

    config_at(args.config, "--config")
    writable(args.out, "--out")
    grid = Grid(args.max_tokens, tuple(args.slots), tuple(args.contexts), args.repeats)
    source = args.source or f"measured on {platform.node()} with python -m jds.plan {shlex.join(sys.argv[1:])}"
    result = profile(args.config, args.cores_per_device, grid, source)
    result.save(args.out)
    print(f"wrote {args.out}: {len(result.prefill)} prefill and {len(result.decode)} decode shapes on {result.device}")
    for name, e, predict in [(f"prefill tp{e.tp}", e, e.model.batch_seconds) for e in result.prefill] + [
        (f"decode tp{e.tp} pp{e.pp}", e, e.model.seconds) for e in result.decode
    ]:  # fmt: skip
        errors = sorted(relative_errors(predict, e.points))
        print(f"  {name}: {e.model}; fit error on its {len(errors)} points: median {errors[len(errors) // 2]:.1%}, worst {errors[-1]:.1%}")
    for link, m in result.transfer.items():
        print(f"  transfer over {link}: {1e3 * m.latency:.3f} ms + {m.bandwidth / 1e9:.2f} GB/s")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    import tempfile

    from jds.planner.calibrate import calibrate

    profile = _profile_at(args.profile, "--profile")
    config_at(args.config, "--config")
    out = writable(args.out or args.profile, "--out" if args.out else "--profile")
    with tempfile.TemporaryDirectory() as logs:
        given = {k: v for k, v in (("rate", args.rate), ("num_requests", args.num_requests), ("seed", args.seed)) if v is not None}
        serving = calibrate(Path(args.config), profile, get_workload(args.workload), Path(logs), **given)
    profile.model_copy(update={"serving": serving}).save(out)
    print(f"in a server of {args.config}: prefill x{serving.prefill:.3f}, decode x{serving.decode:.3f} the profile's times")
    return 0


def _prefix_caveat(workload: Workload) -> str:
    """What a prediction for ``workload`` leaves out, where it matters: the simulator computes
    every prompt whole, while instances that cache prefixes compute only what they have not seen."""
    if workload.prefix is None:
        return ""
    return (
        f"\nnote: every prompt of this workload starts with the same {workload.prefix.system}-token system prompt, and each turn repeats "
        "its conversation so far; the simulator models no prefix cache, so its prefill times (and TTFT) are those of computing "
        "every prompt whole: an upper bound for instances with enable_prefix_caching on (the default)."
    )


def _simulate(args: argparse.Namespace) -> int:
    from jds.bench.metrics import summarize
    from jds.planner.simulator import simulate
    from jds.planner.validate import link_of

    config, profile, slo = config_at(args.config, "--config"), _profile_at(args.profile, "--profile"), chosen_slo(args)
    workload = get_workload(args.workload)
    max_seq_len = config.model.max_seq_len or profile.model.max_seq_len
    if args.trace:
        requests = load_trace(args.trace, max_seq_len)
        runs = {len(requests) / max(requests[-1].arrival, 1e-9): requests}
    else:
        runs = {rate: plan(workload, rate, max_seq_len, args.seed, args.num_requests) for rate in args.rates}
    print(f"{args.config} under {args.trace or args.workload}, SLO TTFT {slo.ttft} s / TPOT {slo.tpot} s{'' if args.trace else _prefix_caveat(workload)}")
    print("| rate | requests | attainment | TTFT p50 / p90 (ms) | TPOT p50 / p90 (ms) |\n|---|---|---|---|---|")
    for rate, requests in runs.items():
        m = summarize(simulate(config.placement, profile, requests, max_seq_len, link_of(config)), slo)
        print(
            f"| {rate:.3g} | {len(requests)} | {100 * m['attainment']:.1f}% | {1e3 * m['ttft']['p50']:.0f} / {1e3 * m['ttft']['p90']:.0f} | "
            f"{1e3 * (m['tpot']['p50'] or 0):.0f} / {1e3 * (m['tpot']['p90'] or 0):.0f} |"
        )
    return 0


def _search(args: argparse.Namespace) -> int:
    from jds.planner import report
    from jds.planner.search import Search

    profile, slo = _profile_at(args.profile, "--profile"), chosen_slo(args)
    config_at(args.config, "--config")  # the written config's base, read after the search
    if args.out:
        writable(args.out, "--out")
    search = Search(profile, get_workload(args.workload), slo, args.attainment, args.num_requests, args.seed, args.node_size)
    print(f"{args.devices} x {profile.device} ({search.node_size} per node), {profile.model.name}, workload {args.workload}, "
          f"SLO TTFT {slo.ttft} s / TPOT {slo.tpot} s at {100 * args.attainment:.0f}% attainment{_prefix_caveat(search.workload)}")  # fmt: skip
    scored = search.run(args.devices)
    print(report.table(scored, args.top))
    print("\nThe best prefill and decode shapes at each prefill:decode split:")
    print(report.ratio_table(scored))
    print(report.verdict(scored))
    if args.out and scored and scored[0].goodput > 0:
        why = f"Written by: python -m jds.plan {shlex.join(sys.argv[1:])}\n{report.verdict(scored)}\nPredicted goodput: {scored[0].goodput:.3g} req/s on {scored[0].candidate.devices} devices."
        report.write_config(scored[0], Path(args.config), search.node_size, Path(args.out), why)
        print(f"wrote {args.out}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from jds.planner import validate

    cases = []
    for text in args.case:  # every case read before the first server starts
        config, sep, profile = text.partition("=")
        if not sep:
            raise ValueError(f"--case: expected CONFIG=PROFILE, got {text!r}")
        config_at(config, f"--case {text}")
        _profile_at(profile, f"--case {text}:")
        cases.append(validate.Case(Path(config), Path(profile)))
    workload, slo, rates, out = get_workload(args.workload), chosen_slo(args), args.rates, writable(args.out, "--out", folder=True)
    out.mkdir(parents=True, exist_ok=True)
    rows = validate.measure(cases, workload, slo, rates, args.num_requests, args.seed, args.repeats, out)
    command = "python -m jds.plan " + shlex.join(sys.argv[1:])
    meta = {"command": command, "workload": args.workload, "slo": slo.model_dump(), "seed": args.seed, "repeats": args.repeats}
    title = f"Planner validation: {args.workload}, SLO TTFT {slo.ttft} s / TPOT {slo.tpot} s"
    print(validate.write(rows, out, title + _prefix_caveat(workload), command, meta))  # the caveat: a paragraph under the heading
    return 0


if __name__ == "__main__":
    sys.exit(main())
