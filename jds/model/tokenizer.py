"""Text <-> token ids: tokenizers rebuilt from GGUF metadata or loaded from tokenizer.json,
chat templates, and streaming detokenization.

A GGUF carries no tokenizer.json, only the vocabulary under llama.cpp's key names, so the
`tokenizers` pipeline is rebuilt here the way transformers rebuilds it, which keeps our ids
identical to the ones the reference implementation produces for the same file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from gguf import GGUFReader, GGUFValueType, ReaderField, TokenType
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

SPIECE_SPACE = "\u2581"
REPLACEMENT_CHAR = "\ufffd"

# Markers that close a turn in common chat templates. Generation has to stop on them even when
# the vocabulary's EOS is a different token (Qwen's <|endoftext|>, Llama 3's <|end_of_text|>).
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>")
_GGUF_END_OF_TURN_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")

# Pre-tokenizer split patterns by `tokenizer.ggml.pre`, the same table transformers uses.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_BY_PRE = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "dbrx", "smaug-bpe"),
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), _GPT4O_SPLIT),
}


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what serving needs around it: BOS policy, stop ids, chat template."""

    def __init__(
        self,
        backend: Backend,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
        extra_eos_ids: Iterable[int] = (),
    ) -> None:
        self._backend = backend
        self._bos_id = bos_id
        self._eos_id = eos_id
        self._pad_id = pad_id
        self._bos_prefix = [bos_id] if add_bos and bos_id is not None else []
        self._chat_template = chat_template
        self._eos_ids = _stop_ids(backend, eos_id, extra_eos_ids, chat_template)
        added = backend.get_added_tokens_decoder()
        self._special_ids = frozenset(index for index, token in added.items() if token.special)
        self._added_ids = frozenset(added)
        self._chars_per_token = _chars_per_token(backend)

    @classmethod
    def from_gguf(cls, source: str | os.PathLike[str] | GGUFReader) -> Tokenizer:
        """Rebuild the tokenizer described by a GGUF file's `tokenizer.*` metadata. ``source`` may
        be a reader the weights were read through: parsing the file's metadata takes seconds."""
        reader = source if isinstance(source, GGUFReader) else GGUFReader(_existing_file(Path(source)))
        path = getattr(reader.data, "filename", source)
        meta = _gguf_tokenizer_metadata(reader)
        model = meta.get("tokenizer.ggml.model")
        if model not in _GGUF_BACKENDS:
            supported = ", ".join(_GGUF_BACKENDS)
            raise ValueError(f"unsupported GGUF tokenizer model {model!r} in {path} (supported: {supported})")
        backend = _GGUF_BACKENDS[model](meta)
        _add_gguf_special_tokens(backend, meta, byte_level=model == "gpt2")
        return cls(
            backend,
            bos_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_id=meta.get("tokenizer.ggml.eos_token_id"),
            pad_id=meta.get("tokenizer.ggml.padding_token_id"),
            # llama.cpp adds BOS to a SentencePiece vocabulary whose file does not say otherwise.
            add_bos=meta.get("tokenizer.ggml.add_bos_token", model == "llama"),
            chat_template=meta.get("tokenizer.chat_template"),
            extra_eos_ids=[meta[key] for key in _GGUF_END_OF_TURN_KEYS if key in meta],
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a tokenizer.json (or a directory holding one) and the tokenizer_config.json beside it."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        file = str(_existing_file(path))
        try:
            backend = Backend.from_file(file)
        except Exception as exc:  # the tokenizers library raises a bare Exception for a file it cannot read
            raise ValueError(f"{path} is not a tokenizer.json ({exc})") from None
        config = _read_json(path.with_name("tokenizer_config.json"))
        bos_id = _token_id(backend, config.get("bos_token"))
        add_bos = config.get("add_bos_token")
        if add_bos is None:
            # No explicit flag: follow the tokenizer.json post-processor, as transformers does.
            add_bos = bos_id is not None and backend.encode("").ids[:1] == [bos_id]
        return cls(
            backend,
            bos_id=bos_id,
            eos_id=_token_id(backend, config.get("eos_token")),
            pad_id=_token_id(backend, config.get("pad_token")),
            add_bos=add_bos,
            chat_template=_config_chat_template(config, path.parent),
        )

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write tokenizer.json and tokenizer_config.json, the pair ``from_file`` reads back."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(directory / "tokenizer.json"))
        token = self._backend.id_to_token
        config = {
            "bos_token": token(self._bos_id) if self._bos_id is not None else None,
            "eos_token": token(self._eos_id) if self._eos_id is not None else None,
            "pad_token": token(self._pad_id) if self._pad_id is not None else None,
            "add_bos_token": bool(self._bos_prefix),
            "chat_template": self._chat_template,
        }
        with (directory / "tokenizer_config.json").open("w", encoding="utf-8") as file:
            json.dump(config, file, ensure_ascii=False, indent=2)

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def pad_id(self) -> int | None:
        return self._pad_id

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: EOS and the template's end-of-turn marker."""
        return self._eos_ids

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids that `decode(..., skip_special=True)` drops from the text."""
        return self._special_ids

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids for `text`; BOS is prepended only when the vocabulary asks for it."""
        # The backend's post-processor is bypassed so BOS policy lives in one place (`_bos_prefix`).
        # A batch of one, because the backend's batch call releases the GIL and its single call
        # does not: a large prompt would otherwise stop every other thread of a server (the
        # decode loop, the HTTP event loop) for as long as it takes to encode (0.4 s for 660 kB).
        ids = self._backend.encode_batch([text], add_special_tokens=False)[0].ids
        return [*self._bos_prefix, *ids] if add_special else ids

    def fewest_tokens(self, chars: int) -> int:
        """A lower bound on the tokens of any text of ``chars`` characters, found without encoding:
        no token spells more than a known number of characters. 0 when the vocabulary gives no
        such bound (a model that fuses unknown characters into one token). Lets a server refuse a
        prompt far beyond its context without spending seconds encoding it."""
        return chars // self._chars_per_token if self._chars_per_token else 0

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special)

    @cached_property
    def _byte_level(self) -> bool:
        return _spells_bytes(self._backend)  # read from the serialized pipeline (60 ms): when first asked

    def token_bytes(self, token: int) -> bytes:
        """The UTF-8 bytes ``token`` stands for, which decoding it alone loses where it ends inside
        a character (that decodes to U+FFFD): what OpenAI's log-probabilities report as ``bytes``,
        so that a client can join split characters again."""
        piece = self._backend.id_to_token(token)
        if piece is None:
            return b""
        if token in self._added_ids:  # spelled as they read
            return piece.encode()
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece's byte fallback
            return bytes([int(piece[3:5], 16)])
        if self._byte_level:
            table = _unicode_to_bytes()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        return piece.replace(SPIECE_SPACE, " ").encode()

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """Render a conversation to the prompt text the model was trained on.

        ``continue_final_message``: the text ends inside the final message (the model continues
        it), as transformers does it: rendered without a generation prompt, then cut after that
        message's content. ``template_kwargs``: more variables for the template (e.g. a model's
        ``enable_thinking``); they cannot replace the conversation or the special tokens.
        """
        if self._chat_template is None:
            raise ValueError("this tokenizer has no chat template; pass a prompt string instead of messages")
        _check_messages(messages)
        if continue_final_message and (add_generation_prompt or not messages):
            raise ValueError("continue_final_message needs a final message to continue and no generation prompt")
        template_tokens = {
            name: self._backend.id_to_token(index)
            for name, index in (("bos_token", self._bos_id), ("eos_token", self._eos_id))
            if index is not None
        }
        try:
            variables = {"messages": list(messages), "add_generation_prompt": add_generation_prompt, "tools": None, "documents": None}
            text = _compile_template(self._chat_template).render({**(template_kwargs or {}), **variables, **template_tokens})
        except jinja2.TemplateError as error:
            raise ValueError(f"chat template failed: {error}") from error
        if continue_final_message:
            final = messages[-1]["content"].strip()
            end = text.rfind(final)
            if not final or end < 0:
                raise ValueError("continue_final_message: the template does not write the final message's text as it is")
            text = text[: end + len(final)]
        return text

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids for a conversation; the template writes any BOS itself, so none is added."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special=False)


class IncrementalDetokenizer:
    """Turns a stream of generated ids into text deltas without splitting UTF-8 characters.

    vLLM's scheme: decode a short window `ids[prefix:]` and compare it with the already emitted
    `ids[prefix:read]`; a delta is released only when it grew and does not end in U+FFFD (the
    window stops inside a character). The window restarts at each release, so the work per
    token stays small, and only tokens not yet released are kept.
    """

    _CONTEXT_TOKENS = 5  # prompt tail kept so the first tokens decode with their left context

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special: bool = True) -> None:
        """With `prompt_ids` the deltas continue the prompt's text: a SentencePiece vocabulary then
        keeps the leading space that decoding the generated ids alone would strip. With
        `skip_special` false, special tokens (EOS, chat markers) are written into the text."""
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        context = [index for index in prompt_ids if index not in tokenizer.special_ids]
        self._ids = context[-self._CONTEXT_TOKENS :]
        self._read = len(self._ids)
        self._read_text = self._decode(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special=self._skip_special)

    def push(self, token_id: int) -> str:
        """The text `token_id` completes, or "" while a character is still partial."""
        if self._skip_special and token_id in self._tokenizer.special_ids:
            return ""  # skipped in the text, so it must not widen the window either
        self._ids.append(token_id)
        text = self._decode(self._ids)
        if len(text) <= len(self._read_text) or text.endswith(REPLACEMENT_CHAR):
            return ""
        return self._release(text)

    def flush(self) -> str:
        """Whatever is still held back (only an unfinished or invalid byte sequence) at end of stream."""
        text = self._decode(self._ids)
        return self._release(text) if len(text) > len(self._read_text) else ""

    def _release(self, text: str) -> str:
        delta = text[len(self._read_text) :]
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        self._read_text = self._decode(self._ids)
        return delta


# ---------------------------------------------------------------------------------------- GGUF


def _gguf_tokenizer_metadata(reader: GGUFReader) -> dict[str, Any]:
    """The `tokenizer.*` keys as plain Python values."""
    return {
        name: _field_value(field) for name, field in reader.fields.items() if name.startswith("tokenizer.")
    }


def _field_value(field: ReaderField) -> Any:
    """A field as str/int/float/bool or a list of them; `ReaderField.contents()` does this only
    from gguf 0.16, and the project allows older gguf."""
    parts = [field.parts[index] for index in field.data]
    if field.types[-1] == GGUFValueType.STRING:
        values = [bytes(part).decode("utf-8") for part in parts]
    else:
        values = [part[0].item() for part in parts]
    return values if field.types[0] == GGUFValueType.ARRAY else values[0]


def _byte_level_backend(meta: Mapping[str, Any]) -> Backend:
    """GPT-2 style byte-level BPE from the file's tokens and merges."""
    alphabet = _bytes_to_unicode()
    spelled = set(alphabet.values())
    vocab = {
        token if set(token) <= spelled else "".join(alphabet[byte] for byte in token.encode()): index
        for index, token in enumerate(meta["tokenizer.ggml.tokens"])
    }
    merges = [tuple(merge.split(" ", 1)) for merge in meta.get("tokenizer.ggml.merges", ())]
    bpe = models.BPE(
        vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False
    )
    backend = Backend(bpe)
    backend.pre_tokenizer = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    backend.decoder = decoders.ByteLevel()
    return backend


def _byte_level_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    """How text is cut before BPE, chosen by `tokenizer.ggml.pre` as transformers chooses it."""
    split = _SPLIT_BY_PRE.get(pre)
    if split is None:
        # GPT-2's own regex, transformers' fallback for every other `pre`. That includes "smollm":
        # SmolLM2's tokenizer.json (and llama.cpp) isolate each digit before this regex, transformers
        # does not. We follow transformers. The vocabulary has no multi-character numeric token, so
        # digits still come out one per token; the two differ only on a whitespace run right before
        # a digit ("a  1": transformers gives "Ġ","Ġ","1", SmolLM2's own tokenizer "ĠĠ","1").
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _sentencepiece_backend(meta: Mapping[str, Any]) -> Backend:
    """SentencePiece BPE with byte fallback: "▁" stands for a space, unknown bytes become <0xNN>."""
    tokens = meta["tokenizer.ggml.tokens"]
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    else:
        merges = _merges_from_scores(tokens, meta["tokenizer.ggml.scores"])
    vocab = {token: index for index, token in enumerate(tokens)}
    backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
    # transformers always prefixes; llama.cpp honours the flag, which only files that opt out see.
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SPIECE_SPACE, prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merges_from_scores(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """SentencePiece files store scores, not merges: every split of a piece into two known pieces
    is a merge, ranked by the piece's score. Ordering and tie-breaks follow transformers'
    `generate_merges` so the resulting BPE is the same one."""
    vocab = {token: index for index, token in enumerate(tokens)}
    ranked: list[tuple[float, str, str]] = []
    for piece, score in dict(zip(tokens, scores)).items():
        splits = [(piece[:cut], piece[cut:]) for cut in range(1, len(piece))]
        known = sorted(
            ((left, right) for left, right in splits if left in vocab and right in vocab),
            key=lambda pair: (vocab[pair[0]], vocab[pair[1]]),
        )
        ranked.extend((score, left, right) for left, right in known)
    ranked.sort(key=lambda merge: (merge[0], len(merge[1]), len(merge[2])), reverse=True)
    return [(left, right) for _, left, right in ranked]


def _add_gguf_special_tokens(backend: Backend, meta: Mapping[str, Any], byte_level: bool) -> None:
    """Make control tokens (and BOS/EOS/UNK/PAD) special and user-defined ones added tokens, so
    markers like <|im_start|> are matched whole in text instead of being cut into pieces.

    A byte-level token spelled outside the byte alphabet is a llama.cpp mislabel that is not in
    the vocabulary as written; adding it would grow the vocabulary, so it is skipped (as transformers does).
    """
    tokens = meta["tokenizer.ggml.tokens"]
    kinds = meta.get("tokenizer.ggml.token_type", ())
    spelled = set(_bytes_to_unicode().values())
    named = (
        tokens[meta[key]]
        for key in (
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.unknown_token_id",
            "tokenizer.ggml.padding_token_id",
        )
        if key in meta
    )
    control = (token for token, kind in zip(tokens, kinds) if kind == TokenType.CONTROL)
    special = [
        token
        for token in dict.fromkeys([*control, *named])
        if backend.token_to_id(token) is not None and (not byte_level or set(token) <= spelled)
    ]
    user_defined = [
        token
        for token, kind in zip(tokens, kinds)
        if kind == TokenType.USER_DEFINED and backend.token_to_id(token) is not None
    ]
    backend.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in special])
    backend.add_tokens([AddedToken(token, normalized=False, special=False) for token in user_defined])


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet byte-level vocabularies are spelled in."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # "!".."~", "¡".."¬", "®".."ÿ"
    table = {byte: chr(byte) for byte in printable}
    others = (byte for byte in range(256) if byte not in table)
    table.update({byte: chr(256 + offset) for offset, byte in enumerate(others)})
    return table


def _spells_bytes(backend: Backend) -> bool:
    """Whether the vocabulary spells tokens in GPT-2's byte alphabet: its decoder is ByteLevel,
    alone or within a sequence of decoders."""
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(part.get("type") == "ByteLevel" for part in parts)


@lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {char: byte for byte, char in _bytes_to_unicode().items()}


_GGUF_BACKENDS: dict[str, Callable[[Mapping[str, Any]], Backend]] = {
    "gpt2": _byte_level_backend,
    "llama": _sentencepiece_backend,
}


# ------------------------------------------------------------------------------ tokenizer.json


def _read_json(path: Path) -> dict[str, Any]:
    """An optional JSON file: absent means empty."""
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as file:
        return json.load(file)


def _config_chat_template(config: Mapping[str, Any], directory: Path) -> str | None:
    """tokenizer_config's template: a string, or a list of named ones (use "default"); newer
    checkpoints keep it in chat_template.jinja instead."""
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((entry["template"] for entry in template if entry.get("name") == "default"), None)
    jinja_file = directory / "chat_template.jinja"
    if template is None and jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    return template


def _token_id(backend: Backend, token: str | Mapping[str, Any] | None) -> int | None:
    """The id of a config token given as a string or an AddedToken dict ({"content": ...})."""
    if isinstance(token, Mapping):
        token = token.get("content")
    return backend.token_to_id(token) if token else None


def _existing_file(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return path


# ------------------------------------------------------------------------------ shared helpers


def _stop_ids(
    backend: Backend, eos_id: int | None, extra: Iterable[int], chat_template: str | None
) -> tuple[int, ...]:
    """EOS, the file's own end-of-turn ids, and end-of-turn markers the template writes."""
    used = [marker for marker in END_OF_TURN_MARKERS if chat_template and marker in chat_template]
    markers = (backend.token_to_id(marker) for marker in used)
    ids = [eos_id, *extra, *markers]
    return tuple(dict.fromkeys(index for index in ids if index is not None))


def _chars_per_token(backend: Backend) -> int | None:
    """The most input characters one token can stand for, or None if unbounded.

    A BPE token spells at most its own length: byte-level vocabularies spell one byte (so at most
    one character) per symbol, SentencePiece ones one character ("▁" for a space). A normalizer
    may compose characters before the model sees them (NFKC joins up to three Hangul jamo into
    one syllable), so its presence quadruples the bound. Models that fuse runs of unknown
    characters into one token have no bound.
    """
    model = backend.model
    if not isinstance(model, models.BPE) or (model.fuse_unk and not model.byte_fallback):
        return None
    longest = max(len(token) for token in backend.get_vocab(with_added_tokens=True))
    return longest * (4 if backend.normalizer is not None else 1)


def _check_messages(messages: Sequence[Any]) -> None:
    """Catch malformed requests here, with a message a client can act on, not inside the template."""
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            kind = type(message).__name__
            raise ValueError(f"message {index} must be a dict with 'role' and 'content', got {kind}")
        for field in ("role", "content"):
            if not isinstance(message.get(field), str):
                raise ValueError(f"message {index}: {field!r} must be a string, got {message.get(field)!r}")


@lru_cache(maxsize=8)
def _compile_template(source: str) -> jinja2.Template:
    """A sandboxed environment configured like transformers', since templates are written against it."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **kwargs: Any) -> str:
    """Jinja's own tojson HTML-escapes; templates expect plain JSON."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **kwargs)
