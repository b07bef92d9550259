"""The load generator: sends planned requests to a jds server on schedule and records what it sees.

Through either front end: gRPC (``jds.v1``) or the OpenAI-compatible HTTP API, so one workload can
measure both. Asynchronous (grpc.aio, httpx): each request is its own task started at its arrival time, so a slow
server never delays later arrivals (open-loop load, as the SLO metrics assume). Prompts are token
ids of exactly the planned length with ``ignore_eos``, so every request generates exactly its
planned output length.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import Awaitable, Callable, Sequence

import grpc
import httpx
import numpy as np
from tqdm.auto import tqdm

from jds.api import generation_pb2 as pb
from jds.api import generation_pb2_grpc as pb_grpc
from jds.bench.metrics import RequestRecord
from jds.bench.workloads import PlannedRequest
from jds.client import Credentials

FIRST_TOKEN_ID = 100  # stay clear of the special tokens at the start of most vocabularies


def prompt_ids(index: int, planned: PlannedRequest, vocab_size: int, seed: int) -> list[int]:
    """A reproducible prompt of exactly ``planned.input_len`` ordinary token ids: random ones, or
    the shared system prompt and then its conversation's stream (``PlannedRequest``)."""
    if planned.conversation is None:
        return _ids(np.random.default_rng([seed, 3, index]), planned.input_len, vocab_size)
    system = _ids(np.random.default_rng([seed, 4]), planned.system, vocab_size)
    return system + _ids(np.random.default_rng([seed, 5, planned.conversation]), planned.input_len - planned.system, vocab_size)


def _ids(rng: np.random.Generator, n: int, vocab_size: int) -> list[int]:
    """The first ``n`` ids of ``rng``'s stream (a longer draw begins with a shorter one's ids)."""
    return rng.integers(FIRST_TOKEN_ID, max(FIRST_TOKEN_ID + 1, vocab_size - 1), size=n).tolist()


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    """What the load generator needs to know about a server, from either front end."""

    model: str
    max_seq_len: int
    vocab_size: int
    devices: int


async def _one(send: Sender, index: int, planned: PlannedRequest, start: float, info: ServerInfo, seed: int, timeout: float) -> RequestRecord:
    await asyncio.sleep(max(0.0, start + planned.arrival - time.perf_counter()))
    record = RequestRecord(planned.input_len, planned.output_len, sent=time.perf_counter() - start)
    ids = prompt_ids(index, planned, info.vocab_size, seed)
    await send(ids, planned.output_len, record, start, timeout)
    if record.error is None:
        record.end = time.perf_counter() - start
    return record


Sender = Callable[[list[int], int, RequestRecord, float, float], Awaitable[None]]


def _grpc_sender(stub: pb_grpc.GenerationStub, metadata: tuple) -> Sender:
    async def send(ids: list[int], max_tokens: int, record: RequestRecord, start: float, timeout: float) -> None:
        request = pb.GenerateRequest(token_ids=ids, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        try:
            async for message in stub.Generate(request, timeout=timeout, metadata=metadata):
                now = time.perf_counter() - start
                record.token_times += [now] * len(message.token_ids)
                if message.finish_reason:
                    t = message.timings
                    record.server = {"queue": t.queue, "prefill": t.prefill, "transfer": t.transfer, "ttft": t.ttft, "tpot": t.tpot}
                    record.server["cached_tokens"] = message.usage.cached_tokens
        except grpc.aio.AioRpcError as err:
            record.error = f"{err.code().name}: {err.details()}"

    return send


def _openai_sender(client: httpx.AsyncClient, model: str) -> Sender:
    """Streams ``/v1/completions``; ``return_token_ids`` says how many tokens each chunk carries."""

    async def send(ids: list[int], max_tokens: int, record: RequestRecord, start: float, timeout: float) -> None:
        body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
        body.update(ignore_eos=True, return_token_ids=True)
        try:
            async with client.stream("POST", "completions", json=body, timeout=timeout) as response:
                if response.status_code != 200:
                    await response.aread()
                    record.error = f"HTTP {response.status_code}: {response.text[:300]}"
                    return
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        record.error = f"stream error: {chunk['error'].get('message')}"
                        return
                    now = time.perf_counter() - start
                    for choice in chunk["choices"]:
                        record.token_times += [now] * len(choice.get("token_ids", ()))
        except httpx.HTTPError as err:
            record.error = f"{type(err).__name__}: {err}"

    return send


async def _run(
    address: str, api: str, requests: Sequence[PlannedRequest], info: ServerInfo, seed: int, timeout: float, desc: str, credentials: Credentials
) -> list[RequestRecord]:
    async with contextlib.AsyncExitStack() as stack:
        if api == "openai":
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)  # open loop: never queue on the client
            client = httpx.AsyncClient(
                base_url=openai_base(address, credentials), limits=limits, headers=credentials.headers, verify=credentials.verify()
            )
            send = _openai_sender(await stack.enter_async_context(client), info.model)
        else:
            channel = await stack.enter_async_context(credentials.channel(address, aio=True))
            send = _grpc_sender(pb_grpc.GenerationStub(channel), credentials.metadata)
        start = time.perf_counter() + 0.05
        tasks = [asyncio.create_task(_one(send, i, r, start, info, seed, timeout)) for i, r in enumerate(requests)]
        with tqdm(total=len(tasks), desc=desc, unit="req", leave=False) as bar:
            for task in asyncio.as_completed(tasks):
                await task
                bar.update()
        return [t.result() for t in tasks]


def run_load(
    address: str,
    requests: Sequence[PlannedRequest],
    info: ServerInfo,
    seed: int = 0,
    api: str = "grpc",
    timeout: float = 600.0,
    desc: str = "requests",
    credentials: Credentials = Credentials(),
) -> list[RequestRecord]:
    """Send every request at its arrival time through ``api`` (grpc or openai); one record per request, in plan order."""
    return asyncio.run(_run(address, api, requests, info, seed, timeout, desc, credentials))


def openai_base(address: str, credentials: Credentials = Credentials()) -> str:
    """``host:port`` or a full URL, as the base of the OpenAI API (``http://host:port/v1/``, https with a CA)."""
    url = address if "://" in address else f"{credentials.scheme}://{address}"
    url = url.rstrip("/")
    return (url if url.endswith("/v1") else f"{url}/v1") + "/"


def model_info(address: str, api: str = "grpc", timeout: float = 30.0, credentials: Credentials = Credentials()) -> ServerInfo:
    if api == "openai":
        url = openai_base(address, credentials) + "models"
        card = httpx.get(url, timeout=timeout, headers=credentials.headers, verify=credentials.verify()).raise_for_status().json()["data"][0]
        return ServerInfo(card["id"], card["max_model_len"], card["vocab_size"], card.get("devices", 1))
    with credentials.channel(address) as channel:
        info = pb_grpc.GenerationStub(channel).ModelInfo(pb.ModelInfoRequest(), timeout=timeout, metadata=credentials.metadata)
    return ServerInfo(info.model_name, info.max_seq_len, info.vocab_size, info.devices)
