"""``python -m jds.client [--server HOST:PORT] PROMPT``: stream a generation from a jds server.

Text goes to stdout as it arrives; ``--tokens`` prints the token ids instead, ``--json`` prints the
final message (finish reason, usage, timings) as JSON. On an error the server's status and
message go to stderr and the exit code is 1. A server with keys takes ``--api-key`` (default
``$JDS_API_KEY``, its first key); one serving TLS, ``--tls-ca`` (the CA that signed its certificate).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from jds.api import generation_pb2 as pb
from jds.api import generation_pb2_grpc as pb_grpc


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
    parser.add_argument("--api-key", default=os.environ.get("JDS_API_KEY", "").split(",")[0].strip() or None, help="sent as a Bearer key")
    parser.add_argument("--tls-ca", default=None, help="PEM file of the CA of the server's certificate: connect over TLS")
    args = parser.parse_args(argv)
    metadata = (("authorization", f"Bearer {args.api_key}"),) if args.api_key else ()
    with _channel(args.server, args.tls_ca) as channel:
        stub = pb_grpc.GenerationStub(channel)
        last = None
        try:
            for last in stub.Generate(build_request(args), timeout=args.timeout, metadata=metadata):
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


def _channel(address: str, tls_ca: str | None) -> grpc.Channel:
    if tls_ca is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes()))


if __name__ == "__main__":
    sys.exit(main())
