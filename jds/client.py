"""``python -m jds.client``: stream a generation from a jds server over gRPC (what it does is in
``DESCRIPTION``, which ``--help`` shows), and the ``Credentials`` any client of a server with API
keys or TLS brings (``jds.bench`` takes them too).

Every argument is checked before connecting, against what the request's proto field can carry
(``jds/api/generation.proto``): a bad one exits 2 with argparse's one-line message naming the flag.
A value the wire carries but the server may refuse (``--max-tokens`` beyond the context, a
``--temperature`` of NaN) is sent, so the server's own rule names it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import ssl
import sys
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from jds.api import generation_pb2 as pb
from jds.api import generation_pb2_grpc as pb_grpc
from jds.sampling_params import SamplingParams

DESCRIPTION = (
    "Stream a generation from a jds server over gRPC. Text goes to stdout as it arrives; --tokens prints the "
    "token ids instead, --json prints the final message (finish reason, usage, timings) as JSON. A server's "
    "error goes to stderr as one line and the exit code is 1; a bad argument exits 2. A server with API keys "
    "takes --api-key (default: the first key of $JDS_API_KEY); one serving TLS, --tls-ca."
)
DEFAULT_PORT = 50051  # the server's own default, where gRPC's would be 443


@dataclasses.dataclass(frozen=True)
class Credentials:
    """What a server with API keys or TLS asks of a client, on either API: a Bearer key, and the
    certificate authority that signed the server's certificate."""

    api_key: str | None = None
    tls_ca: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Credentials:
        return cls(args.api_key, args.tls_ca)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def scheme(self) -> str:
        return "https" if self.tls_ca else "http"

    def verify(self) -> ssl.SSLContext | bool:
        """For httpx: trust the given CA (the system's when none is given)."""
        return ssl.create_default_context(cafile=self.tls_ca) if self.tls_ca else True

    def channel(self, address: str, aio: bool = False):
        """A gRPC channel to ``address``, over TLS when a CA is given (``aio``: an asyncio one)."""
        kind = grpc.aio if aio else grpc
        if self.tls_ca is None:
            return kind.insecure_channel(address)
        return kind.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=Path(self.tls_ca).read_bytes()))


def _ca_file(value: str) -> str:
    """``--tls-ca``: a readable file holding a PEM certificate. Checked here because gRPC raises on a
    missing file, and with a file that holds no certificate fails each call saying only that it
    could not create a security handshaker."""
    try:
        pem = Path(value).read_bytes()
    except FileNotFoundError:
        raise argparse.ArgumentTypeError(f"{value}: no such file") from None
    except OSError as err:
        raise argparse.ArgumentTypeError(f"{value}: {err.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise argparse.ArgumentTypeError(f"{value}: holds no PEM certificate")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--api-key`` (default: the first key of ``$JDS_API_KEY``) and ``--tls-ca``."""
    parser.add_argument("--api-key", default=os.environ.get("JDS_API_KEY", "").split(",")[0].strip() or None, help="sent as a Bearer key")
    ca_help = "PEM file of the CA of the server's certificate: connect over TLS"
    parser.add_argument("--tls-ca", type=_ca_file, default=None, help=ca_help)


def _address(value: str) -> str:
    """``--server``: HOST[:PORT] (an IPv6 host in brackets) as a gRPC target with the port spelled
    out: gRPC would take a missing port as 443 and wrap one beyond 65535 without a word."""
    refusal = argparse.ArgumentTypeError(f"{value!r} is not HOST[:PORT] with a port in 1-65535")
    try:
        parts = urllib.parse.urlsplit("//" + value)
        port = DEFAULT_PORT if parts.port is None else parts.port
    except ValueError:  # a port that is no number or beyond 65535, an unclosed "["
        raise refusal from None
    host = parts.hostname
    if not host or parts.path or parts.query or parts.fragment or port == 0:
        raise refusal
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _integer(low: int, high: int, kind: str) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high], the range ``kind`` holds. Beyond it protobuf
    would raise on building the request; within it, the server judges the value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range: {kind} [{low}, {high}]")
        return value

    return parse


_int32 = _integer(-(2**31), 2**31 - 1, "the request's int32 field takes")
_seed = _integer(-(2**63), 2**63 - 1, "a seed is a 64-bit integer in")


def _seconds(text: str) -> float:
    """``--timeout``: a positive, finite number of seconds. gRPC takes any other (0, -1, inf, NaN)
    as a deadline already past: every call would fail at once with DEADLINE_EXCEEDED."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text} is not a positive, finite number of seconds")
    return value


def build_request(args: argparse.Namespace) -> pb.GenerateRequest:
    """The request the arguments ask for. Raises ``ArgumentTypeError`` for a ``--token-ids`` prompt
    that holds a non-integer or one the wire cannot carry (the prompt is checked only here, where
    ``--token-ids`` gives it that meaning)."""
    request = pb.GenerateRequest(max_tokens=args.max_tokens, temperature=args.temperature, stop=args.stop)
    if args.top_p is not None:
        request.top_p = args.top_p
    if args.top_k is not None:
        request.top_k = args.top_k
    if args.seed is not None:
        # The field is uint32: folded as SamplingParams folds every front end's seed, so it samples alike through each
        request.seed = SamplingParams(seed=args.seed).resolved_seed()
    if args.chat:
        request.messages.append(pb.ChatMessage(role="user", content=args.prompt))
    elif args.token_ids:
        request.token_ids.extend(_int32(t) for t in args.prompt.replace(",", " ").split())
    else:
        request.text = args.prompt
    return request


def _describe(err: grpc.RpcError, credentials: Credentials) -> str:
    """The server's status and message, with a hint where a plaintext client met a TLS server: gRPC
    then reports only that the socket closed."""
    code, details = err.code(), err.details()
    tls_likely = code == grpc.StatusCode.UNAVAILABLE and credentials.tls_ca is None and "Socket closed" in details
    return f"error: {code.name}: {details}" + (" (is the server using TLS? pass --tls-ca)" if tls_likely else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jds.client", description=DESCRIPTION)
    parser.add_argument("prompt", help="the prompt text (with --token-ids: ids separated by spaces or commas)")
    server_help = f"HOST[:PORT] of the server's gRPC API (default: %(default)s; port {DEFAULT_PORT} when none is given)"
    parser.add_argument("--server", type=_address, default=f"127.0.0.1:{DEFAULT_PORT}", help=server_help)
    prompt_kind = parser.add_mutually_exclusive_group()
    prompt_kind.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    prompt_kind.add_argument("--token-ids", action="store_true", help="the prompt is token ids")
    parser.add_argument("--tokens", action="store_true", help="print generated token ids instead of text")
    parser.add_argument("--json", action="store_true", help="print the final message as JSON")
    parser.add_argument("--max-tokens", type=_int32, default=128, help="tokens to generate at most (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=None, help="sample from the likeliest tokens up to this total probability (default: 1, off)")
    parser.add_argument("--top-k", type=_int32, default=None, help="sample from the k likeliest tokens (default: 0, off)")
    parser.add_argument("--seed", type=_seed, default=None, help="any 64-bit integer; a seed samples alike each time (default: random)")
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    parser.add_argument("--timeout", type=_seconds, default=None, help="deadline in seconds (default: none)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        request = build_request(args)
    except argparse.ArgumentTypeError as err:
        parser.error(f"argument --token-ids: {err}")
    credentials = Credentials.from_args(args)
    with credentials.channel(args.server) as channel:
        stub = pb_grpc.GenerationStub(channel)
        last = None
        try:
            for last in stub.Generate(request, timeout=args.timeout, metadata=credentials.metadata):
                if args.tokens:
                    print(*last.token_ids, end=" " if last.token_ids else "", flush=True)
                elif not args.json:
                    print(last.text, end="", flush=True)
        except grpc.RpcError as err:
            print(("\n" if last is not None else "") + _describe(err, credentials), file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(MessageToDict(last, preserving_proto_field_name=True), indent=2))
    else:
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
