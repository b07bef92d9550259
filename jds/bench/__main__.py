"""``python -m jds.bench serve|compare ...``: goodput and SLO attainment of jds servers.

serve    run a workload against a running server at one or more rates
compare  start a server per config, run the identical workload on each, report side by side
micro    the model's programs against the machine's measured limits and installed peers
layers   the forms the layer loop can take, side by side on this machine
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from jds.bench import report
from jds.bench.loadgen import model_info, run_load
from jds.bench.metrics import attainment, search_goodput
from jds.bench.workloads import SLO, get_workload, load_trace, plan
from jds.client import Credentials, add_arguments

log = logging.getLogger("jds.bench")
APIS = ("grpc", "openai")
MICRO_PARTS = ("startup", "int8", "sampling", "engine")  # what micro --skip may leave out


def _slo(text: str | None, default: SLO, scale: float) -> SLO:
    return (SLO.parse(text) if text else default).scaled(scale)


def _workload_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", default="chatbot", help="chatbot, code, summarization or shared-prefix (see jds/bench/workloads.yaml)")
    parser.add_argument("--rates", default="1", help="requests per second, comma-separated")
    parser.add_argument("--search", default=None, metavar="LOW:HIGH", help="bisect for the goodput between two rates instead")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--num-requests", type=int, default=None, help="requests per rate (default 50)")
    group.add_argument("--duration", type=float, default=None, help="seconds of arrivals per rate")
    parser.add_argument("--burstiness", type=float, default=1.0, help="1 is Poisson; larger is burstier (gamma arrivals)")
    parser.add_argument("--trace", default=None, help="replay JSONL {timestamp ms, input_length, output_length} once, instead of --rates")
    parser.add_argument("--slo", default=None, help="ttft=SECONDS,tpot=SECONDS (default: the workload's)")
    parser.add_argument("--slo-scale", type=float, default=1.0, help="multiply both SLOs (tighter < 1 < looser)")
    parser.add_argument("--attainment", type=float, default=0.9, help="attainment target for goodput")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench-results", help="folder for results.json, results.md and plots")


def sweep(address: str, args: argparse.Namespace, label: str, api: str = "grpc", credentials: Credentials = Credentials()) -> report.Sweep:
    """Run the workload against one server at every rate (or bisect for its goodput)."""
    info = model_info(address, api, credentials=credentials)
    workload = get_workload(args.workload)
    slo = _slo(args.slo, workload.slo, args.slo_scale)
    result = report.Sweep(label, slo, max(1, info.devices), args.attainment, {})

    def measure(rate: float, requests: list | None = None) -> float:
        if requests is None:
            num = None if args.duration else (args.num_requests or 50)
            requests = plan(workload, rate, info.max_seq_len, args.seed, num, args.duration, args.burstiness)
        records = run_load(address, requests, info, args.seed, api, desc=f"{label} @ {rate:g} req/s", credentials=credentials)
        result.records[rate] = records
        value = attainment(records, slo)
        log.info("%s @ %g req/s: attainment %.0f%% over %d requests", label, rate, 100 * value, len(records))
        return value

    if args.trace:  # the trace's own timestamps set the rate: replayed once, labelled with its mean rate
        requests = load_trace(args.trace, info.max_seq_len)
        span = requests[-1].arrival
        measure(len(requests) / span if span > 0 else float(len(requests)), requests)
    elif args.search:
        low, high = (float(x) for x in args.search.split(":"))
        search_goodput(measure, low, high, args.attainment)
    else:
        for rate in (float(r) for r in args.rates.split(",")):
            measure(rate)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jds.bench", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="benchmark a running server")
    serve.add_argument("--server", default="127.0.0.1:50051", help="gRPC address, or with --api openai the HTTP address (host:port or URL)")
    serve.add_argument("--label", default=None, help="name in tables and plots (default: the server address)")
    serve.add_argument("--api", choices=APIS, default="grpc", help="send through gRPC or the OpenAI-compatible HTTP API")
    add_arguments(serve)
    _workload_args(serve)
    compare = commands.add_parser("compare", help="start and benchmark a server per config, side by side")
    compare.add_argument("configs", nargs="+", help="deployment YAMLs, e.g. a colocated and a disaggregated placement")
    compare.add_argument("--api", default="grpc", help="grpc, openai, or grpc,openai to measure both front ends of each server")
    _workload_args(compare)
    micro = commands.add_parser("micro", help="decode, prefill and handoff against the machine's limits")
    micro.add_argument("--config", default=None, help="deployment YAML (default: configs/smollm2-135m.yaml)")
    micro.add_argument("--batches", default="1,8,32")
    micro.add_argument("--contexts", default="32,256,2048", help="decode cache positions (32: about what the peers read, from a 16-token prompt)")
    micro.add_argument("--prompts", default="128,512", help="prefill prompt lengths")
    micro.add_argument("--no-peer", action="store_true", help="skip the peers (transformers, llama.cpp) even if installed")
    micro.add_argument("--skip", default="", help=f"comma-separated parts not to measure, of: {', '.join(MICRO_PARTS)}")
    micro.add_argument("--out", default="bench-results")
    layers = commands.add_parser("layers", help="the layer loop's forms side by side: decode and prefill time, compile")
    layers.add_argument("--config", default=None, help="deployment YAML (default: configs/smollm2-135m.yaml)")
    layers.add_argument("--forms", default=None, help="comma-separated names from jds.bench.layer_loops.FORMS (default: all)")
    layers.add_argument("--batches", default="1,8")
    layers.add_argument("--context", type=int, default=2048, help="decode cache positions")
    layers.add_argument("--prompt", type=int, default=2048, help="prefill prompt tokens")
    layers.add_argument("--out", default="bench-results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the report
    out = Path(args.out)
    if args.command == "micro":
        return _micro(args, out)
    if args.command == "layers":
        return _layers(args, out)
    try:
        if args.command == "serve":
            sweeps = [sweep(args.server, args, args.label or args.server, args.api, Credentials.from_args(args))]
        else:
            sweeps = _compare(args, out)
    except (ValueError, OSError, RuntimeError) as exc:
        log.error("%s", exc)
        return 1
    title = f"jds benchmark: {args.workload if not args.trace else args.trace}"
    md = report.write(sweeps, out, title, {"command": sys.argv, "workload": args.workload, "api": args.api, "seed": args.seed, "trace": args.trace})
    print(md.read_text())
    return 0


def _compare(args: argparse.Namespace, out: Path) -> list[report.Sweep]:
    from jds.bench.server_process import ServerProcess

    apis = args.api.split(",")
    unknown = sorted(set(apis) - set(APIS))
    if unknown:
        raise ValueError(f"--api: unknown {unknown}; choose from {', '.join(APIS)}")
    sweeps = []
    out.mkdir(parents=True, exist_ok=True)
    for config in args.configs:
        name = Path(config).stem
        log.info("starting a server for %s", config)
        extra = ("--http-port", "0") if "openai" in apis else ()
        server = ServerProcess(Path(config).resolve(), out / f"server-{name}.log", *extra)
        try:
            for api in apis:
                label = name if len(apis) == 1 else f"{name} ({api})"
                sweeps.append(sweep(server.openai_url if api == "openai" else server.address, args, label, api))
        finally:
            code = server.stop()
            if code != 0:
                log.warning("server for %s exited with %s", config, code)
    return sweeps


def _micro(args: argparse.Namespace, out: Path) -> int:
    import os

    # Two devices (prefill on one, the handoff to the other) and no more: XLA splits its CPU
    # threads among devices, so a process with more would time single-device programs slower.
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    from jds.bench import micro
    from jds.config import DEFAULT_CONFIG, load_config
    from jds.model.loader import load_model, model_architecture

    config = load_config(args.config)
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    batches, contexts, prompts = ints(args.batches), ints(args.contexts), ints(args.prompts)
    checkpoint = config.model.checkpoint
    gguf = str(config.resolve_path(checkpoint)) if checkpoint and checkpoint.endswith(".gguf") else None
    skip = set(filter(None, args.skip.split(",")))
    if skip - set(MICRO_PARTS):
        raise SystemExit(f"--skip: unknown {sorted(skip - set(MICRO_PARTS))}; choose from {', '.join(MICRO_PARTS)}")
    # The peers and the servers run in processes of their own before this one touches a device,
    # so that on an accelerator each has the device's memory to itself.
    done: dict = {"partial": True}

    def keep(**parts) -> None:  # micro.json after each part, so that a run stopped midway keeps what it measured
        done.update(parts)
        _write(out, "micro", done, "(partial: see micro.json)\n", echo=False)

    log.info("measuring the installed peers")
    peer_model = micro.PeerModel(model_architecture(config), config.model.dtype, gguf)
    keep(peers=micro.measure_peers(peer_model, batches, prompts, wanted=not args.no_peer))
    if "startup" not in skip:
        log.info("measuring the server's start-up")
        keep(startup=micro.attempt(lambda: micro.server_startup(Path(args.config) if args.config else DEFAULT_CONFIG)))
    model = load_model(config)
    int8 = config.model_copy(update={"model": config.model.model_copy(update={"quantization": "int8"})})
    int8_model = None if "int8" in skip else load_model(int8, progress=False)
    log.info("measuring jds")
    result = micro.run(model, int8_model, batches, contexts, prompts, done["peers"], sampling="sampling" not in skip)
    del int8_model  # the engine below loads its own copy of the model
    keep(**result)
    if "engine" not in skip:
        log.info("measuring the engine's decode")
        keep(engine=micro.attempt(lambda: micro.engine_decode(config, model)))
    result = {k: v for k, v in done.items() if k != "partial"}
    return _write(out, "micro", result, micro.markdown(result))


def _layers(args: argparse.Namespace, out: Path) -> int:
    from jds.bench import layer_loops
    from jds.config import DEFAULT_CONFIG

    forms = list(layer_loops.FORMS) if args.forms is None else args.forms.split(",")
    unknown = [f for f in forms if f not in layer_loops.FORMS]
    if unknown:
        raise SystemExit(f"--forms: unknown {unknown}; choose from {list(layer_loops.FORMS)}")
    config = Path(args.config) if args.config else DEFAULT_CONFIG
    batches = [int(b) for b in args.batches.split(",")]

    def keep(so_far: dict) -> None:  # after each form, so that a run stopped midway keeps what it measured
        _write(out, "layers", so_far, layer_loops.markdown(so_far), echo=False)

    result = layer_loops.run(config, {f: layer_loops.FORMS[f] for f in forms}, batches, args.context, args.prompt, keep)
    return _write(out, "layers", result, layer_loops.markdown(result))


def _write(out: Path, name: str, result: dict, text: str, echo: bool = True) -> int:
    """``name``.json (with the command line) and ``name``.md into ``out``; with ``echo`` the markdown printed too."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"command": sys.argv, **result}, indent=1) + "\n")
    (out / f"{name}.md").write_text(text)
    if echo:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
