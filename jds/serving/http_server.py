"""Run an ASGI application (the OpenAI-compatible API) with uvicorn on a thread of the server process.

The server's main thread owns signals and the drain; uvicorn, started off the main thread, installs
no signal handlers of its own and stops when ``stop`` asks it to.
"""

from __future__ import annotations

import threading
import time

import uvicorn


class HttpServer:
    def __init__(self, app, host: str, port: int, tls: tuple[str, str] | None = None, timeout: float = 30.0):
        """``tls``: (certificate, key) PEM files to serve HTTPS with."""
        cert, key = tls or (None, None)
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", lifespan="off", timeout_graceful_shutdown=5, ssl_certfile=cert, ssl_keyfile=key
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:  # uvicorn exits its thread when it cannot bind
                raise OSError(f"cannot serve HTTP on {host}:{port}")
            time.sleep(0.02)
        self.port: int = self._server.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
