"""The offline API end to end on the real SmolLM2 weights, against transformers' generate."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from jds import LLM, SamplingParams
from tests_paths import CONFIGS

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time",
    "1, 2, 3,",
    "Water boils at",
    "The three primary colors are",
]
NEW_TOKENS = 32


def _hf_greedy(model, tokenizer, ids: list[int], max_new: int, **processors) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=[2],
            pad_token_id=2,
            **processors,
        )
    return out[0, len(ids) :].tolist()


def test_greedy_generation_is_token_identical_to_transformers(smollm2_llm, hf_smollm2, hf_smollm2_tokenizer):
    # More prompts than slots: requests join as others finish (continuous batching).
    assert len(PROMPTS) > smollm2_llm.engine.slot_usage()[1]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=False, stop_token_ids=[2])
    outputs = smollm2_llm.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outputs):
        ids = hf_smollm2_tokenizer(prompt)["input_ids"]
        assert out.prompt_token_ids == ids
        expected = _hf_greedy(hf_smollm2, hf_smollm2_tokenizer, ids, NEW_TOKENS)
        assert out.token_ids == expected, prompt
        assert out.finish_reason == ("stop" if expected[-1] == 2 else "length")
        assert out.text == hf_smollm2_tokenizer.decode(expected, skip_special_tokens=True)
    assert sum(len(o.token_ids) for o in outputs) >= 4 * NEW_TOKENS


def test_logit_bias_matches_transformers_sequence_bias(smollm2_llm, hf_smollm2, hf_smollm2_tokenizer):
    prompt = "The capital of France is"
    ids = hf_smollm2_tokenizer(prompt)["input_ids"]
    plain = _hf_greedy(hf_smollm2, hf_smollm2_tokenizer, ids, 8)
    bias = {plain[0]: -100.0, plain[2]: -3.5, 1000: 4.0}  # the first token banned, another pushed down, one pushed up
    ours = smollm2_llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0, logit_bias=bias, ignore_eos=True))[0]
    theirs = _hf_greedy(hf_smollm2, hf_smollm2_tokenizer, ids, 8, sequence_bias={(t,): b for t, b in bias.items()})
    assert ours.token_ids == theirs and theirs != plain


def test_repetition_penalty_and_min_tokens_match_transformers(smollm2_llm, hf_smollm2, hf_smollm2_tokenizer):
    """transformers' own logits processors: the repetition penalty over prompt and output tokens,
    and stop ids held back for the first min_new_tokens."""
    prompt = "1, 2, 3, 1, 2, 3, 1, 2,"
    ids = hf_smollm2_tokenizer(prompt)["input_ids"]
    ours = smollm2_llm.generate(prompt, SamplingParams(max_tokens=16, temperature=0, repetition_penalty=1.4, ignore_eos=True))[0]
    assert ours.token_ids == _hf_greedy(hf_smollm2, hf_smollm2_tokenizer, ids, 16, repetition_penalty=1.4)
    assert ours.token_ids != smollm2_llm.generate(prompt, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0].token_ids

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat_ids = hf_smollm2_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    chat_ids = list(chat_ids["input_ids"] if hasattr(chat_ids, "keys") else chat_ids)
    early = smollm2_llm.chat(messages, SamplingParams(max_tokens=64, temperature=0))[0]
    assert early.finish_reason == "stop", early
    least = len(early.token_ids) + 3
    held = smollm2_llm.chat(messages, SamplingParams(max_tokens=64, temperature=0, min_tokens=least))[0]
    assert len(held.token_ids) >= least and held.token_ids[: len(early.token_ids) - 1] == early.token_ids[:-1]
    assert held.token_ids == _hf_greedy(hf_smollm2, hf_smollm2_tokenizer, chat_ids, 64, min_new_tokens=least)[: len(held.token_ids)]


def test_presence_and_frequency_penalties_match_a_reference_loop_on_transformers(smollm2_llm, hf_smollm2, hf_smollm2_tokenizer):
    """OpenAI's definition, written out over transformers' logits one greedy step at a time."""
    prompt, presence, frequency = "the the the the the", 0.8, 0.6
    tokens = hf_smollm2_tokenizer(prompt)["input_ids"]
    output: list[int] = []
    with torch.no_grad():
        for _ in range(14):
            logits = hf_smollm2(torch.tensor([tokens + output])).logits[0, -1].double()
            for token in set(output):
                logits[token] -= presence + frequency * output.count(token)
            output.append(int(logits.argmax()))
    params = SamplingParams(max_tokens=14, temperature=0, presence_penalty=presence, frequency_penalty=frequency, ignore_eos=True)
    assert smollm2_llm.generate(prompt, params)[0].token_ids == output


def test_logprobs_of_prompt_and_output_match_transformers_log_softmax(smollm2_llm, hf_smollm2, hf_smollm2_tokenizer):
    """Every reported log-probability, of a sampled output and of the prompt, within 1e-3 of
    transformers' float32 log-softmax at the same position; the top alternatives its likeliest."""
    params = SamplingParams(max_tokens=8, temperature=0.8, seed=3, logprobs=5, prompt_logprobs=5, ignore_eos=True)
    out = smollm2_llm.generate("The capital of France is", params)[0]
    ids = out.prompt_token_ids + out.token_ids
    with torch.no_grad():
        logp = torch.log_softmax(hf_smollm2(torch.tensor([ids])).logits[0].float(), dim=-1)
    n = len(out.prompt_token_ids)
    reported = [(t - 1, e) for t, e in enumerate(out.prompt_logprobs) if e is not None]
    reported += [(n - 1 + i, e) for i, e in enumerate(out.logprobs)]
    assert out.prompt_logprobs[0] is None and len(reported) == len(ids) - 1
    for position, entry in reported:
        assert entry.token == ids[position + 1]
        assert entry.logprob == pytest.approx(float(logp[position, entry.token]), abs=1e-3)
        top = torch.topk(logp[position], 5)
        assert [lp for _, lp in entry.top] == pytest.approx(top.values.tolist(), abs=1e-3)
        assert entry.top[0][0] == int(top.indices[0])


def test_prompts_scored_together_match_transformers_each(smollm2_llm, hf_smollm2, hf_smollm2_tokenizer, monkeypatch):
    """lm-evaluation-harness's requests (echo, max_tokens 0) arrive together: their prompts are
    scored in shared calls, padded to the longest, and each still gets its own log-probabilities."""
    program = smollm2_llm.engine.colocated_workers[0].program
    batches = []
    score = program.score
    monkeypatch.setattr(program, "score", lambda seqs: batches.append(len(seqs)) or score(seqs))
    prompts = ["Question: What is the capital of Peru?\nAnswer: Lima", "Paris", "One, two, three, four, five, six, seven, eight"]
    outs = smollm2_llm.generate(prompts, SamplingParams(max_tokens=0, prompt_logprobs=1))
    assert max(batches) > 1 and sum(batches) == len(prompts)
    for out in outs:
        ids = out.prompt_token_ids
        assert out.token_ids == [] and out.finish_reason == "length"
        with torch.no_grad():
            logp = torch.log_softmax(hf_smollm2(torch.tensor([ids])).logits[0].float(), dim=-1)
        assert [e.logprob for e in out.prompt_logprobs[1:]] == pytest.approx([float(logp[t, ids[t + 1]]) for t in range(len(ids) - 1)], abs=1e-3)


def test_chat_applies_template_and_stops_at_end_of_turn(smollm2_llm, hf_smollm2, hf_smollm2_tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = smollm2_llm.chat(messages, SamplingParams(max_tokens=48, temperature=0))[0]
    ids = hf_smollm2_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert out.prompt_token_ids == list(ids)
    im_end = hf_smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert out.finish_reason == "stop" and out.token_ids[-1] == im_end
    assert out.token_ids == _hf_greedy(hf_smollm2, hf_smollm2_tokenizer, list(ids), 48)[: len(out.token_ids)]
    assert "Paris" in out.text and "<|im_end|>" not in out.text


def test_stop_strings_max_tokens_and_token_prompts(smollm2_llm):
    full = smollm2_llm.generate("1, 2, 3,", SamplingParams(max_tokens=20, temperature=0))[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 20
    assert " 6," in full.text
    cut = smollm2_llm.generate("1, 2, 3,", SamplingParams(max_tokens=20, temperature=0, stop=[" 6,"]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(" 6,")]
    assert full.token_ids[: len(cut.token_ids)] == cut.token_ids
    # Token-id prompts give the same result as the text they encode.
    ids = smollm2_llm.tokenizer.encode("1, 2, 3,")
    by_ids = smollm2_llm.generate(ids, SamplingParams(max_tokens=20, temperature=0))[0]
    assert by_ids.token_ids == full.token_ids


def test_seeded_sampling_reproduces_regardless_of_batch(smollm2_llm):
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    alone = smollm2_llm.generate("Write a poem about the sea", params)[0]
    others = SamplingParams(max_tokens=24, temperature=1.0, seed=7)
    batch = smollm2_llm.generate(["Hi", "Write a poem about the sea", "Tell me a joke"], [others, params, others])
    assert batch[1].token_ids == alone.token_ids
    different = smollm2_llm.generate("Write a poem about the sea", SamplingParams(**{**params.__dict__, "seed": 99}))
    assert different[0].token_ids != alone.token_ids


@pytest.mark.parametrize(
    "prompt, options, message",
    [
        ("", {}, "prompt: encodes to no tokens"),
        ([], {}, "prompt: is empty"),
        ([1, 2, 10**6], {}, r"prompt: ids must be in \[0, 49152\)"),
        ([5] * 4096, {}, "max_seq_len"),
        ("a\ud800b", {}, "prompt: is not valid Unicode"),
        ("x" * 1_000_000, {}, "prompt: 1000000 characters make at least"),
        ("hi", {"stop_token_ids": list(range(20))}, "stop_token_ids at most 8 ids"),
        ("hi", {"stop_token_ids": [60000]}, r"stop_token_ids: ids must be in \[0, 49152\)"),
        ("hi", {"temperature": float("inf")}, "temperature must be a finite number"),
        ("hi", {"temperature": 1e39}, "temperature must be a finite number"),
        ("hi", {"stop": ["x"] * 17}, "stop at most 16 stop strings"),
        ("hi", {"stop": ["x" * 257]}, r"stop\[0\] at most 256 characters"),
        ("hi", {"stop": 5}, "stop must be a list"),
    ],
)
def test_bad_requests_are_refused_and_the_engine_keeps_working(smollm2_llm, prompt, options, message):
    with pytest.raises(ValueError, match=message):
        smollm2_llm.generate([prompt], SamplingParams(**options))
    assert smollm2_llm.generate("Hi", SamplingParams(max_tokens=2, temperature=0))[0].token_ids


def test_bad_conversations_are_refused_naming_the_message(smollm2_llm):
    with pytest.raises(ValueError, match="messages: a conversation needs at least one message"):
        smollm2_llm.chat([[]])
    with pytest.raises(ValueError, match=r"messages\[1\].content: is not valid Unicode"):
        smollm2_llm.chat([{"role": "system", "content": "ok"}, {"role": "user", "content": "\udfff"}])
    with pytest.raises(ValueError, match=r"messages\[0\].role: must be one of"):
        smollm2_llm.chat([{"role": "robot", "content": "x"}])


def test_one_bad_prompt_of_several_is_named_by_its_place_and_none_runs(smollm2_llm):
    params = SamplingParams(max_tokens=2, temperature=0)
    with pytest.raises(ValueError, match=r"^prompts\[1\]: ids must be in \[0, 49152\); got \[999999\]"):
        smollm2_llm.generate(["fine", [1, 999999], "fine"], params)
    with pytest.raises(ValueError, match=r"^prompts\[2\]: .*max_seq_len"):
        smollm2_llm.generate(["fine", "fine", [5] * 4096], params)
    with pytest.raises(ValueError, match=r"^messages\[1\]\[0\]\.role: must be one of"):
        smollm2_llm.chat([[{"role": "user", "content": "hi"}], [{"role": "robot", "content": "x"}]], params)
    # Bytes are a sequence of small ints: taken as token ids they would run a prompt nobody wrote.
    with pytest.raises(ValueError, match="^prompts: must be a string, a list of token ids"):
        smollm2_llm.generate(b"hello", params)
    with pytest.raises(ValueError, match=r"^prompts\[1\]: must be a string or a list of token ids; got bytes"):
        smollm2_llm.generate(["fine", b"hello"], params)
    with pytest.raises(TypeError, match="^sampling_params: must be a SamplingParams"):
        smollm2_llm.generate(["fine"], {"max_tokens": 3})
    with pytest.raises(TypeError, match=r"^sampling_params\[1\]: must be a SamplingParams"):
        smollm2_llm.generate(["fine", "fine"], [params, None])
    assert smollm2_llm.engine.num_waiting == 0 and smollm2_llm.engine.num_running == 0


def test_numpy_ids_and_settings_and_vllm_nones_are_taken(smollm2_llm):
    params = SamplingParams(max_tokens=3, temperature=0)
    ids = smollm2_llm.tokenizer.encode("The capital of France is")
    expected = smollm2_llm.generate(ids, params)[0].token_ids
    assert smollm2_llm.generate(np.array(ids), params)[0].token_ids == expected
    assert smollm2_llm.generate([[np.int64(t) for t in ids]], params)[0].token_ids == expected
    assert [o.token_ids for o in smollm2_llm.generate(np.array([ids, ids]), params)] == [expected, expected]
    numpy_params = SamplingParams(max_tokens=np.int64(3), temperature=np.float32(0), stop_token_ids=np.array([7]), logit_bias={np.int64(5): np.float32(-1)})
    assert (numpy_params.max_tokens, numpy_params.stop_token_ids, numpy_params.logit_bias) == (3, (7,), ((5, -1.0),))
    assert type(numpy_params.temperature) is float
    nones = SamplingParams(max_tokens=None, temperature=0, stop=None, stop_token_ids=None, ignore_eos=True)
    assert (nones.stop, nones.stop_token_ids) == ((), ())


def test_n_samples_of_a_prompt_come_back_as_vllm_lists_them(smollm2_llm):
    seeded = SamplingParams(max_tokens=6, temperature=1.0, seed=11, n=3, ignore_eos=True)
    out = smollm2_llm.generate(["Tell me a story", "Hi"], [seeded, SamplingParams(max_tokens=2, temperature=0)])
    assert [len(o.outputs) for o in out] == [3, 1]
    story = out[0]
    assert [o.index for o in story.outputs] == [0, 1, 2] and story.token_ids == story.outputs[0].token_ids and story.finished
    # sample j draws with seed + j: each is the single sample of that seed, and they differ
    for j, sample in enumerate(story.outputs):
        alone = smollm2_llm.generate("Tell me a story", dataclasses.replace(seeded, n=1, seed=11 + j))[0]
        assert (sample.token_ids, sample.text) == (alone.token_ids, alone.text)
    assert len({tuple(o.token_ids) for o in story.outputs}) > 1
    assert out[1].outputs[0].text == out[1].text
    with pytest.raises(ValueError, match="SamplingParams.n must be an integer >= 1"):
        SamplingParams(n=0)


def test_chat_takes_openai_shaped_histories(smollm2_llm):
    params = SamplingParams(max_tokens=1, temperature=0)
    system, developer = (smollm2_llm.chat([{"role": role, "content": "Answer briefly."}, {"role": "user", "content": "Hi"}], params)[0] for role in ("system", "developer"))
    assert developer.prompt_token_ids == system.prompt_token_ids
    # an assistant's reply saved from OpenAI: null content and fields, as the HTTP API takes it
    saved = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None, "refusal": "no", "tool_calls": None}, {"role": "user", "content": "Again"}]
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "Again"}]
    assert smollm2_llm.chat(saved, params)[0].prompt_token_ids == smollm2_llm.chat(plain, params)[0].prompt_token_ids
    with pytest.raises(ValueError, match=r"^messages\[1\]\.tool_calls: tool calls and audio are not supported"):
        smollm2_llm.chat([saved[0], {**saved[1], "tool_calls": [{"id": "c"}]}, saved[2]], params)
    with pytest.raises(ValueError, match=r"^messages\[0\]\.content: must be a string or a list of text parts \(only an assistant's may be null\); got null"):
        smollm2_llm.chat([{"role": "user", "content": None}], params)
    # OpenAI's content parts: text parts are joined by newlines; other parts are refused by place
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]
    assert smollm2_llm.chat(parts, params)[0].prompt_token_ids == smollm2_llm.chat([{"role": "user", "content": "Hi\nthere"}], params)[0].prompt_token_ids
    image = {"type": "image_url", "image_url": {"url": "data:,"}}
    with pytest.raises(ValueError, match=r"^messages\[0\]\.content\[1\]\.type: only text parts are supported; got 'image_url'"):
        smollm2_llm.chat([{"role": "user", "content": [parts[0]["content"][0], image]}], params)
    with pytest.raises(ValueError, match=r"^messages\[0\]\.content\[0\]\.text: a text part's text must be a string; got int"):
        smollm2_llm.chat([{"role": "user", "content": [{"type": "text", "text": 5}]}], params)
    with pytest.raises(ValueError, match=r"^messages\[0\]\.content\[0\]: must be a content part"):
        smollm2_llm.chat([{"role": "user", "content": ["Hi"]}], params)


def test_the_engine_runs_one_sample_a_request(smollm2_llm):
    from jds.engine.request import Request

    with pytest.raises(ValueError, match="^n: an engine request is one sample"):
        smollm2_llm.engine.validate(Request("r", (1, 2), SamplingParams(n=2), 0))


def test_a_top_k_beyond_any_vocabulary_means_no_filter(smollm2_llm):
    huge = SamplingParams(max_tokens=6, temperature=0.8, top_k=2**40, seed=5, ignore_eos=True)
    assert huge.top_k == 2**31 - 1
    off = SamplingParams(max_tokens=6, temperature=0.8, top_k=0, seed=5, ignore_eos=True)
    assert smollm2_llm.generate("Hello", huge)[0].token_ids == smollm2_llm.generate("Hello", off)[0].token_ids


def test_random_weights_config_generates_from_token_ids(caplog, monkeypatch):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    with LLM(CONFIGS / "tiny.yaml", progress=False) as llm:
        # Like a server, it claims 90% of an accelerator for JAX where nobody said otherwise (the
        # fit check reads JAX's limit); the variable is all it touches, and a CPU ignores it.
        assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.9"
        assert any("RANDOM" in r.message for r in caplog.records)
        outs = llm.generate([[1, 2, 3], "hello"], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
        # max_tokens None (vLLM's): until the context is full
        until_full = llm.generate([1] * (llm.engine.max_seq_len - 3), SamplingParams(max_tokens=None, temperature=0, ignore_eos=True))[0]
    assert (len(until_full.token_ids), until_full.finish_reason) == (3, "length")
    assert [len(o.token_ids) for o in outs] == [5, 5]
    assert all(0 <= t < 49152 for o in outs for t in o.token_ids)


def test_generate_command_line(capsys):
    from jds.generate import main

    assert main(["--config", str(CONFIGS / "tiny.yaml"), "--max-tokens", "4", "hello there"]) == 0
    assert "finish: length" in capsys.readouterr().out
    assert main(["--config", str(CONFIGS / "tiny.yaml"), "--top-p", "2", "x"]) == 1
    assert "SamplingParams.top_p" in capsys.readouterr().err
