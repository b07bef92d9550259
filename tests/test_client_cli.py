"""``python -m jds.client``'s handling of what a user types: every bad argument is refused before
connecting, in one line naming the flag (exit 2, no traceback), and what the proto fields carry
reaches the server as the other front ends would send it. The servers here are plain gRPC servers
in this process (no model), so each test takes about a second."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
import trustme

from jds.api import generation_pb2 as pb
from jds.api import generation_pb2_grpc as pb_grpc
from jds.sampling_params import SamplingParams
from tests_paths import REPO


def client(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "jds.client", "--timeout", "10", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=60)


@pytest.mark.parametrize(
    "flag, args",
    [
        ("--tls-ca", ["--tls-ca", "/nonexistent.pem", "hi"]),
        ("--tls-ca", ["--tls-ca", str(REPO / "README.md"), "hi"]),  # a file, but no certificate
        ("--token-ids", ["--token-ids", "1 a 3"]),
        ("--token-ids", ["--token-ids", "99999999999"]),
        ("--max-tokens", ["--max-tokens", "99999999999", "hi"]),
        ("--top-k", ["--top-k", "-99999999999", "hi"]),
        ("--seed", ["--seed", "99999999999999999999999", "hi"]),
        ("--seed", ["--seed", str(-(2**63) - 1), "hi"]),
        ("--server", ["--server", "127.0.0.1:99999", "hi"]),
        ("--server", ["--server", "127.0.0.1:0", "hi"]),
        ("--server", ["--server", "unix:/tmp/socket", "hi"]),
        ("--token-ids", ["--chat", "--token-ids", "1 2"]),
        ("--timeout", ["--timeout", "-1", "hi"]),
        ("--timeout", ["--timeout", "0", "hi"]),
        ("--timeout", ["--timeout", "inf", "hi"]),
        ("--timeout", ["--timeout", "nan", "hi"]),
    ],
)
def test_a_bad_argument_is_refused_in_one_line_naming_its_flag(flag, args):
    run = client("--server", "127.0.0.1:1", *args)  # nothing listens on port 1: a refusal never connects
    (line,) = run.stderr.strip().splitlines()[-1:]
    assert run.returncode == 2 and f"error: argument {flag}: " in line, run.stderr
    assert "Traceback" not in run.stderr


class Recorder(pb_grpc.GenerationServicer):
    """A stand-in server: keeps each request and answers with one final message."""

    def __init__(self) -> None:
        self.requests: list[pb.GenerateRequest] = []

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        self.requests.append(request)
        yield pb.GenerateResponse(text="ok", finish_reason=pb.FINISH_REASON_LENGTH)


def serve(address: str, credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.Server, Recorder, int]:
    """A Recorder at ``address`` (port 0: any free one), and the port; raises RuntimeError when the
    address is taken."""
    server, recorder = grpc.server(futures.ThreadPoolExecutor(2)), Recorder()
    pb_grpc.add_GenerationServicer_to_server(recorder, server)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if not port:
        raise RuntimeError(f"{address} is taken")
    server.start()
    return server, recorder, port


def test_values_the_wire_carries_are_sent_as_the_other_front_ends_send_them():
    server, recorder, port = serve("127.0.0.1:0")
    try:
        run = client("--server", f"127.0.0.1:{port}", "--seed", "-5", "--max-tokens", "99999", "--token-ids", "1, -2 3")
        assert run.returncode == 0 and run.stdout == "ok\n", run.stderr
        (request,) = recorder.requests
        # uint32 on the wire: folded as SamplingParams folds the HTTP API's and jds.LLM's seeds
        assert request.seed == SamplingParams(seed=-5).resolved_seed() == 2**32 - 5
        assert request.max_tokens == 99999  # the server knows the context, and refuses beyond it by name
        assert list(request.token_ids) == [1, -2, 3]  # the server knows the vocabulary
        run = client("--server", f"127.0.0.1:{port}", "--seed", str(2**63 - 1), "hi")
        assert run.returncode == 0 and recorder.requests[-1].seed == (2**63 - 1) % 2**32
    finally:
        server.stop(None)


def test_a_server_without_a_port_is_the_servers_default_port():
    from jds.client import _address

    assert _address("127.0.0.1") == "127.0.0.1:50051" and _address("example.org:8001") == "example.org:8001"
    assert _address("[::1]") == "[::1]:50051"


def test_a_tls_server_met_without_a_ca_gets_a_hint(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    chain = b"".join(pem.bytes() for pem in cert.cert_chain_pems)
    server, recorder, port = serve("127.0.0.1:0", grpc.ssl_server_credentials([(cert.private_key_pem.bytes(), chain)]))
    try:
        run = client("--server", f"127.0.0.1:{port}", "hi")
        line = run.stderr.strip().splitlines()[-1]
        assert run.returncode == 1 and line.startswith("error: UNAVAILABLE") and "pass --tls-ca" in line, run.stderr
        assert "Traceback" not in run.stderr
        ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        assert client("--server", f"127.0.0.1:{port}", "--tls-ca", str(tmp_path / "ca.pem"), "hi").returncode == 0
        assert len(recorder.requests) == 1
    finally:
        server.stop(None)


def test_the_help_is_plain_text_and_shows_the_defaults():
    run = client("--help")
    assert run.returncode == 0 and "``" not in run.stdout
    text = " ".join(run.stdout.split())  # argparse wraps lines
    for flag, shown in [
        ("--server", "default: 127.0.0.1:50051"),
        ("--max-tokens", "default: 128"),
        ("--temperature", "default: 0.0"),
        ("--top-p", "default: 1"),
        ("--top-k", "default: 0"),
        ("--seed", "default: random"),
    ]:
        assert shown in text.split(f" {flag} ", 1)[1].split(" --", 1)[0], flag
