"""``python -m jds.server [--config CONFIG] [--role ROLE] [--port P] [--http-port H]``: serve jds.v1 over gRPC (and OpenAI's API over HTTP).

Roles: ``all`` (the default) runs the whole placement in this process. ``router`` serves the same
client API but runs no model: it drives the prefill and decode instances listed in the config's
``cluster:`` section, each its own process (``--role prefill --instance I``, ``--role decode
--instance I``). ``python -m jds.launch`` starts them all.

Start-up: read the config, check the placement against the model's shapes and the devices' memory
before reading any weight (a placement that cannot fit is refused with both figures), load the
weights, build the engine, compile every program shape (progress bar), then report SERVING on the
standard health service and log "ready". Once serving, SIGTERM or SIGINT drains: new requests get
UNAVAILABLE, requests in flight may finish for ``server.drain_seconds``, then the process exits 0.
Before that they end the start-up (SIGINT exits 130 with one line; SIGTERM as the signal's own).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import ssl
import sys
import threading
from concurrent import futures

from jds.config import Config, ConfigError, api_key_problem, load_config
from jds.config.fit import claim_device_memory

log = logging.getLogger("jds.server")

SERVICE = "jds.v1.Generation"


def _instance(config: Config, role: str, index: int):
    """The placement instance a prefill or decode process serves, and its address."""
    specs, addresses = (config.placement.prefill, config.cluster.prefill) if role == "prefill" else (config.placement.decode, config.cluster.decode)
    if config.placement.mode != "disaggregated":
        raise ConfigError(f"--role {role}: placement.mode must be disaggregated")
    if not 0 <= index < len(specs):
        raise ConfigError(f"--instance {index}: placement.{role} has {len(specs)} instances")
    if len(addresses) != len(specs):
        raise ConfigError(f"cluster.{role}: give one host:port per placement.{role} instance ({len(specs)}), got {len(addresses)}")
    return specs[index], addresses[index]


def _join_instance(config: Config, name: str, processes: int, process: int) -> None:
    """Join the other processes of a multi-process instance (before JAX touches a device)."""
    coordinator = config.cluster.coordinators.get(name)
    if coordinator is None:
        raise ConfigError(f"cluster.coordinators.{name}: a host:port is needed for an instance over {processes} processes")
    from jds.cluster import lockstep

    lockstep.initialize(coordinator, processes, process)


MAX_VIRTUAL_DEVICES = 1024  # far beyond any accelerator host; XLA would spend minutes making more


def port(text: str) -> int:
    """An argparse type: a TCP port (0 lets the system pick one)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (0-65535; 0 picks a free one)")
    return value


def api_key(text: str) -> str:
    """An argparse type: a usable API key."""
    problem = api_key_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def _give_cpu_devices(needed: int, key: str) -> None:
    """Make sure a CPU-only JAX has ``needed`` virtual devices.

    Must run before JAX is imported; on accelerators the flag is ignored.
    """
    if needed > MAX_VIRTUAL_DEVICES:
        raise ConfigError(f"{key}: device {needed - 1} is beyond any machine's (at most {MAX_VIRTUAL_DEVICES} devices)")
    flags = os.environ.get("XLA_FLAGS", "")
    if needed > 1 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={needed}".strip()


def _pin_cpus(cpus: list[int] | None, key: str) -> None:
    """Pin this process to ``cpus`` (the placement's, or its instance's), so placements compared on
    a CPU machine use exactly the cores they name."""
    if cpus is None:
        return
    available = os.sched_getaffinity(0)
    missing = sorted(set(cpus) - available)
    if missing:
        raise ConfigError(f"{key}: cores {missing} are not available to this process (it may use {sorted(available)})")
    os.sched_setaffinity(0, cpus)
    log.info("pinned to CPU cores %s", cpus)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jds.server", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--config", default=None, help="deployment YAML (default: configs/smollm2-135m.yaml)")
    parser.add_argument("--role", choices=("all", "router", "prefill", "decode"), default="all", help="what this process serves (default all)")
    parser.add_argument("--instance", type=int, default=0, help="with --role prefill or decode: which instance of the placement")
    parser.add_argument("--process", type=int, default=0, help="with --role prefill or decode: which process of a multi-process instance (0 serves)")
    parser.add_argument("--host", default=None, help="address to listen on (default: server.host, 127.0.0.1)")
    parser.add_argument("--port", type=port, default=None, help="gRPC port (default: server.port, 50051; 0 picks one)")
    parser.add_argument("--http-port", type=port, default=None, help="also serve the OpenAI-compatible API over HTTP here (default: server.http_port, off; 0 picks one)")
    parser.add_argument("--metrics-port", type=port, default=None, help="Prometheus port (default: server.metrics_port)")
    parser.add_argument("--no-warmup", action="store_true", help="skip compiling ahead (first requests compile)")
    parser.add_argument("--compile-cache", default=None, help="directory of compiled programs kept across restarts (default: server.compile_cache); 'none' compiles afresh")
    parser.add_argument("--log-requests", action="store_true", help="one log line per finished request, with its timings")
    parser.add_argument("--api-key", type=api_key, action="append", default=[], help="a key clients must send (repeatable; also server.api_keys, $JDS_API_KEY)")
    args = parser.parse_args(argv)
    claim_device_memory()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    if args.log_requests:
        logging.getLogger("jds.requests").setLevel(logging.DEBUG)
    try:
        config = load_config(args.config)
        if args.role in ("prefill", "decode"):
            spec, address = _instance(config, args.role, args.instance)
            if not 0 <= args.process < spec.processes:
                raise ConfigError(f"--process {args.process}: placement.{args.role}[{args.instance}] spans {spec.processes} process(es)")
            _pin_cpus(spec.process_share(spec.cpus, args.process), f"placement.{args.role}[{args.instance}].cpus")
            _give_cpu_devices(len(spec.process_share(spec.devices, args.process)), f"placement.{args.role}[{args.instance}].devices")
            if spec.processes > 1:
                _join_instance(config, f"{args.role}{args.instance}", spec.processes, args.process)
            _use_compile_cache(config, args)
            return _serve_instance(config, args, address)
        if args.role == "router" and (config.placement.mode != "disaggregated" or not config.cluster.prefill or not config.cluster.decode):
            raise ConfigError("--role router: needs placement.mode disaggregated and the instances' addresses in cluster.prefill and cluster.decode")
        if args.role == "all":
            _pin_cpus(config.placement.cpus, "placement.cpus")
            _give_cpu_devices(max(config.placement.devices) + 1, "placement devices")
        _check_listening(config, args)
        _use_compile_cache(config, args)
        return _serve(config, args)
    except (ConfigError, OSError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before serving: nothing to drain
        log.error("interrupted while starting")
        return 130


def _check_listening(config: Config, args: argparse.Namespace) -> None:
    """Before any weight is read: every port this server will listen on is free and distinct, and
    the TLS certificate and key load and belong together, so a second ``make serve`` or a swapped
    key is a one-line error now rather than a traceback after minutes of loading and compiling."""
    settings = config.server
    host = args.host or settings.host
    taken: dict[int, str] = {}
    for source, number in _listen_ports(config, args).values():
        if not number:  # off, or any free port
            continue
        name = f"{source} {number}"
        if number in taken:
            raise ConfigError(f"{name}: is also {taken[number]}; each listener needs its own port")
        taken[number] = name
        try:
            with socket.create_server((host, number), family=socket.AF_INET6 if ":" in host else socket.AF_INET):
                pass
        except OSError as exc:
            reason = (exc.strerror or str(exc)).split(" (while attempting", 1)[0]
            raise ConfigError(f"{name}: cannot listen on {host}:{number} ({reason})") from None
    if settings.tls is not None:
        cert, key = config.resolve_path(settings.tls.cert), config.resolve_path(settings.tls.key)
        for field, path in (("server.tls.cert", cert), ("server.tls.key", key)):
            if not path.is_file():
                raise ConfigError(f"{field}: {path} is not a file")
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
        except ssl.SSLError as exc:
            raise ConfigError(f"server.tls: the key {key} does not load with the certificate {cert} ({exc.reason or exc})") from None


def _listen_ports(config: Config, args: argparse.Namespace) -> dict[str, tuple[str, int | None]]:
    """Each listener's port (None: off) as its flag, else the config, gives it, with where it came
    from for messages."""
    ports = {}
    for name in ("port", "http_port", "metrics_port"):
        flag = getattr(args, name)
        ports[name] = (f"--{name.replace('_', '-')}", flag) if flag is not None else (f"server.{name}", getattr(config.server, name))
    return ports


def _use_compile_cache(config: Config, args: argparse.Namespace) -> None:
    """Before anything compiles: keep compiled programs where the flag or the config says."""
    from jds.engine.compile_cache import use_compile_cache

    directory = config.server.compile_cache if args.compile_cache is None else args.compile_cache
    use_compile_cache(None if directory == "none" else directory)


def _serve(config: Config, args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    from jds.api import generation_pb2
    from jds.engine.engine import Engine
    from jds.model.loader import check_config, load_model
    from jds.serving.access import ApiKeys, GrpcKeyCheck, browser_access, grpc_credentials, http_key_check, serve_metrics
    from jds.serving.metrics import Metrics
    from jds.serving.servicer import GenerationServicer, register

    settings = config.server
    host = args.host or settings.host
    port, http_port, metrics_port = (number for _, number in _listen_ports(config, args).values())

    if args.role == "router":
        from jds.cluster.router import Router

        engine = Router(load_model(config, weights=False), config.placement, config.cluster, settings.max_waiting)
        if not engine.registry.wait_ready(config.cluster.instance_wait_seconds):
            down = [i.name for i in engine.registry.instances if not i.healthy]
            log.warning("instances not answering yet: %s (requests wait for them)", ", ".join(down))
        slots = sum(spec.slots for spec in engine.placement.decode)
    else:
        check_config(config)
        engine = Engine(
            load_model(config),
            config.placement,
            warmup=settings.warmup and not args.no_warmup,
            progress=True,
            max_waiting=settings.max_waiting,
        )
        slots = engine.slot_usage()[1]
    metrics = Metrics(engine)
    keys = ApiKeys.gather(
        settings.api_keys, args.api_key, guard_health=settings.keys_guard_health, on_refusal=metrics.rejected.labels("UNAUTHENTICATED").inc
    )
    tls = None if settings.tls is None else (str(config.resolve_path(settings.tls.cert)), str(config.resolve_path(settings.tls.key)))
    accepting = threading.Event()  # both front ends refuse new requests once it is cleared
    accepting.set()
    servicer = GenerationServicer(engine, metrics, accepting)
    # One thread per open stream: everything running plus everything allowed to wait, and a few for ModelInfo and health.
    workers = slots + settings.max_waiting + 8
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        interceptors=[GrpcKeyCheck(keys)] if keys.enabled else [],
        options=[("grpc.max_receive_message_length", settings.max_request_bytes)],
        maximum_concurrent_rpcs=workers,
    )
    register(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    address = f"{host}:{port}"
    bound = _bind(server, address, None if tls is None else grpc_credentials(*tls))
    scheme = "http" if tls is None else "https"
    if metrics_port is not None:
        metrics_server = serve_metrics(metrics.registry, host, metrics_port, keys, tls)
        log.info("metrics on %s://%s:%d/metrics", scheme, host, metrics_server.server_port)
    stop = _stop_on_signals()
    server.start()
    http = None
    if http_port is not None:
        from jds.serving.http_server import HttpServer
        from jds.serving.openai_api import OpenAIFrontend

        app = OpenAIFrontend(engine, metrics, accepting, settings.max_request_bytes).app
        app = http_key_check(app, keys) if keys.enabled else app
        http = HttpServer(browser_access(app, settings.cors_origins) if settings.cors_origins else app, host, http_port, tls)
        log.info("OpenAI-compatible API on %s://%s:%d/v1", scheme, host, http.port)
    if keys.enabled:
        log.info("API keys required (%s)", "every endpoint" if keys.guard_health else "health checks and metrics open")
    for name in ("", SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("ready: serving %s on %s:%d", config.model.name, host, bound)
    _wait(stop)

    log.info("draining: refusing new requests, %d in flight", engine.num_running)
    accepting.clear()
    for name in ("", SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    left = engine.drain(settings.drain_seconds)
    if left:
        log.warning("drain timeout: aborting %d requests", left)
    engine.shutdown()  # ends anything left with finish reason abort
    server.stop(grace=5).wait()
    if http is not None:
        http.stop()
    log.info("stopped")
    return 0


def _serve_instance(config: Config, args: argparse.Namespace, address: str) -> int:
    """A prefill or decode instance: the ``instances.proto`` service on its ``cluster`` address."""
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    import jax

    from jds.api import instances_pb2_grpc as ipb_grpc
    from jds.model.loader import check_config, load_model
    from jds.transfer.remote import KVTransfer

    cluster = config.cluster
    name = f"{args.role}{args.instance}"
    host, _, port = address.rpartition(":")
    if args.port is not None:
        port = args.port
    # the whole placement's shapes, and this process's devices' memory (they are numbered from 0 here)
    mine = getattr(config.placement, args.role)[args.instance]
    devices: list = [None] * (max(config.placement.devices) + 1)
    for number, device in zip(mine.process_share(mine.devices, args.process), jax.local_devices()):
        devices[number] = device
    check_config(config, devices=devices)
    model = load_model(config)
    placement = config.placement.resolved(model.max_seq_len)
    spec = getattr(placement, args.role)[args.instance]
    warmup = config.server.warmup and not args.no_warmup
    if args.process > 0:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a follower stops when its leader says so (or is killed)
        log.info("ready: process %d of %s follows process 0", args.process, name)
        if args.role == "prefill":
            from jds.cluster.prefill_role import follow_leader

            follow_leader(model, spec, placement.max_seq_len, placement.page_size, warmup)
        else:
            from jds.cluster.decode_role import follow_leader as follow_decode_leader

            follow_decode_leader(model, spec, warmup)
        log.info("stopped")
        return 0
    kv = KVTransfer(cluster.transfer_host, cluster.lease_seconds)
    if args.role == "prefill":
        from jds.cluster.prefill_role import PrefillService

        service = PrefillService(name, model, spec, placement.max_seq_len, placement.page_size, kv, warmup=warmup, progress=True)
        add = ipb_grpc.add_PrefillInstanceServicer_to_server
    else:
        from jds.cluster.decode_role import DecodeService

        service = DecodeService(name, model, spec, kv, cluster.pull_timeout_seconds, warmup=warmup, progress=True)
        add = ipb_grpc.add_DecodeInstanceServicer_to_server
    workers = 2 * (getattr(spec, "slots", 0) + config.server.max_waiting) + 8
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), maximum_concurrent_rpcs=workers)
    add(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = _bind(server, f"{host}:{port}", None)
    stop = _stop_on_signals()
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("ready: %s of %s on %s:%d, KV transfer server %s", name, config.model.name, host, bound, kv.address)
    _wait(stop)
    log.info("stopping %s", name)
    health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    server.stop(grace=config.server.drain_seconds).wait()
    service.shutdown()
    log.info("stopped")
    return 0


def _bind(server, address: str, credentials) -> int:
    """The port ``server`` listens on at ``address``; grpcio reports a failure by raising or by
    returning 0, depending on its version."""
    try:
        bound = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    return bound


def _stop_on_signals() -> threading.Event:
    """Set on SIGTERM or SIGINT; installed before "ready", so a signal right after it drains, not kills."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _wait(stop: threading.Event) -> None:
    while not stop.wait(1.0):  # a timed wait, so the signal handler always gets to run
        pass


if __name__ == "__main__":
    sys.exit(main())
