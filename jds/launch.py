"""``python -m jds.launch --config CONFIG [--port P] [--http-port H] ...``: every role of a placement as local processes.

Starts one process per prefill and decode instance (``python -m jds.server --role ...``) on the
addresses of the config's ``cluster:`` section, each pinned to its instance's ``cpus`` and given
exactly its devices (its own virtual CPU devices, or ``CUDA_VISIBLE_DEVICES`` on GPUs). Once every
instance reports SERVING on the standard health service, it starts the router, which serves the
client API. Each child's output is echoed with its name. An instance that exits on its own is
started again (the router takes it out of rotation meanwhile and back once it answers); the
router exiting ends everything. SIGTERM or SIGINT stops the router first (it drains), then the
instances, and the launcher exits 0 when all have.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jds.cluster.registry import CHANNEL_OPTIONS
from jds.config import Config, ConfigError, load_config
from jds.server import port

log = logging.getLogger("jds.launch")

RESTART_DELAY_SECONDS = 1.0
# An instance that dies within this long of starting waits twice as long as last time before the
# next start (up to the cap): one that cannot come up is not reloaded every second forever.
STABLE_SECONDS = 60.0
MAX_RESTART_DELAY_SECONDS = 60.0
DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\d+")


class Child:
    """One role process: how to start it, the running process, and its output echoed with its name."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], group: str | None = None):
        self.name = name
        self.group = group or name  # the processes of one instance: restarted together
        self.argv = argv
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.started_at = 0.0

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.starts += 1
        self.started_at = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.proc.pid)
        threading.Thread(target=self._echo, args=(self.proc,), name=f"echo-{self.name}", daemon=True).start()

    def _echo(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            if "\r" in line:  # progress bars: only their final state
                line = line.rsplit("\r", 1)[-1]
            sys.stdout.write(f"[{self.name}] {line}")
            sys.stdout.flush()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float) -> None:
        if not self.alive:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s: killing it", self.name, timeout)
            self.proc.kill()
            self.proc.wait()


def _instance_env(devices: list[int]) -> dict[str, str]:
    """Exactly the instance's devices: that many virtual CPU devices, or those GPUs."""
    env = dict(os.environ)
    flags = DEVICE_COUNT_FLAG.sub("", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={len(devices)}".strip()
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in devices)
    return env


def plan_children(config_path: str, config: Config, extra: list[str], router_extra: list[str]) -> tuple[list[Child], Child]:
    placement, cluster = config.placement, config.cluster
    if placement.mode != "disaggregated":
        raise ConfigError("placement.mode: the launcher runs disaggregated placements (colocated ones run as one server)")
    base = [sys.executable, "-m", "jds.server", "--config", config_path]
    instances = []
    for role, specs, addresses in (("prefill", placement.prefill, cluster.prefill), ("decode", placement.decode, cluster.decode)):
        if len(addresses) != len(specs):
            raise ConfigError(f"cluster.{role}: give one host:port per placement.{role} instance ({len(specs)}), got {len(addresses)}")
        for i, spec in enumerate(specs):
            for k in range(spec.processes):  # process 0 serves; the others follow it (jax.distributed)
                name = f"{role}{i}" if k == 0 else f"{role}{i}.{k}"
                argv = [*base, "--role", role, "--instance", str(i), *(["--process", str(k)] if spec.processes > 1 else []), *extra]
                instances.append(Child(name, argv, _instance_env(spec.process_share(spec.devices, k)), group=f"{role}{i}"))
    router_env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # the router runs no model: it must not claim an accelerator
    router = Child("router", [*base, "--role", "router", *extra, *router_extra], router_env)
    return instances, router


def wait_serving(address: str, child: Child, timeout: float) -> None:
    """Until the health service at ``address`` says SERVING; raises if the child dies or time runs out."""
    end = time.monotonic() + timeout
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if not child.alive:
                raise RuntimeError(f"{child.name} exited with {child.proc.returncode} before serving")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > end:
                raise RuntimeError(f"{child.name} did not serve on {address} within {timeout:.0f} s")
            time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jds.launch", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--config", required=True, help="deployment YAML with a disaggregated placement and a cluster: section")
    parser.add_argument("--port", type=port, default=None, help="the router's gRPC port (default: server.port)")
    parser.add_argument("--http-port", type=port, default=None, help="the router's OpenAI-compatible HTTP port")
    parser.add_argument("--metrics-port", type=port, default=None, help="the router's Prometheus port")
    parser.add_argument("--no-warmup", action="store_true", help="instances skip compiling ahead")
    parser.add_argument("--compile-cache", default=None, help="the instances' directory of compiled programs (default: server.compile_cache); 'none' compiles afresh")
    parser.add_argument("--log-requests", action="store_true", help="the router logs one line per finished request")
    parser.add_argument("--no-restart", action="store_true", help="leave an instance that exits down")
    parser.add_argument("--start-timeout", type=float, default=900.0, help="seconds each instance may take to serve")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    try:
        config = load_config(args.config)
        extra = ["--no-warmup"] if args.no_warmup else []
        extra += [f"--compile-cache={args.compile_cache}"] if args.compile_cache is not None else []
        router_extra = [f"--{name.replace('_', '-')}={value}" for name, value in vars(args).items() if name.endswith("port") and value is not None]
        router_extra += ["--log-requests"] if args.log_requests else []
        instances, router = plan_children(args.config, config, extra, router_extra)
    except (ConfigError, OSError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    return _run(instances, router, config, not args.no_restart, args.start_timeout)


def _run(instances: list[Child], router: Child, config: Config, restart: bool, start_timeout: float) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    cluster = config.cluster
    addresses = {**{f"prefill{i}": a for i, a in enumerate(cluster.prefill)}, **{f"decode{i}": a for i, a in enumerate(cluster.decode)}}
    groups: dict[str, list[Child]] = {}
    for child in instances:
        groups.setdefault(child.group, []).append(child)
    delays: dict[str, float] = {}  # each group's last wait before a restart
    code = 0
    try:
        for child in instances:
            child.start()
        for name, address in addresses.items():
            wait_serving(address, groups[name][0], start_timeout)
            log.info("%s is serving on %s", name, address)
        router.start()
        while not stop.wait(0.2):
            if not router.alive:
                log.error("the router exited with %s: stopping", router.proc.returncode)
                code = 1
                break
            for name, members in groups.items():
                dead = [c for c in members if not c.alive]
                if dead and restart:
                    quick = time.monotonic() - members[0].started_at < STABLE_SECONDS
                    delays[name] = min(2 * delays.get(name, RESTART_DELAY_SECONDS), MAX_RESTART_DELAY_SECONDS) if quick else RESTART_DELAY_SECONDS
                    log.warning("%s exited with %s: starting %s again in %.0f s", dead[0].name, dead[0].proc.returncode, name, delays[name])
                    for c in members:  # an instance over several processes restarts whole
                        c.stop(10)
                    if stop.wait(delays[name]):
                        break
                    for c in members:
                        c.start()
    except RuntimeError as exc:
        log.error("%s", exc)
        code = 1
    finally:
        router.stop(config.server.drain_seconds + 10)
        for child in instances:
            child.stop(config.server.drain_seconds + 10)
        log.info("stopped")
    return code


if __name__ == "__main__":
    sys.exit(main())
