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

READY = re.compile(r"ready: serving .* on ([\d.]+):(\d+)")
METRICS = re.compile(r"metrics on (https?://[\d.]+:\d+/metrics)")
HTTP = re.compile(r"OpenAI-compatible API on (https?://[\d.]+:\d+/v1)")


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
        self.address = f"{ready.group(1)}:{ready.group(2)}"
        self.metrics_url = METRICS.search(self.text()).group(1)
        http = HTTP.search(self.text())  # only with --http-port
        self.openai_url: str | None = http.group(1) if http else None

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
