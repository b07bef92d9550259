"""API keys and TLS: a real server with a throwaway certificate authority, driven by the official
clients (a gRPC secure channel, ``openai`` over https with the CA), and the key checks in process."""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
from concurrent import futures

import grpc
import httpx
import openai
import pytest
import trustme
from fastapi import FastAPI
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from starlette.testclient import TestClient

from jds.api import generation_pb2 as pb
from jds.api import generation_pb2_grpc as pb_grpc
from jds.bench.server_process import ServerProcess
from jds.serving.access import ApiKeys, GrpcKeyCheck, http_key_check
from tiny_server import write_config

MODEL = "tiny-random"
KEYS = {"config": "key-from-config", "flag": "key-from-flag", "env": "key-from-env"}


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(folder / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(folder / "cert.pem"), append=True)
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    return folder


@pytest.fixture(scope="module")
def server(tls):
    write_config(tls / "server.yaml", api_keys=[KEYS["config"]], tls={"cert": "cert.pem", "key": "key.pem"})
    saved = os.environ.get("JDS_API_KEY")
    os.environ["JDS_API_KEY"] = KEYS["env"]
    try:
        proc = ServerProcess(tls / "server.yaml", tls / "server.log", "--http-port", "0", "--api-key", KEYS["flag"], "--no-warmup")
    finally:
        os.environ.pop("JDS_API_KEY") if saved is None else os.environ.__setitem__("JDS_API_KEY", saved)
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def channel(server, tls):
    credentials = grpc.ssl_channel_credentials(root_certificates=(tls / "ca.pem").read_bytes())
    with grpc.secure_channel(server.address, credentials) as ch:
        yield ch


def _trust(tls) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tls / "ca.pem"))


def _bearer(key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {key}"),)


def _openai(server, tls, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.openai_url, api_key=key, max_retries=0, http_client=httpx.Client(verify=_trust(tls)))


def test_every_port_speaks_tls(server):
    assert server.openai_url.startswith("https://") and server.metrics_url.startswith("https://")
    with grpc.insecure_channel(server.address) as plain:  # a plain-text client cannot talk to it
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.GenerationStub(plain).ModelInfo(pb.ModelInfoRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(httpx.HTTPError):
        httpx.get(server.openai_url.replace("https://", "http://", 1) + "/models", timeout=10)


def test_grpc_needs_a_key_from_any_source_and_health_stays_open(channel):
    stub = pb_grpc.GenerationStub(channel)
    request = pb.GenerateRequest(text="hi", max_tokens=3, temperature=0, ignore_eos=True)
    for key in KEYS.values():
        last = list(stub.Generate(request, metadata=_bearer(key), timeout=60))[-1]
        assert last.finish_reason == pb.FINISH_REASON_LENGTH
    for metadata in ((), _bearer("wrong"), (("authorization", KEYS["config"]),)):  # no key, a wrong one, no Bearer
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(request, metadata=metadata, timeout=60))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and err.value.details().startswith("authorization:")
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfo(pb.ModelInfoRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert stub.ModelInfo(pb.ModelInfoRequest(), metadata=_bearer(KEYS["flag"]), timeout=10).model_name == MODEL
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_openai_client_over_https_with_a_key_and_401_without(server, tls):
    with _openai(server, tls, KEYS["env"]) as client:
        answer = client.completions.create(model=MODEL, prompt="hi", max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
        assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 3
        assert [m.id for m in client.models.list().data] == [MODEL]
    with _openai(server, tls, "wrong") as client:
        with pytest.raises(openai.AuthenticationError) as err:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
    root = server.openai_url.removesuffix("/v1")
    assert httpx.get(root + "/health", verify=_trust(tls), timeout=10).json() == {"status": "serving"}
    assert "jds_requests_total" in httpx.get(root + "/metrics", verify=_trust(tls), timeout=10).text  # open to scrapers, as /health
    assert httpx.post(root + "/tokenize", json={"prompt": "hi"}, verify=_trust(tls), timeout=10).status_code == 401
    # a browser's CORS preflight carries no key (the page's code sets it on the request itself)
    preflight = httpx.options(
        server.openai_url + "/chat/completions", verify=_trust(tls), timeout=10,
        headers={"origin": "https://example.org", "access-control-request-method": "POST", "access-control-request-headers": "authorization"},
    )  # fmt: skip
    assert preflight.status_code == 200 and "authorization" in preflight.headers["access-control-allow-headers"].lower()


def test_the_client_command_takes_a_key_and_the_ca(server, tls):
    def client(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "jds.client", "--server", server.address, "--tls-ca", str(tls / "ca.pem"), *args, "--max-tokens", "3", "hi"]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, "JDS_API_KEY": ""})

    assert client("--api-key", KEYS["config"], "--tokens").returncode == 0
    refused = client()
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr


@pytest.mark.parametrize("api", ["grpc", "openai"])
def test_the_benchmark_measures_a_server_with_keys_and_tls(server, tls, tmp_path, api):
    from jds.bench.__main__ import main

    address = server.openai_url if api == "openai" else server.address
    args = ["serve", "--api", api, "--server", address, "--tls-ca", str(tls / "ca.pem"), "--api-key", KEYS["config"]]
    assert main([*args, "--workload", "code", "--rates", "4", "--num-requests", "3", "--out", str(tmp_path)]) == 0
    (rate,) = json.loads((tmp_path / "results.json").read_text())["sweeps"][0]["rates"].values()
    assert rate["summary"]["requests"] == 3 and rate["summary"]["failed"] == 0


def test_refused_keys_are_counted_in_the_open_metrics(server, tls, channel):
    def refused() -> float:
        body = httpx.get(server.metrics_url, verify=_trust(tls), timeout=10).text
        match = re.search(r'^jds_rejected_requests_total\{code="UNAUTHENTICATED"\} (\S+)$', body, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    before = refused()
    with pytest.raises(grpc.RpcError):
        pb_grpc.GenerationStub(channel).ModelInfo(pb.ModelInfoRequest(), metadata=_bearer("nope"), timeout=10)
    assert httpx.post(server.openai_url + "/completions", json={}, verify=_trust(tls), timeout=10).status_code == 401
    assert refused() == before + 2


# -- in process: what guard_health changes ----------------------------------------------------------


def test_keys_guarding_health_cover_the_http_health_check_too():
    app = FastAPI()
    app.get("/health")(lambda: {"status": "serving"})
    app.get("/metrics")(lambda: "jds_requests_total 0")
    app.get("/v1/models")(lambda: {"data": []})
    refusals = []
    for guard, health_without_key in ((False, 200), (True, 401)):
        keys = ApiKeys(["k"], guard_health=guard, on_refusal=lambda: refusals.append(1))
        client = TestClient(http_key_check(app, keys))
        assert client.get("/health").status_code == client.get("/metrics").status_code == health_without_key
        assert client.get("/health", headers={"Authorization": "Bearer k"}).status_code == 200
        assert client.get("/v1/models", headers={"Authorization": "bearer k"}).status_code == 200  # the scheme's case is free
        denied = client.get("/v1/models", headers={"Authorization": "Bearer k2"})
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    assert len(refusals) == 4


def test_keys_guarding_health_cover_the_grpc_health_service_too():
    server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[GrpcKeyCheck(ApiKeys(["k"], guard_health=True))])
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert stub.Check(health_pb2.HealthCheckRequest(), metadata=_bearer("k"), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(None)


def test_no_keys_lets_everyone_in_and_keys_come_from_the_environment(monkeypatch):
    assert ApiKeys([]).allows(None) and not ApiKeys([]).enabled
    monkeypatch.setenv("JDS_API_KEY", "a, b")
    keys = ApiKeys.gather(["c"], [])
    assert all(keys.allows(f"Bearer {k}") for k in "abc") and not keys.allows("Bearer d") and not keys.allows("Bearer ")
