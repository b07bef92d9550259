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

import grpc
import httpx

from jds.bench import report
from jds.bench.loadgen import model_info, run_load
from jds.bench.metrics import attainment, search_goodput
from jds.bench.options import add_workload_args, chosen_slo, config_at, fraction, names, positive, positive_list, rate_range, seed, writable
from jds.bench.workloads import get_workload, load_trace, plan
from jds.client import Credentials, add_arguments

log = logging.getLogger("jds.bench")
APIS = ("grpc", "openai")
MICRO_PARTS = ("startup", "int8", "sampling", "engine")  # what micro --skip may leave out


def _workload_args(parser: argparse.ArgumentParser) -> None:
    add_workload_args(parser)
    parser.add_argument("--rates", type=positive_list(float), default="1", help="requests per second, comma-separated")
    parser.add_argument("--search", type=rate_range, default=None, metavar="LOW:HIGH", help="bisect for the goodput between two rates instead")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--num-requests", type=positive(int), default=50, help="requests per rate (default 50)")
    group.add_argument("--duration", type=positive(float), default=None, help="seconds of arrivals per rate")
    parser.add_argument("--burstiness", type=positive(float), default=1.0, help="1 is Poisson; larger is burstier (gamma arrivals)")
    parser.add_argument("--trace", default=None, help="replay JSONL {timestamp ms, input_length, output_length} once, instead of --rates")
    parser.add_argument("--attainment", type=fraction, default=0.9, help="attainment target for goodput, in (0, 1]")
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--out", default="bench-results", help="folder for results.json, results.md and plots")
    add_arguments(parser)


def _check(args: argparse.Namespace) -> None:
    """What argparse cannot check alone, before any server is started or reached: the trace and the
    output folder, so that a mistake there does not cost a whole run."""
    writable(args.out, "--out", folder=True)
    if args.trace:
        try:
            load_trace(args.trace)
        except (OSError, ValueError) as exc:
            raise ValueError(f"--trace: {exc}") from None


def _unusable(address: str, exc: Exception) -> str:
    """One line for a server the benchmark cannot use: out of reach, or refusing the key it was sent."""
    if isinstance(exc, grpc.RpcError):
        code, why = exc.code().name, f"{exc.code().name}: {exc.details()}"
    elif isinstance(exc, httpx.HTTPStatusError):
        code, why = exc.response.status_code, f"HTTP {exc.response.status_code} {exc.response.reason_phrase}"
    else:
        code, why = None, f"{type(exc).__name__}: {exc}"
    if code in ("UNAUTHENTICATED", 401):
        return f"{address} refused the benchmark's key ({why}): give one it accepts with --api-key"
    return f"cannot reach {address} ({why})"


def sweep(address: str, args: argparse.Namespace, label: str, api: str = "grpc", credentials: Credentials = Credentials()) -> report.Sweep:
    """Run the workload against one server at every rate (or bisect for its goodput)."""
    try:
        info = model_info(address, api, credentials=credentials)
    except (grpc.RpcError, httpx.HTTPError, httpx.InvalidURL) as exc:  # later failures are the requests' own records
        raise ConnectionError(_unusable(address, exc)) from None
    workload = get_workload(args.workload)
    slo = chosen_slo(args)
    result = report.Sweep(label, slo, max(1, info.devices), args.attainment, {})

    def measure(rate: float, requests: list | None = None) -> float:
        if requests is None:
            num = None if args.duration else args.num_requests
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
        search_goodput(measure, *args.search, args.attainment)
    else:
        for rate in args.rates:
            measure(rate)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jds.bench", description=__doc__.splitlines()[0].replace("``", ""))
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="benchmark a running server")
    serve.add_argument("--server", default="127.0.0.1:50051", help="gRPC address, or with --api openai the HTTP address (host:port or URL)")
    serve.add_argument("--label", default=None, help="name in tables and plots (default: the server address)")
    serve.add_argument("--api", choices=APIS, default="grpc", help="send through gRPC or the OpenAI-compatible HTTP API")
    _workload_args(serve)
    compare = commands.add_parser("compare", help="start and benchmark a server per config, side by side")
    compare.add_argument("configs", nargs="+", help="deployment YAMLs, e.g. a colocated and a disaggregated placement")
    compare.add_argument("--api", type=names(APIS), default="grpc", help="grpc, openai, or grpc,openai to measure both front ends of each server")
    _workload_args(compare)
    micro = commands.add_parser("micro", help="decode, prefill and handoff against the machine's limits")
    micro.add_argument("--config", default=None, help="deployment YAML (default: configs/smollm2-135m.yaml)")
    micro.add_argument("--batches", type=positive_list(int), default="1,8,32")
    micro.add_argument("--contexts", type=positive_list(int), default="32,256,2048", help="decode cache positions (32: about what the peers read, from a 16-token prompt)")
    micro.add_argument("--prompts", type=positive_list(int), default="128,512", help="prefill prompt lengths")
    micro.add_argument("--no-peer", action="store_true", help="skip the peers (transformers, llama.cpp) even if installed")
    micro.add_argument("--skip", type=names(MICRO_PARTS), default=[], help=f"comma-separated parts not to measure, of: {', '.join(MICRO_PARTS)}")
    micro.add_argument("--out", default="bench-results")
    layers = commands.add_parser("layers", help="the layer loop's forms side by side: decode and prefill time, compile")
    layers.add_argument("--config", default=None, help="deployment YAML (default: configs/smollm2-135m.yaml)")
    layers.add_argument("--forms", default=None, help="comma-separated names from jds.bench.layer_loops.FORMS (default: all)")
    layers.add_argument("--batches", type=positive_list(int), default="1,8")
    layers.add_argument("--context", type=positive(int), default=2048, help="decode cache positions")
    layers.add_argument("--prompt", type=positive(int), default=2048, help="prefill prompt tokens")
    layers.add_argument("--out", default="bench-results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the report
    try:
        return {"serve": _serve, "compare": _compare, "micro": _micro, "layers": _layers}[args.command](args)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _serve(args: argparse.Namespace) -> int:
    _check(args)
    return _report(args, [sweep(args.server, args, args.label or args.server, args.api, Credentials.from_args(args))])


def _compare(args: argparse.Namespace) -> int:
    from jds.bench.server_process import ServerProcess
    from jds.config import load_config

    _check(args)
    out = Path(args.out)
    credentials = {}
    for config in args.configs:  # every config read before the first server starts
        server = load_config(config).server
        if server.tls is not None and not args.tls_ca:
            raise ValueError(f"{config} serves over TLS (server.tls): give --tls-ca, the CA that signed its certificate")
        # The key of --api-key (or $JDS_API_KEY, which the server accepts too), else the config's own first key
        key = args.api_key or next(iter(server.api_keys), None)
        credentials[config] = Credentials(key, args.tls_ca if server.tls is not None else None)
    sweeps = []
    out.mkdir(parents=True, exist_ok=True)
    for config in args.configs:
        name = Path(config).stem
        log.info("starting a server for %s", config)
        extra = ("--http-port", "0") if "openai" in args.api else ()
        server = ServerProcess(Path(config).resolve(), out / f"server-{name}.log", *extra)
        try:
            for api in args.api:
                label = name if len(args.api) == 1 else f"{name} ({api})"
                sweeps.append(sweep(server.openai_url if api == "openai" else server.address, args, label, api, credentials[config]))
        finally:
            code = server.stop()
            if code != 0:
                log.warning("server for %s exited with %s", config, code)
    return _report(args, sweeps)


def _report(args: argparse.Namespace, sweeps: list[report.Sweep]) -> int:
    """results.json, results.md and the plots of ``serve`` or ``compare``; the markdown printed."""
    title = f"jds benchmark: {args.workload if not args.trace else args.trace}"
    meta = {"command": sys.argv, "workload": args.workload, "api": args.api, "seed": args.seed, "trace": args.trace}
    print(report.write(sweeps, Path(args.out), title, meta).read_text())
    return 0


def _micro(args: argparse.Namespace) -> int:
    import os

    config = config_at(args.config, "--config")
    out = writable(args.out, "--out", folder=True)
    # Two devices (prefill on one, the handoff to the other) and no more: XLA splits its CPU
    # threads among devices, so a process with more would time single-device programs slower.
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    from jds.bench import micro
    from jds.config import DEFAULT_CONFIG
    from jds.model.loader import load_model, model_architecture

    batches, contexts, prompts, skip = args.batches, args.contexts, args.prompts, set(args.skip)
    checkpoint = config.model.checkpoint
    gguf = str(config.resolve_path(checkpoint)) if checkpoint and checkpoint.endswith(".gguf") else None
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


def _layers(args: argparse.Namespace) -> int:
    from jds.config import DEFAULT_CONFIG

    config_at(args.config, "--config")  # each form's process reads it again, so a bad one would fail every form alike
    out = writable(args.out, "--out", folder=True)
    from jds.bench import layer_loops

    forms = list(layer_loops.FORMS) if args.forms is None else args.forms.split(",")
    unknown = [f for f in forms if f not in layer_loops.FORMS]
    if unknown:
        raise ValueError(f"--forms: unknown {unknown}; choose from {list(layer_loops.FORMS)}")

    def keep(so_far: dict) -> None:  # after each form, so that a run stopped midway keeps what it measured
        _write(out, "layers", so_far, layer_loops.markdown(so_far), echo=False)

    config = Path(args.config) if args.config else DEFAULT_CONFIG
    result = layer_loops.run(config, {f: layer_loops.FORMS[f] for f in forms}, args.batches, args.context, args.prompt, keep)
    _write(out, "layers", result, layer_loops.markdown(result))
    if all("error" in form for form in result["forms"]):
        raise RuntimeError(f"no form could be measured: see {out / 'layers.md'}")
    return 0


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
