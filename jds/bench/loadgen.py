"""The load generator: sends planned requests to a jds server on schedule and records what it sees.

Asynchronous (grpc.aio): each request is its own task started at its arrival time, so a slow
server never delays later arrivals (open-loop load, as the SLO metrics assume). Prompts are token
ids of exactly the planned length with ``ignore_eos``, so every request generates exactly its
planned output length.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import grpc
import numpy as np
from tqdm.auto import tqdm

from jds.api import generation_pb2 as pb
from jds.api import generation_pb2_grpc as pb_grpc
from jds.bench.metrics import RequestRecord
from jds.bench.workloads import PlannedRequest

FIRST_TOKEN_ID = 100  # stay clear of the special tokens at the start of most vocabularies


def prompt_ids(index: int, length: int, vocab_size: int, seed: int) -> list[int]:
    """A reproducible prompt of exactly ``length`` ordinary token ids."""
    rng = np.random.default_rng([seed, 3, index])
    return rng.integers(FIRST_TOKEN_ID, max(FIRST_TOKEN_ID + 1, vocab_size - 1), size=length).tolist()


async def _one(stub, index: int, planned: PlannedRequest, start: float, vocab_size: int, seed: int, timeout: float) -> RequestRecord:
    await asyncio.sleep(max(0.0, start + planned.arrival - time.perf_counter()))
    request = pb.GenerateRequest(
        token_ids=prompt_ids(index, planned.input_len, vocab_size, seed),
        max_tokens=planned.output_len,
        temperature=0.0,
        ignore_eos=True,
    )
    record = RequestRecord(planned.input_len, planned.output_len, sent=time.perf_counter() - start)
    try:
        async for message in stub.Generate(request, timeout=timeout):
            now = time.perf_counter() - start
            record.token_times += [now] * len(message.token_ids)
            if message.finish_reason:
                t = message.timings
                record.server = {"queue": t.queue, "prefill": t.prefill, "transfer": t.transfer, "ttft": t.ttft, "tpot": t.tpot}
        record.end = time.perf_counter() - start
    except grpc.aio.AioRpcError as err:
        record.error = f"{err.code().name}: {err.details()}"
    return record


async def _run(address: str, requests: Sequence[PlannedRequest], vocab_size: int, seed: int, timeout: float, desc: str) -> list[RequestRecord]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        start = time.perf_counter() + 0.05
        tasks = [asyncio.create_task(_one(stub, i, r, start, vocab_size, seed, timeout)) for i, r in enumerate(requests)]
        with tqdm(total=len(tasks), desc=desc, unit="req", leave=False) as bar:
            for task in asyncio.as_completed(tasks):
                await task
                bar.update()
        return [t.result() for t in tasks]


def run_load(address: str, requests: Sequence[PlannedRequest], vocab_size: int, seed: int = 0, timeout: float = 600.0, desc: str = "requests") -> list[RequestRecord]:
    """Send every request at its arrival time; one record per request, in plan order."""
    return asyncio.run(_run(address, requests, vocab_size, seed, timeout, desc))


def model_info(address: str, timeout: float = 30.0) -> pb.ModelInfoResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.GenerationStub(channel).ModelInfo(pb.ModelInfoRequest(), timeout=timeout)
