"""The OpenAI-compatible HTTP API of a real server subprocess, driven by the official ``openai`` client.

Tokens are checked against the offline API on the identical seeded model; refusals against the
field they name; disconnects against the server's own slot count (over gRPC, which the same
process serves) and its abort counter.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable

import httpx
import openai
import pytest

from jds import SamplingParams
from jds.api import generation_pb2 as pb
from jds.config.placement import DEFAULT_PAGE_SIZE
from jds.engine.request import Request
from tiny_server import MAX_SEQ_LEN, SLOTS, aborted_requests, wait_idle

MODEL = "tiny-random"
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def test_models_and_health(server, client):
    (card,) = client.models.list().data
    assert card.id == MODEL and card.object == "model" and card.created > 1_700_000_000  # when serving began
    assert (card.max_model_len, card.vocab_size) == (MAX_SEQ_LEN, 49152)
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    health = httpx.get(server.openai_url.removesuffix("/v1") + "/health", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "serving"}


def test_tokenize_detokenize_version_and_metrics_as_vllm_serves_them(server, offline):
    from importlib.metadata import version

    root = server.openai_url.removesuffix("/v1")
    with httpx.Client(base_url=root, timeout=30) as http:
        expected = offline.generate("The quick brown fox", SamplingParams(max_tokens=1))[0].prompt_token_ids
        answer = http.post("/tokenize", json={"model": MODEL, "prompt": "The quick brown fox"}).json()
        assert answer == {"count": len(expected), "max_model_len": MAX_SEQ_LEN, "tokens": list(expected)}
        plain = http.post("/tokenize", json={"prompt": "The quick brown fox", "add_special_tokens": False}).json()["tokens"]
        tokenizer = offline.engine.model.tokenizer
        assert plain == tokenizer.encode("The quick brown fox", add_special=False)
        chat = [{"role": "user", "content": "Say hi"}]
        expected = offline.chat(chat, SamplingParams(max_tokens=1))[0].prompt_token_ids
        assert http.post("/tokenize", json={"messages": chat}).json()["tokens"] == list(expected)
        assert http.post("/detokenize", json={"tokens": list(expected)}).json() == {"prompt": tokenizer.decode(expected, skip_special=False)}
        long = http.post("/tokenize", json={"prompt": "fox " * MAX_SEQ_LEN}).json()  # counted, though no request could hold it
        assert long["count"] > MAX_SEQ_LEN and http.post("/tokenize", json={"prompt": "", "add_special_tokens": False}).json()["count"] == 0
        for path, body, param in [("/tokenize", {"prompt": "a", "messages": chat}, "prompt"), ("/tokenize", {}, "prompt"),
                                  ("/detokenize", {"tokens": [49152]}, "tokens"), ("/tokenize", {"prompt": "a", "frobnicate": 1}, "frobnicate")]:  # fmt: skip
            refused = http.post(path, json=body)
            assert refused.status_code == 400 and refused.json()["error"]["param"] == param, refused.text
        assert http.post("/tokenize", json={"model": "gpt-4", "prompt": "a"}).status_code == 404
        assert http.get("/version").json() == {"version": version("jds")}
        metrics = http.get("/metrics")
        assert metrics.status_code == 200 and f"\njds_slots_total {SLOTS}.0\n" in metrics.text  # the server's own registry


def test_a_repeated_prompt_reports_the_tokens_the_prefix_cache_held(client):
    held = 2 * DEFAULT_PAGE_SIZE
    prompt = list(range(4100, 4100 + held + 8))  # two full pages before its last token, and 8 tokens more
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, **GREEDY)
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, **GREEDY)
    assert (first.usage.prompt_tokens_details.cached_tokens, again.usage.prompt_tokens_details.cached_tokens) == (0, held)
    assert again.choices[0].text == first.choices[0].text


def test_completion_matches_the_offline_api_with_usage(client, offline):
    expected = offline.generate("The quick brown fox", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    answer = client.completions.create(
        model=MODEL, prompt="The quick brown fox", max_tokens=12, temperature=0, extra_body={"ignore_eos": True, "return_token_ids": True}
    )
    (choice,) = answer.choices
    assert answer.object == "text_completion" and answer.model == MODEL and answer.id.startswith("cmpl-")
    assert choice.text == expected.text and choice.finish_reason == "length"
    assert choice.model_extra["token_ids"] == expected.token_ids
    assert choice.model_extra["prompt_token_ids"] == expected.prompt_token_ids
    usage = answer.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(expected.prompt_token_ids), 12)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    by_ids = client.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=6, **GREEDY)
    assert by_ids.choices[0].text == offline.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0].text
    batch_of_one = client.completions.create(model=MODEL, prompt=["The quick brown fox"], max_tokens=12, **GREEDY)
    assert batch_of_one.choices[0].text == expected.text


def test_seeded_sampling_matches_the_offline_api(client, offline):
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    expected = offline.generate("Once upon a time", params)[0]
    answer = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0.9, top_p=0.95, seed=1234, extra_body={"ignore_eos": True}
    )
    assert answer.choices[0].text == expected.text

    shaped = {"min_p": 0.05, "min_tokens": 4, "presence_penalty": 0.7, "frequency_penalty": 0.3, "repetition_penalty": 1.2}
    expected = offline.generate("Once upon a time", SamplingParams(max_tokens=10, temperature=0.9, seed=99, **shaped))[0]
    extra = {k: v for k, v in shaped.items() if k not in ("presence_penalty", "frequency_penalty")}
    answer = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0.9, seed=99, presence_penalty=0.7, frequency_penalty=0.3,
        extra_body={**extra, "return_token_ids": True},
    )
    assert answer.choices[0].model_extra["token_ids"] == expected.token_ids


def test_n_choices_and_batched_prompts_are_what_the_offline_api_gives_each(client, offline):
    seeded = {"max_tokens": 8, "temperature": 1.0, "seed": 7}
    # choice j of a seeded request samples with seed + j
    expected = [offline.generate("Once upon a time", SamplingParams(**{**seeded, "seed": 7 + j}, ignore_eos=True))[0] for j in range(3)]
    answer = client.completions.create(model=MODEL, prompt="Once upon a time", n=3, **seeded, extra_body={"ignore_eos": True})
    assert [(c.index, c.text) for c in answer.choices] == [(j, e.text) for j, e in enumerate(expected)]
    assert len({e.text for e in expected}) > 1  # the choices differ
    assert answer.usage.prompt_tokens == len(expected[0].prompt_token_ids)  # the prompt counted once
    assert answer.usage.completion_tokens == 3 * 8

    prompts = ["The quick brown fox", "Once upon a time"]
    greedy = offline.generate(prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    batch = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=6, **GREEDY)
    assert [(c.index, c.text) for c in batch.choices] == [(0, greedy[0].text), (1, greedy[0].text), (2, greedy[1].text), (3, greedy[1].text)]
    assert batch.usage.prompt_tokens == sum(len(g.prompt_token_ids) for g in greedy)
    ids = [list(g.prompt_token_ids) for g in greedy]  # a batch of token id lists, echoed
    echoed = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, echo=True, **GREEDY)
    assert [c.text for c in echoed.choices] == [p + g.text for p, g in zip(prompts, greedy)]

    chunks = list(client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, stream=True, stream_options={"include_usage": True}, **GREEDY))
    streamed = {i: "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in (0, 1)}
    assert streamed == {0: greedy[0].text, 1: greedy[1].text}
    assert chunks[-1].usage.completion_tokens == 12 and [c.choices[0].finish_reason for c in chunks if c.choices].count("length") == 2


def test_logit_bias_forces_and_bans_tokens_as_the_offline_api(client, offline):
    plain = offline.generate("Once upon a time", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    banned = {str(plain.token_ids[0]): -100}  # the greedy first token, banned
    expected = offline.generate("Once upon a time", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logit_bias={plain.token_ids[0]: -100}))[0]
    answer = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, logit_bias=banned, **GREEDY)
    assert answer.choices[0].text == expected.text and plain.token_ids[0] not in expected.token_ids
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, logit_bias={"4242": 100}, temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )  # fmt: skip
    assert chat.choices[0].model_extra["token_ids"] == [4242] * 4  # a bias of 100 all but forces its token


def test_chat_n_choices_whole_and_streamed(client, offline):
    conversation = [{"role": "user", "content": "Say hi"}]
    expected = [offline.chat(conversation, SamplingParams(max_tokens=6, temperature=1.0, seed=3 + j, ignore_eos=True))[0] for j in range(2)]
    whole = client.chat.completions.create(model=MODEL, messages=conversation, n=2, max_tokens=6, temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    assert [(c.index, c.message.content) for c in whole.choices] == [(j, e.text) for j, e in enumerate(expected)]
    stream = client.chat.completions.create(model=MODEL, messages=conversation, n=2, max_tokens=6, temperature=1.0, seed=3, stream=True, extra_body={"ignore_eos": True})
    chunks = [c.choices[0] for c in stream]
    assert [c.index for c in chunks if c.delta.role == "assistant"] == [0, 1]  # each choice opens with the role
    assert ["".join(c.delta.content or "" for c in chunks if c.index == j) for j in (0, 1)] == [e.text for e in expected]


def test_chat_whole_and_streamed_agree_with_the_offline_api(client, offline):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    expected = offline.chat(conversation, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    whole = client.chat.completions.create(model=MODEL, messages=conversation, max_completion_tokens=10, **GREEDY)
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    message = whole.choices[0].message
    assert (message.role, message.content, whole.choices[0].finish_reason) == ("assistant", expected.text, "length")
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(expected.prompt_token_ids), 10)

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=conversation,
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
            temperature=0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in content) == expected.text
    assert [t for c in content[1:] for t in c.choices[0].model_extra["token_ids"]] == expected.token_ids
    assert all(len(c.choices[0].model_extra["token_ids"]) == 1 for c in content[1:])  # one chunk per step
    assert [c.choices[0].finish_reason for c in content][-1] == "length"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10

    developer = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, {"role": "user", "content": "Say hi"}]
    for messages in (developer, parts):
        again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, **GREEDY)
        assert again.choices[0].message.content == expected.text


def test_stop_sequences_cut_the_text_and_finish_with_stop(client):
    full = client.completions.create(model=MODEL, prompt="Counting:", max_tokens=30, **GREEDY).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop, full
    cut = client.completions.create(model=MODEL, prompt="Counting:", max_tokens=30, stop=[stop, "\x00never"], **GREEDY)
    assert cut.choices[0].text == full[: full.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt="Counting:", max_tokens=30, stop=stop, stream=True, **GREEDY)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == full[: full.find(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
BAD = [
    ({"extra_body": {"best_effort": True}}, "best_effort", "is not a supported field"),
    ({"n": 0}, "n", "must be at least 1"),
    ({"n": 33, "prompt": ["a", "b"]}, "n", r"at most 64 choices per request \(prompts x n\); got 2 x 33"),
    ({"prompt": ["a"] * 65}, "prompt", "at most 64 prompts per request"),
    ({"prompt": [[1, 2], [1, 49152]]}, "prompt[1]", r"ids must be in \[0, 49152\)"),
    ({"temperature": -1}, "temperature", "must be a finite number >= 0"),
    ({"top_p": 1.5}, "top_p", r"must be in \(0, 1\]"),
    ({"max_tokens": -1}, "max_tokens", "must be an integer >= 0"),
    ({"max_tokens": 1000}, "max_tokens", "1000 is beyond the limit"),
    ({"prompt": [1] * MAX_SEQ_LEN}, "prompt", "the prompt has"),
    ({"prompt": [1, 49152]}, "prompt", r"ids must be in \[0, 49152\)"),
    ({"prompt": 7}, "prompt", ""),
    ({"temperature": "hot"}, "temperature", ""),
    ({"presence_penalty": 2.5}, "presence_penalty", r"must be in \[-2, 2\]"),
    ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty", "must be a finite number > 0"),
    ({"extra_body": {"min_tokens": 5}}, "min_tokens", r"must be at most max_tokens \(2\)"),
    ({"logprobs": 21}, "logprobs", r"must be an integer in \[0, 20\]"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "is only allowed when stream is true"),
    ({"stop": [""]}, "stop", "must be non-empty strings"),
    ({"extra_body": {"stop_token_ids": [60000]}}, "stop_token_ids", "ids must be in"),
    ({"logit_bias": {"fox": 1}}, "logit_bias", "keys must be token ids, got 'fox'"),
    ({"logit_bias": {"7": -101}}, "logit_bias", r"values must be in \[-100, 100\]"),
    ({"logit_bias": {"49152": 1}}, "logit_bias", r"ids must be in \[0, 49152\)"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "at most 300 tokens"),
]


@pytest.mark.parametrize("fields, param, message", BAD, ids=[f"{p}-{i}" for i, (_, p, _) in enumerate(BAD)])
def test_bad_completion_fields_are_400_naming_the_field(client, fields, param, message):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**{**COMPLETION, **fields})
    assert err.value.status_code == 400 and err.value.body["param"] == param
    assert re.match(rf"{re.escape(param)}: {message}", err.value.body["message"]), err.value.body
    assert client.completions.create(**COMPLETION).choices[0].finish_reason in ("stop", "length")


CHAT_BAD = [
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "must be one of"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content[0].type", "only text parts are supported; got 'image_url'"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "txt": "x"}]}]}, "messages[0].content[0].text", "a text part's text must be a string; got nothing"),
    ({"messages": [{"role": "user", "content": "x", "tool_call_id": "1"}]}, "messages[0].tool_call_id", "is not a supported field"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "tool calling is not supported"),
    ({"response_format": {"type": "json_object"}}, "response_format", "only type 'text'"),
    ({"max_tokens": 3, "max_completion_tokens": 3}, "max_completion_tokens", "give max_completion_tokens or max_tokens"),
    ({"max_completion_tokens": -2}, "max_completion_tokens", "must be an integer >= 0"),
]


@pytest.mark.parametrize("fields, param, message", CHAT_BAD, ids=[p for _, p, _ in CHAT_BAD])
def test_bad_chat_fields_are_400_naming_the_field(client, fields, param, message):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**{"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields})
    assert err.value.body["param"] == param and err.value.body["message"].startswith(f"{param}: {message}"), err.value.body


def test_a_request_id_names_every_choice_within_the_id_limit(client):
    def create(request_id: str, n: int):
        return client.completions.with_raw_response.create(
            model=MODEL, prompt="hi", n=n, max_tokens=1, extra_headers={"x-request-id": request_id}, **GREEDY
        )

    # 4 choices append '-0' .. '-3' to the id: the header may use all but 2 of the 256 characters
    with pytest.raises(openai.BadRequestError) as err:
        create("a" * 255, 4)
    assert err.value.body["param"] == "x-request-id"
    assert err.value.body["message"] == "x-request-id: at most 254 characters for a call of 4 choices (each choice's id adds '-N'), got 255"
    reply = create("b" * 254, 4)
    assert reply.headers["x-request-id"] == "b" * 254 and len(reply.parse().choices) == 4
    for n in (1, 4):  # the id as sent: its own limit, and never empty
        with pytest.raises(openai.BadRequestError) as err:
            create("c" * 257, n)
        assert err.value.body["message"] == "x-request-id: at most 256 characters, got 257"
        with pytest.raises(openai.BadRequestError) as err:
            create("", n)
        assert err.value.body["message"] == "x-request-id: must not be empty when given"


def test_a_reused_request_id_runs_beside_the_one_still_running(server, client, stub):
    """Proxies, tracing and a client's retry reuse X-Request-Id: the second call is served, not refused."""
    url, headers = server.openai_url + "/completions", {"x-request-id": "reused"}
    body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 400, "stream": True, "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as first:
        assert next(first.iter_lines()).startswith("data: ")  # the first is running
        second = httpx.post(url, json={**body, "stream": False, "max_tokens": 2}, headers=headers, timeout=60)
        assert second.status_code == 200 and second.headers["x-request-id"] == "reused"
        assert second.json()["id"] == "cmpl-reused" and second.json()["usage"]["completion_tokens"] == 2
    assert wait_idle(stub).running == 0


def test_a_reused_request_id_runs_under_an_id_within_the_limit():
    from jds.engine.running import DuplicateRequestId
    from jds.intake import MAX_REQUEST_ID_CHARS
    from jds.serving.admission import admit_all

    class Engine:  # one request already runs under the longest id
        running = {"r" * MAX_REQUEST_ID_CHARS}

        def submit(self, request):
            if request.request_id in self.running:
                raise DuplicateRequestId(request.request_id)
            self.running.add(request.request_id)
            return None

    accepting = threading.Event()
    accepting.set()
    request = Request("r" * MAX_REQUEST_ID_CHARS, (1, 2), SamplingParams(), 0)
    [(admitted, _)] = admit_all(Engine(), accepting, None, lambda: [request], unique_ids=True)
    assert admitted.request_id != request.request_id and len(admitted.request_id) == MAX_REQUEST_ID_CHARS
    assert admitted.request_id.startswith("r" * 200)


def test_vllm_values_for_top_k_and_seed_are_taken(client):
    """Older vLLM clients send top_k -1 for no filter; vLLM takes any 64-bit seed (folded here to 32 bits)."""
    sample = lambda **options: client.completions.create(  # noqa: E731
        model=MODEL, prompt=[1, 2, 3], max_tokens=6, temperature=1.0, extra_body={"ignore_eos": True, **options}
    ).choices[0].text
    assert sample(top_k=-1, seed=5) == sample(top_k=0, seed=5)
    assert sample(seed=-1) == sample(seed=2**32 - 1) == sample(seed=2**64 - 1 - 2**63)
    two = client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=6, temperature=1.0, n=2, seed=-1, extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(two.choices, key=lambda c: c.index)] == [sample(seed=-1), sample(seed=0)]  # choice j: seed + j
    with pytest.raises(openai.BadRequestError) as err:
        sample(seed=2**63)
    assert err.value.body["param"] == "seed"


def test_a_405_says_what_is_allowed_and_browsers_may_call(server):
    url = server.openai_url + "/completions"
    wrong = httpx.get(url, timeout=10)
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert wrong.json()["error"]["type"] == "invalid_request_error"
    preflight = httpx.options(
        url, headers={"origin": "https://example.org", "access-control-request-method": "POST", "access-control-request-headers": "authorization"},
        timeout=10,
    )  # fmt: skip
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] in ("*", "https://example.org")
    assert "POST" in preflight.headers["access-control-allow-methods"]
    answer = httpx.post(url, json={**COMPLETION, "max_tokens": 1}, headers={"origin": "https://example.org", "x-request-id": "cors"}, timeout=60)
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] in ("*", "https://example.org")
    assert "x-request-id" in answer.headers["access-control-expose-headers"].lower()  # a page may read the id back


def test_unknown_model_is_404_and_raw_garbage_is_400(server, client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(**{**COMPLETION, "model": "gpt-4"})
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    garbage = httpx.post(server.openai_url + "/completions", content=b"{not json", headers={"content-type": "application/json"}, timeout=10)
    assert garbage.status_code == 400 and "error" in garbage.json()


def test_overload_is_429_and_accepted_requests_finish(client, stub):
    outcomes: list[str] = []

    def run() -> None:
        try:
            answer = client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=100, **GREEDY)
            outcomes.append(answer.choices[0].finish_reason)
        except openai.RateLimitError as err:
            assert err.status_code == 429 and "server is busy" in err.body["message"]
            outcomes.append("429")

    threads = [threading.Thread(target=run) for _ in range(24)]  # 4 slots + 8 waiting places
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert "429" in outcomes and outcomes.count("length") >= 8 and set(outcomes) == {"429", "length"}
    assert wait_idle(stub).running == 0


def test_the_choices_of_a_request_are_admitted_all_or_none(server, client, stub):
    with pytest.raises(openai.BadRequestError) as err:  # more choices than may ever wait at once: refused, not retried
        client.completions.create(model=MODEL, prompt=[1, 2, 3], n=9, max_tokens=2, **GREEDY)
    assert err.value.body["param"] == "n" and "(server.max_waiting 8)" in err.value.body["message"]

    # 10 long requests: 4 in the slots, 6 of the 8 waiting places taken; then a call of 4 choices,
    # 2 of which would fit. The slots fill first: 10 sent at once could find 8 still waiting.
    finished = aborted_requests(server.metrics_url, reason="length")
    long = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": MAX_SEQ_LEN - 3, **GREEDY}
    background = [threading.Thread(target=client.completions.create, kwargs=long) for _ in range(10)]

    def start_and_wait(threads: list[threading.Thread], ready: Callable[[pb.ModelInfoResponse], bool]) -> None:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while not ready(info := stub.ModelInfo(pb.ModelInfoRequest())) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ready(info), info

    start_and_wait(background[:SLOTS], lambda info: info.slots_in_use == SLOTS and info.waiting == 0)
    start_and_wait(background[SLOTS:], lambda info: info.waiting == 10 - SLOTS)
    with pytest.raises(openai.RateLimitError) as err:
        client.completions.create(**{**long, "n": 4})
    assert "server is busy" in err.value.body["message"]
    for t in background:
        t.join()
    wait_idle(stub)
    # The 10 ran to their length; the 2 choices admitted before the refusal were aborted, not run.
    assert aborted_requests(server.metrics_url, 10, finished + 10, reason="length") == finished + 10
    assert len(client.completions.create(model=MODEL, prompt=[1, 2, 3], n=4, max_tokens=2, **GREEDY).choices) == 4


def test_client_disconnect_frees_the_slot_streaming_or_not(server, stub):
    before = aborted_requests(server.metrics_url)
    # The longest request: still running whenever the client stops reading (a shorter one might
    # finish into the socket's buffers first on a slow host).
    body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": MAX_SEQ_LEN - 3, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.openai_url + "/", timeout=60) as http:
        with http.stream("POST", "completions", json=body) as response:
            lines = (line for line in response.iter_lines() if line.startswith("data: "))
            assert json.loads(next(lines)[6:])["choices"] and next(lines)
            assert stub.ModelInfo(pb.ModelInfoRequest()).slots_in_use == 1
        info = wait_idle(stub)
        assert (info.slots_in_use, info.running) == (0, 0) and aborted_requests(server.metrics_url, 10, before + 1) == before + 1

        with pytest.raises(httpx.ReadTimeout):
            http.post("completions", json={**body, "stream": False}, timeout=0.2)
        info = wait_idle(stub)
        assert (info.slots_in_use, info.running) == (0, 0) and aborted_requests(server.metrics_url, 10, before + 2) == before + 2

        with http.stream("POST", "completions", json={**body, "n": 2}) as response:  # every choice of a stream is aborted
            lines = (line for line in response.iter_lines() if line.startswith("data: "))
            assert json.loads(next(lines)[6:])["choices"]
        info = wait_idle(stub)
        assert (info.slots_in_use, info.running) == (0, 0) and aborted_requests(server.metrics_url, 10, before + 4) == before + 4
    assert stub.ModelInfo(pb.ModelInfoRequest()).slots_total == SLOTS


def test_benchmark_measures_through_the_openai_api(server, tmp_path):
    from jds.bench.__main__ import main

    out = tmp_path / "bench"
    args = ["serve", "--api", "openai", "--server", server.openai_url, "--workload", "code", "--rates", "4", "--num-requests", "4"]
    assert main([*args, "--out", str(out)]) == 0
    (rate,) = json.loads((out / "results.json").read_text())["sweeps"][0]["rates"].values()
    assert rate["summary"]["requests"] == 4 and rate["summary"]["failed"] == 0
    for record in rate["records"]:  # every request generated exactly its planned length, each token timed
        assert len(record["token_times"]) == record["output_len"] and record["error"] is None


# The bodies benchmarking tools send, as they send them (guidellm 0.8's openai_http backend,
# `vllm bench serve`'s OpenAI client, aiperf's completions and chat endpoints).
TOOL_BODIES = {
    "guidellm-completions": (
        "completions",
        {"model": MODEL, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
         "max_tokens": 6, "stop": None, "ignore_eos": True, "prompt": "Synthetic prompt text"},
    ),
    "guidellm-chat": (
        "chat/completions",
        {"model": MODEL, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
         "max_completion_tokens": 6, "stop": None, "ignore_eos": True,
         "messages": [{"role": "user", "content": [{"type": "text", "text": "Synthetic prompt text"}]}]},
    ),
    "vllm-bench-completions": (
        "completions",
        {"model": MODEL, "prompt": "Synthetic prompt text", "repetition_penalty": 1.0, "max_tokens": 6, "logprobs": None,
         "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True},
    ),
    "vllm-bench-chat": (
        "chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "Synthetic prompt text"}]}],
         "max_completion_tokens": 6, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True},
    ),
    "aiperf-completions": (
        "completions",
        {"prompt": ["Synthetic prompt text"], "model": MODEL, "stream": True, "max_tokens": 6, "stream_options": {"include_usage": True},
         "ignore_eos": True, "min_tokens": 6},
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", TOOL_BODIES)
def test_the_bodies_benchmarking_tools_send_stream_with_usage(server, name):
    path, body = TOOL_BODIES[name]
    with httpx.Client(base_url=server.openai_url + "/", timeout=60) as http:
        with http.stream("POST", path, json=body, headers={"x-request-id": f"tool-{name}"}) as response:
            assert response.status_code == 200, response.read()
            assert response.headers["x-request-id"] == f"tool-{name}"
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["id"].endswith(f"tool-{name}") for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    if body["stream_options"].get("continuous_usage_stats"):  # usage so far on every chunk, never falling
        counts = [c["usage"]["completion_tokens"] for c in chunks]
        assert counts == sorted(counts) and counts[-1] == 6 and all(c["usage"]["prompt_tokens"] > 0 for c in chunks)
    else:
        assert all(c["usage"] is None for c in chunks[:-1])


def test_stop_strings_kept_in_the_output_when_asked(client):
    full = client.completions.create(model=MODEL, prompt="Counting:", max_tokens=30, **GREEDY).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    kept = client.completions.create(
        model=MODEL, prompt="Counting:", max_tokens=30, stop=[stop], temperature=0, extra_body={"ignore_eos": True, "include_stop_str_in_output": True}
    )
    assert kept.choices[0].text == full[: full.find(stop) + len(stop)] and kept.choices[0].finish_reason == "stop"


def test_chat_template_options_render_as_transformers_does(client, hf_smollm2_tokenizer):
    conversation = [{"role": "user", "content": "Finish my sentence."}, {"role": "assistant", "content": "The sky is"}]
    options = {"ignore_eos": True, "return_token_ids": True, "add_generation_prompt": False}
    continued = client.chat.completions.create(
        model=MODEL, messages=conversation, max_tokens=2, temperature=0, extra_body={**options, "continue_final_message": True}
    )
    expected = hf_smollm2_tokenizer.apply_chat_template(conversation, continue_final_message=True, tokenize=True)
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    assert continued.choices[0].model_extra["prompt_token_ids"] == expected
    closed = client.chat.completions.create(model=MODEL, messages=conversation, max_tokens=2, temperature=0, extra_body=options)
    expected = hf_smollm2_tokenizer.apply_chat_template(conversation, add_generation_prompt=False, tokenize=True)
    assert closed.choices[0].model_extra["prompt_token_ids"] == list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=conversation, max_tokens=2, extra_body={"continue_final_message": True})
    assert err.value.body["param"] == "continue_final_message"
    # given inside chat_template_kwargs, the two flags override (as vLLM takes them)
    kwargs = {"chat_template_kwargs": {"add_generation_prompt": False}, "ignore_eos": True, "return_token_ids": True}
    inside = client.chat.completions.create(model=MODEL, messages=conversation, max_tokens=2, temperature=0, extra_body=kwargs)
    assert inside.choices[0].model_extra["prompt_token_ids"] == closed.choices[0].model_extra["prompt_token_ids"]


def test_a_history_saved_from_openai_replies_is_taken(client, offline):
    """OpenAI's assistant messages carry refusal, tool_calls, function_call and audio, null when
    unused, and a content that may be null: a conversation saved from its replies is valid input."""
    saved = {"role": "assistant", "content": "Hello!", "refusal": None, "tool_calls": None, "function_call": None, "audio": None}
    history = [{"role": "user", "content": "Hi"}, saved, {"role": "user", "content": "Again"}]
    plain = [{"role": m["role"], "content": m["content"]} for m in history]
    expected = offline.chat(plain, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]
    answer = client.chat.completions.create(model=MODEL, messages=history, max_tokens=3, **GREEDY)
    assert answer.choices[0].message.content == expected.text
    empty = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}, {"role": "user", "content": "Again"}]
    assert client.chat.completions.create(model=MODEL, messages=empty, max_tokens=1, **GREEDY).choices[0].finish_reason == "length"
    called = {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[history[0], called, history[2]], max_tokens=1)
    assert err.value.body["param"] == "messages[1].tool_calls"
    with pytest.raises(openai.BadRequestError) as err:  # only an assistant's content may be null
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": None}], max_tokens=1)
    assert err.value.body["param"] == "messages[0].content"
    with pytest.raises(openai.BadRequestError) as err:  # a schema with it is refused as a whole, not for its schema
        client.chat.completions.create(model=MODEL, messages=plain, max_tokens=1, response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    assert (err.value.body["param"], err.value.body["message"]) == ("response_format", "response_format: only type 'text' is supported")


def test_completion_logprobs_and_echo_score_the_prompt_as_the_offline_api(client, offline):
    ids = [5, 6, 7, 8, 9, 10]
    expected = offline.generate([ids], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=2, prompt_logprobs=2))[0]
    answer = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, logprobs=2, echo=True, **GREEDY)
    shaped = answer.choices[0].logprobs
    assert len(shaped.tokens) == len(ids) + 3 and shaped.token_logprobs[0] is None and shaped.top_logprobs[0] is None
    want = [e.logprob for e in expected.prompt_logprobs[1:]] + [e.logprob for e in expected.logprobs]
    assert shaped.token_logprobs[1:] == pytest.approx(want, abs=1e-6)
    # each position's own token first, then the 2 likeliest (OpenAI's legacy "up to logprobs+1")
    assert all(2 <= len(top) <= 3 and next(iter(top)) == token for top, token in zip(shaped.top_logprobs[1:], shaped.tokens[1:]))
    assert shaped.text_offset[0] == 0
    assert shaped.text_offset == sorted(shaped.text_offset) and answer.choices[0].text.endswith(expected.text)

    # lm-evaluation-harness's local-completions scores a continuation exactly so
    body = {"model": MODEL, "prompt": [ids], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}
    scored = httpx.post(str(client.base_url) + "completions", json=body, timeout=60).json()["choices"][0]["logprobs"]
    assert scored["token_logprobs"][1 : len(ids)] == pytest.approx(want[: len(ids) - 1], abs=1e-6)
    assert all(max(top.values()) >= lp - 1e-6 for top, lp in zip(scored["top_logprobs"][1:], scored["token_logprobs"][1:]))

    nothing = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, logprobs=0, echo=True)
    assert nothing.choices[0].finish_reason == "length" and nothing.usage.completion_tokens == 0
    assert len(nothing.choices[0].logprobs.tokens) == len(ids)


def test_an_echoed_prompt_of_ids_reads_as_its_text(client, offline):
    """Ids are decoded together: a character split over two tokens comes back whole."""
    text = "I \u2764\ufe0f \U0001f355 caf\u00e9"
    ids = offline.tokenizer.encode(text, add_special=False)
    assert any("\ufffd" in offline.tokenizer.decode([t]) for t in ids)  # some character spans several tokens
    answer = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, echo=True, logprobs=0, **GREEDY)
    assert answer.choices[0].text.startswith(text)
    assert answer.choices[0].logprobs.text_offset[len(ids)] == len(text)  # the generated token starts where the prompt's text ends


def test_chat_logprobs_whole_and_streamed(client, offline):
    conversation = [{"role": "user", "content": "Say hi"}]
    expected = offline.chat(conversation, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=3))[0]
    whole = client.chat.completions.create(model=MODEL, messages=conversation, max_tokens=4, logprobs=True, top_logprobs=3, **GREEDY)
    content = whole.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([e.logprob for e in expected.logprobs], abs=1e-6)
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)
    assert [bytes(c.bytes) for c in content] == [offline.tokenizer.token_bytes(t) for t in expected.token_ids]  # each token's own
    streamed = client.chat.completions.create(
        model=MODEL, messages=conversation, max_tokens=4, logprobs=True, top_logprobs=3, stream=True, **GREEDY
    )
    pieces = [c.choices[0].logprobs.content for c in streamed if c.choices and c.choices[0].logprobs]
    assert [e.logprob for piece in pieces for e in piece] == pytest.approx([e.logprob for e in expected.logprobs], abs=1e-6)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=conversation, max_tokens=2, top_logprobs=2)
    assert err.value.body["param"] == "top_logprobs"
