"""Roles as real processes: ``python -m jds.launch`` runs a router, two prefill and two decode
instances of the tiny model (one of each tensor-parallel over two processes joined by
``jax.distributed``); the tests talk to the router as clients and to the instances as the router does,
and kill instances to see what survives.

Outputs are checked against the single-process offline API on the identical seeded model.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time

import grpc
import pytest
import yaml

from jds import LLM, SamplingParams
from jds.api import generation_pb2 as pb
from jds.api import instances_pb2 as ipb
from jds.api import instances_pb2_grpc as ipb_grpc
from jds.bench.server_process import ServerProcess
from local_ports import free_ports
from tests_paths import CONFIGS

MAX_SEQ_LEN = 128
SLOTS = 2
LEASE = 3.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cluster")
    config = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    config["model"]["max_seq_len"] = MAX_SEQ_LEN
    config["placement"] = {
        "mode": "disaggregated",
        # prefill1 and decode1 are tensor-parallel instances over two processes each (jax.distributed)
        "prefill": [{"devices": [0]}, {"devices": [1, 2], "tp": 2, "processes": 2}],
        # pages of 16: prompts within MAX_SEQ_LEN still fill several, for the prefix cache tests
        "decode": [{"devices": [3], "slots": SLOTS, "page_size": 16}, {"devices": [4, 5], "tp": 2, "slots": SLOTS, "processes": 2, "page_size": 16}],
    }
    ports = free_ports(6)
    config["cluster"] = {
        "prefill": [f"127.0.0.1:{p}" for p in ports[:2]],
        "decode": [f"127.0.0.1:{p}" for p in ports[2:4]],
        "coordinators": {"prefill1": f"127.0.0.1:{ports[4]}", "decode1": f"127.0.0.1:{ports[5]}"},
        "lease_seconds": LEASE,
        "health_seconds": 0.2,
        "pull_timeout_seconds": 10,
        "on_pull_failure": "reprefill",  # KV lost with a killed prefill process is prefilled again
    }
    # Compile afresh, without the run's shared cache either: the cancellation test needs a prefill
    # still compiling, not loaded from what another test compiled.
    config["server"] = {"max_waiting": 16, "compile_cache": None}
    (folder / "cluster.yaml").write_text(yaml.safe_dump(config))
    shared = os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    try:
        proc = ServerProcess(folder / "cluster.yaml", folder / "launch.log", "--no-warmup")
    finally:
        if shared is not None:
            os.environ["JAX_COMPILATION_CACHE_DIR"] = shared
    proc.config = config
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def server(cluster):  # the router, for conftest's ``stub``
    return cluster


@pytest.fixture(scope="module")
def offline(cluster):
    """The same model in one process, one device: the reference."""
    with LLM(cluster.log_path.parent / "cluster.yaml", placement={"instances": [{"devices": [0], "slots": 4}]}, progress=False) as llm:
        yield llm


def _instances(cluster, role: str) -> list:
    stub_type = ipb_grpc.PrefillInstanceStub if role == "prefill" else ipb_grpc.DecodeInstanceStub
    return [stub_type(grpc.insecure_channel(address)) for address in cluster.config["cluster"][role]]


def _status(cluster, role: str) -> list[ipb.InstanceStatus]:
    return [s.Status(ipb.InstanceStatusRequest(), timeout=5) for s in _instances(cluster, role)]


def _total(statuses, field: str) -> int:
    return sum(getattr(s, field) for s in statuses)


def _wait(condition, timeout: float = 20, what: str = "condition"):
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def _wait_status(cluster, role: str, predicate, what: str, timeout: float = 20) -> list[ipb.InstanceStatus]:
    """The instances' statuses once ``predicate`` holds for them."""
    found = []
    _wait(lambda: predicate(found.append(_status(cluster, role)) or found[-1]), timeout, what)
    return found[-1]


def _pid(cluster, name: str) -> int:
    return int(re.findall(rf"started {name} \(pid (\d+)\)", cluster.text())[-1])


def _generate(stub, ids, max_tokens: int, **options) -> list[int]:
    request = pb.GenerateRequest(token_ids=ids, max_tokens=max_tokens, ignore_eos=True, **{"temperature": 0.0, **options})
    return [t for m in stub.Generate(request, timeout=120) for t in m.token_ids]


PROMPTS = [[5 + i, 17, 99 + i, 4][: 2 + i % 3] * (1 + i % 2) for i in range(6)]


def test_outputs_equal_the_single_process_engine_and_every_instance_serves(cluster, stub, offline):
    info = stub.ModelInfo(pb.ModelInfoRequest())
    assert (info.slots_total, info.devices) == (2 * SLOTS, 6) and "disaggregated" in info.placement
    assert info.kv_pages_total == 2 * SLOTS * MAX_SEQ_LEN // 16  # the two decode processes' pages
    expected = offline.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    got: dict[int, list[int]] = {}

    def run(i: int) -> None:
        got[i] = _generate(stub, PROMPTS[i], 12)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(PROMPTS))] == [e.token_ids for e in expected]
    # Least loaded: both instances of each role took requests (a stream's last message reaches the
    # client just before its server counts it)
    _wait_status(cluster, "decode", lambda s: all(i.served > 0 for i in s), "every decode instance to serve")
    _wait_status(cluster, "prefill", lambda s: all(i.served > 0 for i in s), "every prefill instance to serve")

    sampled = offline.generate("Once upon a time", SamplingParams(max_tokens=10, temperature=0.8, seed=7, ignore_eos=True))[0]
    messages = list(stub.Generate(pb.GenerateRequest(text="Once upon a time", max_tokens=10, temperature=0.8, seed=7, ignore_eos=True), timeout=60))
    assert [t for m in messages for t in m.token_ids] == sampled.token_ids
    assert "".join(m.text for m in messages) == sampled.text
    assert messages[-1].timings.transfer_bytes > 0 and messages[-1].timings.ttft > 0

    # Penalties, a logit bias, log-probabilities and a prompt's scores cross the processes as they are computed in one.
    shaped = {"max_tokens": 6, "temperature": 0.8, "seed": 3, "repetition_penalty": 1.3, "presence_penalty": 0.5, "min_tokens": 2,
              "logit_bias": {100: 8.0, 200: -100.0}}  # fmt: skip
    expected = offline.generate([PROMPTS[3]], SamplingParams(**shaped, logprobs=2, prompt_logprobs=2, ignore_eos=True))[0]
    messages = list(stub.Generate(pb.GenerateRequest(token_ids=PROMPTS[3], ignore_eos=True, logprobs=2, prompt_logprobs=2, **shaped), timeout=60))
    assert [t for m in messages for t in m.token_ids] == expected.token_ids and 100 in expected.token_ids
    reported = [e for m in messages for e in m.logprobs]
    assert [e.logprob for e in reported] == pytest.approx([e.logprob for e in expected.logprobs], abs=1e-5)
    assert [list(e.top_ids) for e in reported] == [[t for t, _ in e.top] for e in expected.logprobs]
    scored = messages[0].prompt_logprobs
    assert not scored[0].HasField("logprob") and [e.logprob for e in scored[1:]] == pytest.approx([e.logprob for e in expected.prompt_logprobs[1:]], abs=1e-5)
    nothing = list(stub.Generate(pb.GenerateRequest(token_ids=PROMPTS[3], max_tokens=0, prompt_logprobs=0), timeout=60))
    assert nothing[-1].finish_reason == pb.FINISH_REASON_LENGTH and not nothing[-1].token_ids and len(nothing[0].prompt_logprobs) == len(PROMPTS[3])


def test_a_prompt_repeated_on_a_one_process_prefill_instance_reuses_its_cached_pages(cluster, stub, offline):
    shared = [(13 * j) % 3000 + 5 for j in range(40)]  # two full pages of 16, and 8 tokens more
    before = stub.ModelInfo(pb.ModelInfoRequest())
    expected = offline.generate([shared], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].token_ids
    runs = []
    for _ in range(2):  # one at a time: the first to the least loaded prefill instance, the first (one process, caching); the second after it
        messages = list(stub.Generate(pb.GenerateRequest(token_ids=shared, max_tokens=8, temperature=0.0, ignore_eos=True), timeout=60))
        runs.append(([t for m in messages for t in m.token_ids], messages[-1].usage.cached_tokens))
    assert runs == [(expected, 0), (expected, 32)]
    info = _wait(
        lambda: (i := stub.ModelInfo(pb.ModelInfoRequest())).prefix_cache_hit_tokens > before.prefix_cache_hit_tokens and i,
        what="the prefill instance's status to report the hit",
    )
    assert info.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens == 32
    assert info.prefix_cache_queried_tokens - before.prefix_cache_queried_tokens == 80  # two lookups of 40 positions
    # prefill0's pool at rest: every page in use is one its cache keeps (the shared prompt's two, and
    # those of earlier prompts), and each can be taken; the router reports them.
    (cached, _) = _status(cluster, "prefill")
    assert cached.kv_pages_total == 8 * MAX_SEQ_LEN // 16 and cached.kv_pages_used >= 2 and cached.kv_pages_free == cached.kv_pages_total
    info = _wait(
        lambda: (i := stub.ModelInfo(pb.ModelInfoRequest())).prefill_kv_pages_in_use == cached.kv_pages_used and i,
        what="the router to report prefill0's pages",
    )
    assert info.prefill_kv_pages_total == cached.kv_pages_total


def test_cancellation_reaches_the_decode_and_the_prefill_process(cluster, stub):
    before = _total(_status(cluster, "decode"), "aborted")
    call = stub.Generate(pb.GenerateRequest(token_ids=[1, 2, 3], max_tokens=120, temperature=0, ignore_eos=True), timeout=60)
    assert next(call).token_ids and next(call).token_ids
    call.cancel()
    idle = lambda s: _total(s, "running") == 0 and _total(s, "slots_free") == 2 * SLOTS  # noqa: E731  (the slot frees at the next step)
    statuses = _wait_status(cluster, "decode", idle, "decode idle")
    assert _total(statuses, "aborted") == before + 1

    before = _total(_status(cluster, "prefill"), "aborted")
    long_prompt = list(range(100, 200))  # a length bucket not compiled yet: prefill is still busy when the cancel comes
    call = stub.Generate(pb.GenerateRequest(token_ids=long_prompt, max_tokens=8, temperature=0), timeout=60)
    _wait_status(cluster, "prefill", lambda s: _total(s, "running") == 1, "the prefill call to reach an instance")
    call.cancel()
    statuses = _wait_status(cluster, "prefill", lambda s: _total(s, "aborted") == before + 1, "prefill abort")
    assert _total(statuses, "running") == 0
    assert stub.ModelInfo(pb.ModelInfoRequest()).running == 0


def test_kv_nobody_pulls_is_released_after_its_lease_and_a_late_pull_fails_clearly(cluster):
    prefill = _instances(cluster, "prefill")[0]
    decode = _instances(cluster, "decode")[0]
    sampling = ipb.Sampling(temperature=0, top_p=1, max_tokens=6)
    _wait(lambda: prefill.Status(ipb.InstanceStatusRequest()).kv_offered == 0, timeout=LEASE + 5, what="earlier offers' leases")
    before = 0
    answer = prefill.Prefill(ipb.PrefillRequest(request_id="lease", prompt_ids=[3, 4, 5], sampling=sampling), timeout=60)
    assert answer.HasField("kv") and [a.dims[1] for a in answer.kv.arrays] == [1, 1]  # K and V of the one page its prompt fills
    assert prefill.Status(ipb.InstanceStatusRequest()).kv_offered == before + 1
    _wait(lambda: prefill.Status(ipb.InstanceStatusRequest()).kv_offered == before, timeout=LEASE + 5, what="lease end")

    late = ipb.DecodeRequest(request_id="late", prompt_ids=[3, 4, 5], first_token=answer.first_token, sampling=sampling, kv=answer.kv)
    with pytest.raises(grpc.RpcError) as err:
        list(decode.Decode(late, timeout=30))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "lease" in err.value.details()
    assert decode.Status(ipb.InstanceStatusRequest()).slots_free == SLOTS

    again = prefill.Prefill(ipb.PrefillRequest(request_id="release", prompt_ids=[3, 4, 5], sampling=sampling), timeout=60)
    assert prefill.Release(ipb.ReleaseRequest(uuid=again.kv.uuid)).released
    assert prefill.Status(ipb.InstanceStatusRequest()).kv_offered == before
    assert not prefill.Release(ipb.ReleaseRequest(uuid=again.kv.uuid)).released  # once only


def test_a_killed_decode_process_fails_only_its_requests_and_serves_again_after_restart(cluster, stub, offline):
    long = pb.GenerateRequest(token_ids=[7, 8, 9], max_tokens=110, temperature=0, ignore_eos=True)
    first, second = stub.Generate(long, timeout=120), stub.Generate(long, timeout=120)
    head = [next(first).token_ids[0], next(second).token_ids[0]]
    running = _wait_status(cluster, "decode", lambda s: all(x.running == 1 for x in s), "one request per decoder")
    served_before = [s.served for s in running]
    victim = 0
    os.kill(_pid(cluster, f"decode{victim}"), signal.SIGKILL)
    outcomes = []
    for call in (first, second):
        try:
            outcomes.append(("ok", [t for m in call for t in m.token_ids]))
        except grpc.RpcError as err:
            outcomes.append((err.code(), err.details()))
    expected = offline.generate([[7, 8, 9]], SamplingParams(max_tokens=110, temperature=0, ignore_eos=True))[0].token_ids
    failed = [o for o in outcomes if o[0] == grpc.StatusCode.UNAVAILABLE]
    finished = [o for o in outcomes if o[0] == "ok"]
    assert len(failed) == 1 and "decode0 became unavailable" in failed[0][1], outcomes
    assert len(finished) == 1 and head[outcomes.index(finished[0])] == expected[0] and finished[0][1] == expected[1:]

    while_down = [_generate(stub, [1, 2], 4) for _ in range(3)]  # the router stops routing to the dead one
    assert len(set(map(tuple, while_down))) == 1

    def served_since_the_kill() -> int:
        """What the survivor served since, plus what a restarted decode0 (counting from 0) served."""
        total = -served_before[1]
        for instance in _instances(cluster, "decode"):
            try:
                total += instance.Status(ipb.InstanceStatusRequest(), timeout=5).served
            except grpc.RpcError:  # decode0 still down
                pass
        return total

    # the long request that survived and the three; a stream's last message reaches the client
    # just before its server counts it, and decode0 may be back in time to take some of them
    _wait(lambda: served_since_the_kill() >= 1 + 3, 10, "the decoders' count of what they served")
    _wait(lambda: len(re.findall(r"decode0 at \S+ is serving: in rotation", cluster.text())) >= 2, 90, "decode0 back in rotation")
    threads = [threading.Thread(target=_generate, args=(stub, [4, 5, 6], 20)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _wait_status(cluster, "decode", lambda s: s[0].served >= 1, "the restarted instance to serve")  # in rotation again


def test_a_killed_prefill_process_hands_its_requests_to_the_other(cluster, stub, offline):
    expected = offline.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    got: dict[int, list[int] | str] = {}

    def run(i: int) -> None:
        try:
            got[i] = _generate(stub, PROMPTS[i], 6)
        except grpc.RpcError as err:
            got[i] = f"{err.code().name}: {err.details()}"

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    os.kill(_pid(cluster, "prefill0"), signal.SIGKILL)
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(PROMPTS))] == [e.token_ids for e in expected]
    _wait(lambda: "prefill0 exited" in cluster.text(), what="the launcher noticing")


def test_the_launcher_stops_every_process_and_frees_every_port(cluster):
    names = ["router", "prefill0", "prefill1", r"prefill1\.1", "decode0", "decode1", r"decode1\.1"]
    pids = [int(p) for name in names for p in re.findall(rf"started {name} \(pid (\d+)\)", cluster.text())]
    assert cluster.stop() == 0
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower(), pid
    for address in [*cluster.config["cluster"]["prefill"], *cluster.config["cluster"]["decode"], cluster.address]:
        host, port = address.split(":")
        with socket.socket() as s:
            assert s.connect_ex((host, int(port))) != 0, f"{address} still accepts connections"


def test_the_router_policies_pick_the_least_loaded_or_in_turn_and_skip_unhealthy_instances():
    from jds.cluster.registry import Instance, Registry

    def decoder(name: str, free: int, committed: int, healthy: bool = True) -> Instance:
        status = ipb.InstanceStatus(slots_total=4, slots_free=free, max_seq_len=MAX_SEQ_LEN, kv_pages_total=64, kv_pages_committed=committed)
        return Instance(name, "decode", "unused", None, None, healthy=healthy, status=status)

    never = threading.Event()
    least = Registry([], [], 60, "least_loaded")
    least.instances += [decoder("busy", 3, 40), decoder("idle", 4, 0), decoder("down", 4, 0, healthy=False)]
    picks = [least.acquire("decode", 10, 1, never, pages=8) for _ in range(5)]
    # idle, while it has a slot and more pages left than busy's 24 (each request sent commits 8);
    # then its four slots are all taken by requests sent there, and busy has one free
    assert [i.name for i in picks] == ["idle"] * 4 + ["busy"]
    least.release(picks[0], pages=8)
    assert least.acquire("decode", 10, 1, never, pages=8).name == "idle"  # 40 pages left against busy's 24
    assert least.acquire("decode", MAX_SEQ_LEN + 1, 0.1, never) is None  # nothing holds that many positions
    least.instances.clear()  # no channels to close
    least.close()

    turns = Registry([], [], 60, "round_robin")
    turns.instances += [decoder("a", 1, 0), decoder("b", 4, 0), decoder("down", 4, 0, healthy=False)]
    assert {turns.acquire("decode", 10, 1, never).name for _ in range(4)} == {"a", "b"}
    turns.instances.clear()
    turns.close()


def test_cache_aware_routing_sends_a_prompt_where_its_leading_pages_went_unless_that_instance_is_far_busier():
    from jds.cluster.registry import Instance, Registry
    from jds.scheduling.pages import page_keys

    def prefiller(name: str, pages: int) -> Instance:
        status = ipb.InstanceStatus(role="prefill", max_seq_len=MAX_SEQ_LEN, kv_pages_total=pages, kv_pages_free=pages, prefix_cache_queried_tokens=80)
        return Instance(name, "prefill", "unused", None, None, healthy=True, status=status)

    never = threading.Event()
    registry = Registry([], [], 60, "cache_aware", cache_balance=2)
    a, b, uncached = prefiller("a", 64), prefiller("b", 64), prefiller("uncached", 0)
    registry.instances += [a, b, uncached]
    system = list(range(100, 148))  # three full pages of 16 every conversation starts with

    def send(prompt: list[int]) -> str:
        return registry.acquire("prefill", len(prompt), 1, never, keys=page_keys(prompt, 16)).name

    assert send(system + [1] * 20) == "a"  # nothing sent anywhere yet: the least loaded, the first on ties
    assert send(system + [2] * 20) == "a"  # the shared pages went to a, one request busier than the idlest
    assert send([7] * 40) == "b"  # no page of it went anywhere: the least loaded
    assert send(system + [3] * 20) == "a"  # two busier than the idlest: still within the balance
    assert send(system + [4] * 20) == "uncached"  # three busier: the least loaded takes it
    assert len(uncached.prefixes) == 0  # an instance without a prefix cache is remembered as holding nothing
    assert [i.in_flight for i in (a, b, uncached)] == [3, 1, 1]
    assert len(a.prefixes) == 3 + 3  # the shared pages once, and the fourth page of each of its three conversations

    small = prefiller("small", 4)
    small.prefixes.add(page_keys(list(range(200)), 16), small.status.kv_pages_total)
    assert len(small.prefixes) == 4 and small.prefixes.matched(page_keys(list(range(200)), 16)) == 0  # the oldest went first

    class Restarted:  # answers as a process that started again since the last check: its counters are back at 0
        def Status(self, request, timeout):
            return ipb.InstanceStatus(role="prefill", max_seq_len=MAX_SEQ_LEN, kv_pages_total=64)

    a.stub = Restarted()
    assert registry.check(a) and len(a.prefixes) == 0
    b.prefixes.add(page_keys(system, 16), 64)
    registry.mark_down(b, "test")
    assert len(b.prefixes) == 0  # it may come back as a new process
    registry.instances.clear()
    registry.close()
