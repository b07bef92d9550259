"""``python -m jds.client [--server HOST:PORT] PROMPT``: stream a generation from a jds server.

Text goes to stdout as it arrives; ``--tokens`` prints the token ids instead, ``--json`` prints the
final message (finish reason, usage, timings) as JSON. On an error the server's status and
message go to stderr and the exit code is 1. A server with keys takes ``--api-key`` (default
``$JDS_API_KEY``, its first key); one serving TLS, ``--tls-ca`` (the CA that signed its certificate).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import ssl
import sys
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from jds.api import generation_pb2 as pb
from jds.api import generation_pb2_grpc as pb_grpc


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--api-key`` (default: the first key of ``$JDS_API_KEY``) and ``--tls-ca``."""
    parser.add_argument("--api-key", default=os.environ.get("JDS_API_KEY", "").split(",")[0].strip() or None, help="sent as a Bearer key")
    parser.add_argument("--tls-ca", default=None, help="PEM file of the CA of the server's certificate: connect over TLS")


def build_request(args: argparse.Namespace) -> pb.GenerateRequest:
    request = pb.GenerateRequest(max_tokens=args.max_tokens, temperature=args.temperature, stop=args.stop)
    if args.top_p is not None:
        request.top_p = args.top_p
    if args.top_k is not None:
        request.top_k = args.top_k
    if args.seed is not None:
        request.seed = args.seed
    if args.chat:
        request.messages.append(pb.ChatMessage(role="user", content=args.prompt))
    elif args.token_ids:
        request.token_ids.extend(int(t) for t in args.prompt.replace(",", " ").split())
    else:
        request.text = args.prompt
    return request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jds.client", description=__doc__.splitlines()[0])
    parser.add_argument("prompt", help="the prompt text (with --token-ids: ids separated by spaces or commas)")
    parser.add_argument("--server", default="127.0.0.1:50051")
    parser.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    parser.add_argument("--token-ids", action="store_true", help="the prompt is token ids")
    parser.add_argument("--tokens", action="store_true", help="print generated token ids instead of text")
    parser.add_argument("--json", action="store_true", help="print the final message as JSON")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    parser.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    add_arguments(parser)
    args = parser.parse_args(argv)
    credentials = Credentials.from_args(args)
    with credentials.channel(args.server) as channel:
        stub = pb_grpc.GenerationStub(channel)
        last = None
        try:
            for last in stub.Generate(build_request(args), timeout=args.timeout, metadata=credentials.metadata):
                if args.tokens:
                    print(*last.token_ids, end=" " if last.token_ids else "", flush=True)
                elif not args.json:
                    print(last.text, end="", flush=True)
        except grpc.RpcError as err:
            print(f"\nerror: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(MessageToDict(last, preserving_proto_field_name=True), indent=2))
    else:
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
