"""jds.model.tokenizer against transformers, the reference for how a GGUF vocabulary tokenizes."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
import transformers
from hypothesis import strategies as st

from jds.model.tokenizer import IncrementalDetokenizer, Tokenizer

# Bytes SmolLM2's vocabulary has no token for: text using them loses them (in transformers too),
# so it cannot round-trip. 0xF1/0xF2 lead the UTF-8 of code points U+40000..U+BFFFF.
SMOLLM_MISSING_BYTES = frozenset(b"\x04\x06\x13\x14\x16\x1d\xf1\xf2")
TRICKY_CHARACTERS = list(" \n\t0123456789'.éß日本🙂")  # boost the characters pre-tokenizers treat specially
FEW_EXAMPLES = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SAMPLES = [
    "Hello, world! How are you doing today?",
    "def add(a: int, b: int) -> int:\n    return a + b  # sum\n",
    "12345 3.14 -0.5e10 1,000,000 2024-01-01",
    "a  1",
    "x\n\n2",
    "café naïve résumé Ærøskøbing",
    "emoji 🙂🚀👍🏽 and flags 🇫🇷",
    "中文分词测试，你好世界。",
    "tabs\tand    spaces   \n\n\n  trailing   ",
    "\n",
    "",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "don't won't I'm we'll they've",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime number."},
    ],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello 🙂 How can I help?"},
        {"role": "user", "content": "Translate 'cat' to 中文."},
    ],
]


@pytest.fixture(scope="module")
def smollm(smollm2_gguf: Path) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_gguf)


# ------------------------------------------------------------------------------------ SmolLM2


def test_metadata(smollm: Tokenizer) -> None:
    assert smollm.vocab_size == 49152
    assert (smollm.bos_id, smollm.eos_id, smollm.pad_id) == (1, 2, 2)
    assert smollm.eos_ids == (2,)  # <|im_end|> is both EOS and the end-of-turn marker
    assert smollm.chat_template is not None and "<|im_start|>" in smollm.chat_template


@pytest.mark.parametrize("text", SAMPLES)
def test_encode_matches_transformers(smollm: Tokenizer, hf_smollm2_tokenizer, text: str) -> None:
    assert smollm.encode(text) == hf_smollm2_tokenizer.encode(text)


def test_chat_markers_are_single_tokens(smollm: Tokenizer) -> None:
    assert smollm.encode("<|im_start|>") == [1]
    assert smollm.encode("<|im_end|>") == [2]
    assert smollm.decode(smollm.encode("<|im_start|>hi<|im_end|>")) == "hi"
    marked = "<|im_start|>hi<|im_end|>"
    assert smollm.decode(smollm.encode(marked), skip_special=False) == marked


def test_no_bos_added_when_vocabulary_says_not_to(smollm: Tokenizer) -> None:
    assert smollm.encode("hi") == smollm.encode("hi", add_special=False)


@FEW_EXAMPLES
@given(text=st.text(st.one_of(st.characters(codec="utf-8"), st.sampled_from(TRICKY_CHARACTERS)), max_size=80))
def test_random_text_matches_transformers_and_round_trips(smollm: Tokenizer, hf_smollm2_tokenizer, text: str) -> None:
    ids = smollm.encode(text)
    assert ids == hf_smollm2_tokenizer.encode(text)
    if not SMOLLM_MISSING_BYTES.intersection(text.encode()):
        assert smollm.decode(ids) == text


@FEW_EXAMPLES
@given(text=st.one_of(st.text(st.characters(codec="utf-8"), max_size=200), st.sampled_from([" " * 500, "\n" * 300, "=" * 400, "-" * 999])))
def test_fewest_tokens_is_a_lower_bound_on_the_encoding(smollm: Tokenizer, tiny_llama, text: str) -> None:
    for tokenizer in (smollm, tiny_llama[0]):
        assert tokenizer.fewest_tokens(len(text)) <= len(tokenizer.encode(text, add_special=False))


def test_fewest_tokens_holds_for_the_longest_tokens_and_bounds_a_long_text(smollm: Tokenizer, tiny_llama) -> None:
    for tokenizer in (smollm, tiny_llama[0]):
        spelled = [tokenizer.decode([i], skip_special=False) for i in range(tokenizer.vocab_size)]
        longest = max(spelled, key=len) * 20  # as few tokens per character as the vocabulary allows
        assert 0 < tokenizer.fewest_tokens(len(longest)) <= len(tokenizer.encode(longest, add_special=False))
    assert smollm.fewest_tokens(1_000_000) > 2048  # a megabyte prompt is refused for SmolLM2's context unread


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_chat_template_matches_transformers(smollm: Tokenizer, hf_smollm2_tokenizer, conversation: list[dict]) -> None:
    expected_text = hf_smollm2_tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    expected_ids = hf_smollm2_tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True)
    if not isinstance(expected_ids, list):  # transformers 5 returns a BatchEncoding
        expected_ids = expected_ids["input_ids"]
    assert smollm.apply_chat_template(conversation) == expected_text
    assert smollm.encode_chat(conversation) == expected_ids


def test_chat_template_takes_extra_variables_and_continues_a_final_message(smollm: Tokenizer) -> None:
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}{% if shout %}!{% endif %}"
    tokenizer = Tokenizer(smollm._backend, chat_template=template)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello "}]
    assert tokenizer.apply_chat_template(chat, False, template_kwargs={"shout": True}) == "<user>hi</user><assistant>hello </assistant>!"
    assert tokenizer.apply_chat_template(chat, False, template_kwargs={"messages": []}).startswith("<user>hi")  # not replaced
    assert tokenizer.apply_chat_template(chat, False, continue_final_message=True) == "<user>hi</user><assistant>hello"
    with pytest.raises(ValueError, match="continue_final_message"):
        tokenizer.apply_chat_template(chat, True, continue_final_message=True)


def test_special_tokens_can_stay_in_streamed_text(smollm: Tokenizer) -> None:
    ids = smollm.encode("Hello") + [smollm.eos_id]
    assert "".join(_stream(IncrementalDetokenizer(smollm), ids)) == "Hello"
    kept = "".join(_stream(IncrementalDetokenizer(smollm, skip_special=False), ids))
    assert kept == smollm.decode(ids, skip_special=False) and kept.endswith(smollm._backend.id_to_token(smollm.eos_id))


def test_chat_template_without_generation_prompt(smollm: Tokenizer, hf_smollm2_tokenizer) -> None:
    conversation = CONVERSATIONS[1]
    expected = hf_smollm2_tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)
    assert smollm.apply_chat_template(conversation, add_generation_prompt=False) == expected


@pytest.mark.parametrize(
    ("messages", "pattern"),
    [
        ([{"role": "user"}], r"message 0: 'content'"),
        ([{"role": "user", "content": "ok"}, {"role": "user", "content": None}], r"message 1: 'content'"),
        ([{"content": "hi"}], r"message 0: 'role'"),
        (["hi"], r"message 0 must be a dict"),
    ],
)
def test_bad_messages_raise(smollm: Tokenizer, messages: list, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        smollm.apply_chat_template(messages)


# ------------------------------------------------------------------------- streaming decode


def _stream(detokenizer: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detokenizer.push(token) for token in ids] + [detokenizer.flush()]


def test_incremental_detokenizer_never_splits_characters(smollm: Tokenizer) -> None:
    text = "Hi 🙂! 日本語のテキスト 👍🏽 café — ok 🚀🚀"
    ids = smollm.encode(text)
    # Meaningful only if some tokens carry part of a character.
    assert any("\ufffd" in smollm.decode([token]) for token in ids)
    deltas = _stream(IncrementalDetokenizer(smollm), ids)
    assert "".join(deltas) == smollm.decode(ids) == text
    assert not any("\ufffd" in delta for delta in deltas)


def test_incremental_detokenizer_with_prompt_and_special_tokens(smollm: Tokenizer) -> None:
    prompt = smollm.encode_chat([{"role": "user", "content": "Say 你好"}])
    generated = smollm.encode("你好 🙂 means hello.<|im_end|>")
    deltas = _stream(IncrementalDetokenizer(smollm, prompt), generated)
    assert "".join(deltas) == smollm.decode(generated) == "你好 🙂 means hello."
    assert not any("\ufffd" in delta for delta in deltas)


@FEW_EXAMPLES
@given(data=st.data())
def test_incremental_detokenizer_on_random_ids(smollm: Tokenizer, data: st.DataObject) -> None:
    """Arbitrary ids (broken byte sequences included) still stream to exactly the full decode."""
    ids = data.draw(st.lists(st.integers(0, smollm.vocab_size - 1), max_size=40))
    assert "".join(_stream(IncrementalDetokenizer(smollm), ids)) == smollm.decode(ids)


# ----------------------------------------------------------------- handcrafted GGUF files

BYTE_TOKENS = [f"<0x{byte:02X}>" for byte in range(256)]
PIECES = [
    *("▁", "h", "e", "l", "o", "w", "r", "d", "t", "é"),
    *("▁h", "he", "ll", "hell", "lo", "or", "▁w", "▁wor", "▁t", "▁the", "th", "▁th"),
]
CONTROL_PIECES = ["<|im_start|>", "<|im_end|>"]
USER_PIECES = ["<tool>"]


def _write_gguf(path: Path, model: str, tokens: list[str], **tokenizer_kv) -> Path:
    """A GGUF with only what a tokenizer needs, plus the tiny llama config and one tensor that
    transformers requires before it will build a tokenizer from the file."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    for key, value in tokenizer_kv.items():
        getattr(writer, f"add_{key}")(value)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _llama_gguf(path: Path, **overrides) -> Path:
    """SentencePiece-style: <unk> <s> </s>, 256 byte tokens, a few pieces scored best-first."""
    tokens = ["<unk>", "<s>", "</s>", *BYTE_TOKENS, *PIECES, *CONTROL_PIECES, *USER_PIECES]
    types = [
        gguf.TokenType.UNKNOWN,
        gguf.TokenType.CONTROL,
        gguf.TokenType.CONTROL,
        *[gguf.TokenType.BYTE] * 256,
        *[gguf.TokenType.NORMAL] * len(PIECES),
        *[gguf.TokenType.CONTROL] * len(CONTROL_PIECES),
        *[gguf.TokenType.USER_DEFINED] * len(USER_PIECES),
    ]
    scores = [0.0] * 259 + [-float(rank) for rank in range(len(tokens) - 259)]
    tokenizer_kv = dict(
        token_scores=scores,
        token_types=types,
        bos_token_id=1,
        eos_token_id=2,
        unk_token_id=0,
        add_bos_token=True,
        add_space_prefix=True,
    )
    return _write_gguf(path, "llama", tokens, **{**tokenizer_kv, **overrides})


LLAMA_SAMPLES = [
    "hello world",
    "the hell",
    "hello  world",
    " hello",
    "héllo ✓ wörld 日本 🙂",
    "\n\tthe\n",
    "<|im_start|>hello<|im_end|>",
    "<tool>hi",
    "",
]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, object]:
    path = _llama_gguf(tmp_path_factory.mktemp("llama") / "tiny.gguf")
    reference = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return Tokenizer.from_gguf(path), reference


@pytest.mark.parametrize("text", LLAMA_SAMPLES)
def test_sentencepiece_gguf_matches_transformers(tiny_llama, text: str) -> None:
    ours, reference = tiny_llama
    ids = ours.encode(text)
    assert ids == reference.encode(text)
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special=False) == reference.decode(ids)


def test_sentencepiece_gguf_byte_fallback_and_specials(tiny_llama) -> None:
    ours, _ = tiny_llama
    assert (ours.bos_id, ours.eos_id, ours.eos_ids) == (1, 2, (2,))
    check = "✓".encode()
    assert ours.encode("✓") == [1, 259 + PIECES.index("▁"), *(3 + byte for byte in check)]
    assert ours.encode("<|im_start|>", add_special=False) == [259 + len(PIECES)]
    assert ours.decode(ours.encode("héllo ✓ 🙂")) == "héllo ✓ 🙂"


def test_token_bytes_join_to_the_text_where_tokens_split_characters(smollm: Tokenizer, tiny_llama) -> None:
    """OpenAI's log-probability ``bytes``: a token's own, so split characters can be joined again."""
    text = "Hi 🙂! 日本語 café"
    ids = smollm.encode(text + "<|im_end|>", add_special=False)
    assert any("\ufffd" in smollm.decode([token]) for token in ids)
    assert b"".join(smollm.token_bytes(t) for t in ids).decode() == text + "<|im_end|>"
    ours, _ = tiny_llama  # SentencePiece: "▁" is a space, byte-fallback pieces are their byte
    ids = ours.encode("héllo ✓ 🙂", add_special=False)
    assert b"".join(ours.token_bytes(t) for t in ids).decode() == " héllo ✓ 🙂"


def test_sentencepiece_gguf_without_space_prefix(tmp_path: Path) -> None:
    """transformers ignores add_space_prefix=False (it always prefixes), so these ids are hand-computed:
    "hi" is "h" + byte-fallback "i" with no leading "▁h" merge."""
    tokenizer = Tokenizer.from_gguf(_llama_gguf(tmp_path / "noprefix.gguf", add_space_prefix=False))
    assert tokenizer.encode("hi") == [1, 259 + PIECES.index("h"), 3 + ord("i")]
    assert tokenizer.decode(tokenizer.encode(" hi")) == " hi"


def test_end_of_turn_ids_from_metadata_and_template(tmp_path: Path) -> None:
    im_end = 259 + len(PIECES) + 1
    from_key = Tokenizer.from_gguf(_llama_gguf(tmp_path / "eot.gguf", eot_token_id=im_end))
    template = "{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}"
    from_template = Tokenizer.from_gguf(_llama_gguf(tmp_path / "template.gguf", chat_template=template))
    assert from_key.eos_ids == from_template.eos_ids == (2, im_end)


def test_sentencepiece_incremental_detokenizer(tiny_llama) -> None:
    ours, _ = tiny_llama
    ids = ours.encode("the ✓ wörld 🙂 hello", add_special=False)
    assert any("\ufffd" in ours.decode([token]) for token in ids)
    deltas = _stream(IncrementalDetokenizer(ours), ids)
    assert "".join(deltas) == ours.decode(ids)
    assert not any("\ufffd" in delta for delta in deltas)


@FEW_EXAMPLES
@given(data=st.data())
def test_sentencepiece_incremental_detokenizer_on_random_ids(tiny_llama, data: st.DataObject) -> None:
    """Random pieces and whole characters spelled in byte tokens. Byte runs stay valid UTF-8 here:
    tokenizers' ByteFallback turns an invalid run into one U+FFFD per byte, including bytes that
    were valid on their own and already streamed, which no incremental decoder can take back."""
    ours, _ = tiny_llama
    piece = st.integers(259, ours.vocab_size - 1).map(lambda index: [index])
    character = st.characters(codec="utf-8").map(lambda char: [3 + byte for byte in char.encode()])
    ids = sum(data.draw(st.lists(st.one_of(piece, character), max_size=20)), [])
    assert "".join(_stream(IncrementalDetokenizer(ours), ids)) == ours.decode(ids)


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "qwen2", "gpt-4o"])
def test_byte_level_pre_tokenizers_match_transformers(tmp_path: Path, pre: str) -> None:
    """`tokenizer.ggml.pre` decides how digits, contractions and whitespace are split."""
    alphabet = [chr(c) for c in [*range(33, 127), *range(161, 173), *range(174, 256)]]
    alphabet += [chr(256 + n) for n in range(256 - len(alphabet))]
    merges = ["1 2", "12 3", "123 4", "4 5", "Ġ 1", "Ġ t", "h e", "Ġt he", "' s", "Ġ Ġ", "Ċ Ċ", "H e"]
    tokens = ["<|endoftext|>", *alphabet, *("".join(merge.split()) for merge in merges)]
    types = [gguf.TokenType.CONTROL, *[gguf.TokenType.NORMAL] * (len(tokens) - 1)]
    path = _write_gguf(
        tmp_path / f"{pre}.gguf", "gpt2", tokens, tokenizer_pre=pre, token_types=types, token_merges=merges,
        eos_token_id=0,
    )  # fmt: skip
    ours = Tokenizer.from_gguf(path)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ["Hel the 12345 1234 it's  1\n\n2 <|endoftext|>", "HELLO's 123456789", " 1 12"]:
        assert ours.encode(text) == reference.encode(text), text


# ------------------------------------------------------------------------ tokenizer.json


def test_from_file_reads_tokenizer_config(tmp_path: Path, hf_smollm2_tokenizer) -> None:
    hf_smollm2_tokenizer.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    template = (
        "{% if messages[0]['role'] == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}"
        "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    config = {
        "bos_token": {"content": "<|im_start|>", "special": True},
        "eos_token": "<|endoftext|>",
        "add_bos_token": True,
        "chat_template": template,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    for path in (tmp_path, tmp_path / "tokenizer.json"):
        tokenizer = Tokenizer.from_file(path)
        assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 0, None)
        assert tokenizer.eos_ids == (0, 2)  # EOS, then the template's <|im_end|>
        assert tokenizer.encode("hi") == [1, *hf_smollm2_tokenizer.encode("hi")]
        messages = [{"role": "user", "content": "hi"}]
        assert tokenizer.encode_chat(messages) == [1, 1, 4093, 198, 6004, 2, 198, 1, 520, 9531, 198]
        with pytest.raises(ValueError, match="no bad roles"):
            tokenizer.apply_chat_template([{"role": "bad", "content": "x"}])


def test_from_file_without_config(tmp_path: Path, hf_smollm2_tokenizer) -> None:
    hf_smollm2_tokenizer.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    tokenizer = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert (tokenizer.bos_id, tokenizer.eos_ids, tokenizer.chat_template) == (None, (), None)
    with pytest.raises(ValueError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


# --------------------------------------------------------------------------------- errors


def test_missing_files_raise(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        Tokenizer.from_gguf(missing)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_file(tmp_path)


def test_unsupported_gguf_tokenizer_model(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "bert.gguf", "bert", ["[PAD]", "[UNK]", "hello"])
    with pytest.raises(ValueError, match="'bert'"):
        Tokenizer.from_gguf(path)
