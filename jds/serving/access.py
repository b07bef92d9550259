"""Who may call the server: API keys on gRPC and HTTP, and TLS for every listening port.

With keys configured, a client sends ``authorization: Bearer KEY`` (gRPC metadata, or the HTTP
header OpenAI's clients send). Health checks (gRPC health, ``/health``), reflection and the
Prometheus endpoint stay open, as load balancers and scrapers expect, unless
``server.keys_guard_health`` is set. A wrong or missing key is UNAUTHENTICATED / 401, counted in
``jds_rejected_requests_total{code="UNAUTHENTICATED"}``. Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
import json
import os
import socketserver
import ssl
import threading
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from prometheus_client import make_wsgi_app
from starlette.middleware.cors import CORSMiddleware

KEYS_ENV = "JDS_API_KEY"  # one key, or several separated by commas
OPEN_HTTP_PATHS = ("/health", "/metrics")
OPEN_GRPC_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class ApiKeys:
    """The accepted keys; empty means every caller is let in."""

    def __init__(self, keys: Iterable[str], guard_health: bool = False, on_refusal: Callable[[], None] = lambda: None):
        self._keys = [k.encode() for k in dict.fromkeys(keys) if k]
        self.guard_health = guard_health
        self.on_refusal = on_refusal

    @classmethod
    def gather(cls, configured: Iterable[str], flags: Iterable[str], **kwargs) -> ApiKeys:
        """Keys from the config, the command line and ``$JDS_API_KEY``, all of them accepted."""
        from_env = [k.strip() for k in os.environ.get(KEYS_ENV, "").split(",")]
        return cls([*configured, *flags, *from_env], **kwargs)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def allows(self, authorization: str | None) -> bool:
        """Whether an ``authorization`` value (``Bearer KEY``) carries an accepted key."""
        if not self._keys:
            return True
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = key.strip().encode()
        return any(hmac.compare_digest(given, k) for k in self._keys)  # every key, whatever matched

    def check(self, authorization: str | None) -> bool:
        """``allows``, counting a refusal."""
        if self.allows(authorization):
            return True
        self.on_refusal()
        return False


class GrpcKeyCheck(grpc.ServerInterceptor):
    """Refuses, before the method runs, a call without an accepted key."""

    def __init__(self, keys: ApiKeys):
        self._keys = keys

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if not self._keys.guard_health and method.startswith(OPEN_GRPC_SERVICES):
            return continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        if self._keys.check(metadata.get("authorization")):
            return continuation(handler_call_details)
        return grpc.unary_unary_rpc_method_handler(_unauthenticated)


def _unauthenticated(request, context: grpc.ServicerContext) -> None:
    context.abort(grpc.StatusCode.UNAUTHENTICATED, "authorization: a valid API key is needed (metadata 'authorization: Bearer KEY')")


def http_key_check(app, keys: ApiKeys):
    """ASGI middleware: a request without an accepted key gets OpenAI's 401 error object."""
    body = json.dumps(
        {
            "error": {
                "message": "authorization: a valid API key is needed (header 'Authorization: Bearer KEY')",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        }
    ).encode()

    async def guarded(scope, receive, send):
        if scope["type"] != "http" or (not keys.guard_health and scope["path"] in OPEN_HTTP_PATHS):
            return await app(scope, receive, send)
        headers = dict(scope["headers"])
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        if keys.check(authorization):
            return await app(scope, receive, send)
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return guarded


def browser_access(app, origins: list[str]):
    """ASGI middleware answering browsers' CORS checks for ``origins`` (``["*"]``: any), outside
    the key check: a preflight carries no key, and a refusal must carry the CORS headers for a
    page to read it. No cookies are involved (a key travels in a header the page's code sets)."""
    return CORSMiddleware(app, allow_origins=origins, allow_methods=["*"], allow_headers=["*"], expose_headers=["x-request-id"])


# -- TLS ---------------------------------------------------------------------------------------


def grpc_credentials(cert: str, key: str) -> grpc.ServerCredentials:
    with open(key, "rb") as k, open(cert, "rb") as c:
        return grpc.ssl_server_credentials([(k.read(), c.read())])


# -- the Prometheus endpoint --------------------------------------------------------------------


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # scrapes every few seconds would flood the server's log
        pass


def serve_metrics(registry, host: str, port: int, keys: ApiKeys, tls: tuple[str, str] | None) -> WSGIServer:
    """``/metrics`` on its own port (and thread), behind the keys when they guard health, over TLS
    when the server has a certificate; returns the running server (its port is ``server_port``)."""
    metrics = make_wsgi_app(registry)

    def app(environ, start_response):
        if keys.guard_health and not keys.check(environ.get("HTTP_AUTHORIZATION")):
            start_response("401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")])
            return [b"a valid API key is needed\n"]
        return metrics(environ, start_response)

    server = make_server(host, port, app, server_class=_Server, handler_class=_QuietHandler)
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
