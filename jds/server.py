"""``python -m jds.server [--config CONFIG] [--port P] [--http-port H]``: serve jds.v1 over gRPC (and OpenAI's API over HTTP).

Start-up: read the config, check the placement against the model's shapes and the devices' memory
before reading any weight (a placement that cannot fit is refused with both figures), load the
weights, build the engine, compile every program shape (progress bar), then report SERVING on the
standard health service and log "ready". SIGTERM or SIGINT drains: new requests get UNAVAILABLE,
requests in flight may finish for ``server.drain_seconds``, then the process exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures

from jds.config import Config, ConfigError, load_config

log = logging.getLogger("jds.server")

SERVICE = "jds.v1.Generation"


def _give_cpu_devices(config: Config) -> None:
    """Make sure a CPU-only JAX has a virtual device for every device the placement names.

    Must run before JAX is imported; on accelerators the flag is ignored.
    """
    needed = max(config.placement.devices) + 1
    flags = os.environ.get("XLA_FLAGS", "")
    if needed > 1 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={needed}".strip()


def _pin_cpus(config: Config) -> None:
    """Pin this process to the placement's ``cpus``, so placements compared on a CPU machine use
    exactly the cores they name."""
    cpus = config.placement.cpus
    if cpus is None:
        return
    available = os.sched_getaffinity(0)
    missing = sorted(set(cpus) - available)
    if missing:
        raise ConfigError(f"placement.cpus: cores {missing} are not available to this process (it may use {sorted(available)})")
    os.sched_setaffinity(0, cpus)
    log.info("pinned to CPU cores %s", cpus)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jds.server", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="deployment YAML (default: configs/smollm2-135m.yaml)")
    parser.add_argument("--host", default=None, help="address to listen on (default: server.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="gRPC port (default: server.port, 50051; 0 picks one)")
    parser.add_argument("--http-port", type=int, default=None, help="also serve the OpenAI-compatible API over HTTP here (default: server.http_port, off; 0 picks one)")
    parser.add_argument("--metrics-port", type=int, default=None, help="Prometheus port (default: server.metrics_port)")
    parser.add_argument("--no-warmup", action="store_true", help="skip compiling ahead (first requests compile)")
    parser.add_argument("--log-requests", action="store_true", help="one log line per finished request, with its timings")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    if args.log_requests:
        logging.getLogger("jds.requests").setLevel(logging.DEBUG)
    try:
        config = load_config(args.config)
        _pin_cpus(config)
        _give_cpu_devices(config)
        return _serve(config, args)
    except (ConfigError, OSError, ValueError) as exc:
        log.error("%s", exc)
        return 1


def _serve(config: Config, args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection
    from prometheus_client import start_http_server

    from jds.api import generation_pb2, generation_pb2_grpc
    from jds.engine.engine import Engine
    from jds.mesh.fit import check_config
    from jds.model.loader import load_model
    from jds.serving.metrics import Metrics
    from jds.serving.servicer import GenerationServicer

    settings = config.server
    host = args.host or settings.host
    port = settings.port if args.port is None else args.port
    metrics_port = settings.metrics_port if args.metrics_port is None else args.metrics_port
    http_port = settings.http_port if args.http_port is None else args.http_port

    check_config(config)
    engine = Engine(
        load_model(config),
        config.placement,
        warmup=settings.warmup and not args.no_warmup,
        progress=True,
        max_waiting=settings.max_waiting,
    )
    metrics = Metrics(engine)
    accepting = threading.Event()  # both front ends refuse new requests once it is cleared
    accepting.set()
    servicer = GenerationServicer(engine, metrics, accepting)
    slots = engine.slot_usage()[1]
    # One thread per open stream: everything running plus everything allowed to wait, and a few for ModelInfo and health.
    workers = slots + settings.max_waiting + 8
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), maximum_concurrent_rpcs=workers)
    generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    if metrics_port is not None:
        httpd, _ = start_http_server(metrics_port, addr=host, registry=metrics.registry)
        log.info("metrics on http://%s:%d/metrics", host, httpd.server_port)
    stop = threading.Event()  # handlers first: a SIGTERM right after "ready" must drain, not kill
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    http = None
    if http_port is not None:
        from jds.serving.http_server import HttpServer
        from jds.serving.openai_api import OpenAIFrontend

        http = HttpServer(OpenAIFrontend(engine, metrics, accepting).app, host, http_port)
        log.info("OpenAI-compatible API on http://%s:%d/v1", host, http.port)
    for name in ("", SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("ready: serving %s on %s:%d", config.model.name, host, bound)
    while not stop.wait(1.0):  # a timed wait, so the signal handler always gets to run
        pass

    log.info("draining: refusing new requests, %d in flight", engine.num_running)
    accepting.clear()
    for name in ("", SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    deadline = time.monotonic() + settings.drain_seconds
    while engine.num_running and time.monotonic() < deadline:
        time.sleep(0.05)
    if engine.num_running:
        log.warning("drain timeout: aborting %d requests", engine.num_running)
    engine.shutdown()  # ends anything left with finish reason abort
    server.stop(grace=5).wait()
    if http is not None:
        http.stop()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
