"""Start ``python -m jds.server`` (or ``python -m jds.launch``) as a subprocess and find its ports from its log.

Used by ``python -m jds.bench compare`` (one server per placement) and by the tests. A config
whose ``cluster:`` section names instance addresses runs as separate processes, with the launcher.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

# What jds.server logs once it listens: its host as server.host spells it (an IP address of either
# family, or a name such as localhost), then the port, up to the line's end (a line still being
# written is not read with half its port).
READY = re.compile(r"ready: serving .* on (\S+):(\d+)\n")
METRICS = re.compile(r"metrics on (https?)://(\S+):(\d+)/metrics\n")
HTTP = re.compile(r"OpenAI-compatible API on (https?)://(\S+):(\d+)/v1\n")


def host_port(host: str, port: str) -> str:
    """``host:port`` for a client, an IPv6 address in brackets (the server logs it bare)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def launcher_needed(config: Path) -> bool:
    """Whether this config's roles run as separate processes (its ``cluster:`` names instances)."""
    from jds.config import load_config

    cluster = load_config(config).cluster
    return bool(cluster.prefill or cluster.decode)


class ServerProcess:
    def __init__(self, config: Path, log: Path, *extra: str, timeout: float = 600, cwd: Path | None = None):
        self.log_path = log
        self._log = open(log, "w")
        module = "jds.launch" if launcher_needed(config) else "jds.server"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--config", str(config), "--port", "0", "--metrics-port", "0", *extra],
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while not (ready := READY.search(self.text())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not become ready:\n{self.text()[-3000:]}")
            time.sleep(0.2)
        self.address = host_port(*ready.groups())
        metrics = METRICS.search(self.text())
        self.metrics_url = f"{metrics[1]}://{host_port(metrics[2], metrics[3])}/metrics"
        http = HTTP.search(self.text())  # only with --http-port
        self.openai_url: str | None = f"{http[1]}://{host_port(http[2], http[3])}/v1" if http else None

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
