"""Tokenizers: text to token ids and back, and a conversation to the ids a model continues.

One responsibility: ids. `ChatGLMTokenizer` is ChatGLM2/ChatGLM3's SentencePiece tokenizer,
`GGUFTokenizer` the byte-level BPE a GGUF file describes; both satisfy the `Tokenizer` protocol
the engine and chat layers use. `IncrementalDetokenizer` turns a stream of ids into a stream of
text. The prompt *text* formats live in `glmrun.chat_format`.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import jinja2
import sentencepiece
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from glmrun.chat_format import (
    CHAT_FORMATS,
    Message,
    build_chatglm2_prompt,
    chatglm2_prompt_from_messages,
    check_messages,
    compile_chat_template,
    render_chat_template,
)
from glmrun.errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    InvalidArgumentError,
    UnsupportedModelError,
)
from glmrun.gguf_meta import read_gguf_metadata

__all__ = ["ChatGLMTokenizer", "GGUFTokenizer", "IncrementalDetokenizer", "Message", "Tokenizer"]


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of glmrun needs from a tokenizer."""

    @property
    def name(self) -> str: ...
    @property
    def vocab_size(self) -> int: ...  # ids the tokenizer knows, special ones included
    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...  # any of these ends a reply
    @property
    def special_ids(self) -> frozenset[int]: ...  # ids `decode` drops by default
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str: ...
    def build_chat_ids(self, messages: Sequence[Message]) -> list[int]: ...


def _check_text(text: object) -> str:
    if not isinstance(text, str):
        raise InvalidArgumentError(f"encode() takes a str, got {type(text).__name__}")
    return text


def _check_ids(ids: Iterable[Any]) -> list[int]:
    """Ids as plain ints (numpy and torch integer scalars welcome); negatives are refused."""
    try:
        checked = [operator.index(token_id) for token_id in ids]
    except TypeError as error:
        raise InvalidArgumentError(f"token ids must be integers: {error}") from error
    negative = [token_id for token_id in checked if token_id < 0]
    if negative:
        raise InvalidArgumentError(f"token ids must be >= 0, got {negative[0]}")
    return checked


# Appended after the SentencePiece vocabulary, in this order, by the official tokenizers.
_GLM_SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
_GLM3_ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")


class ChatGLMTokenizer:
    """The ChatGLM2 / ChatGLM3 tokenizer: SentencePiece plus special tokens after its vocabulary.

    Both models ship the same `tokenizer.model` (64789 pieces). `[MASK] [gMASK] [sMASK] sop eop`
    follow as 64789..64793 and, for ChatGLM3, `<|system|> <|user|> <|assistant|> <|observation|>`
    as 64794..64797, so `vocab_size` is 64794 for ChatGLM2 and 64798 for ChatGLM3, like the
    official classes. Text never turns into special ids: `encode("[gMASK]")` spells it out.
    """

    def __init__(self, sp_model: sentencepiece.SentencePieceProcessor, *, chat_format: str = "chatglm2") -> None:
        if chat_format not in CHAT_FORMATS:
            raise InvalidArgumentError(f"chat_format must be one of {', '.join(CHAT_FORMATS)}, got {chat_format!r}")
        self._sp = sp_model
        self.chat_format = chat_format
        self.name = chat_format
        self._sp_size: int = sp_model.vocab_size()
        names = _GLM_SPECIAL_TOKENS + (_GLM3_ROLE_TOKENS if chat_format == "chatglm3" else ())
        self._special_by_id = {self._sp_size + offset: name for offset, name in enumerate(names)}
        self._id_by_special = {name: token_id for token_id, name in self._special_by_id.items()}
        self.vocab_size = self._sp_size + len(names)
        # <unk>, <s>, </s> are SentencePiece control pieces; the official decode drops them too.
        control = {token_id for token_id in (sp_model.unk_id(), sp_model.bos_id(), sp_model.eos_id()) if token_id >= 0}
        self.special_ids = frozenset(control | set(self._special_by_id))
        self.prefix_ids: tuple[int, ...] = (self._id_by_special["[gMASK]"], self._id_by_special["sop"])
        # eop ends a generated span in the GLM objective; ChatGLM3 also ends a reply by starting the
        # next turn: <|user|> or <|observation|>.
        turn_ends = ("eop", "<|user|>", "<|observation|>") if chat_format == "chatglm3" else ("eop",)
        self.eos_token_ids = (sp_model.eos_id(), *(self._id_by_special[token] for token in turn_ends))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, chat_format: str = "chatglm2") -> ChatGLMTokenizer:
        """Load `tokenizer.model` (or the one inside `path` when it is the model folder)."""
        file = Path(path)
        if file.is_dir():
            file = file / "tokenizer.model"
        if not file.is_file():
            raise CheckpointNotFoundError(
                f"tokenizer.model not found at {file}. Copy tokenizer.model from the model's Hugging Face "
                "folder (e.g. THUDM/chatglm2-6b) next to config.json, or pass its path."
            )
        sp_model = sentencepiece.SentencePieceProcessor()
        try:
            sp_model.Load(str(file))
        except (RuntimeError, OSError, ValueError) as error:
            raise CorruptCheckpointError(
                f"{file} is not a SentencePiece model ({error}); the download may be truncated or an LFS "
                "pointer, fetch tokenizer.model again"
            ) from error
        return cls(sp_model, chat_format=chat_format)

    def token_id(self, token: str) -> int:
        """The id of a special token such as `"[gMASK]"` or `"<|user|>"`."""
        if token not in self._id_by_special:
            raise InvalidArgumentError(
                f"{token!r} is not a special token of {self.name}: {', '.join(self._id_by_special)}"
            )
        return self._id_by_special[token]

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """SentencePiece ids of `text`, after `[gMASK] sop` when `add_special_tokens`."""
        ids: list[int] = self._sp.encode(_check_text(text))
        return [*self.prefix_ids, *ids] if add_special_tokens else ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Special ids are dropped, or written as their names when not skipped.

        Ids past the vocabulary (the model's embedding is padded to 65024 rows) decode to
        nothing, so a sample from the padding cannot break a stream.
        """
        parts: list[str] = []
        run: list[int] = []
        for token_id in _check_ids(ids):
            if token_id in self.special_ids:
                if skip_special_tokens:
                    continue
                parts.append(self._sp.decode(run))
                run = []
                parts.append(self._special_by_id.get(token_id) or self._sp.id_to_piece(token_id))
            elif token_id < self._sp_size:
                run.append(token_id)
        parts.append(self._sp.decode(run))
        return "".join(parts)

    def build_prompt(self, query: str, history: Sequence[tuple[str, str]] = ()) -> str:
        """ChatGLM2's round-format prompt text (see `glmrun.chat_format.build_chatglm2_prompt`)."""
        return build_chatglm2_prompt(query, history)

    def build_single_message(self, role: str, metadata: str, content: str) -> list[int]:
        """ChatGLM3's ids for one turn: `<|role|>`, then `metadata + "\\n"`, then the content."""
        if self.chat_format != "chatglm3":
            raise InvalidArgumentError("role tokens exist only in the chatglm3 format")
        role_id = self.token_id(f"<|{role}|>")
        return [
            role_id,
            *self.encode(f"{metadata}\n", add_special_tokens=False),
            *self.encode(content, add_special_tokens=False),
        ]

    def build_chat_ids(self, messages: Sequence[Message]) -> list[int]:
        """Ids of a conversation ending where the assistant's reply starts.

        ChatGLM2: the round-format text (`chatglm2_prompt_from_messages`; a system message is
        plain text before round 1). ChatGLM3: `[gMASK] sop`, every message in the role format,
        then `<|assistant|>`, as the official `build_chat_input`.
        """
        if self.chat_format == "chatglm2":
            return self.encode(chatglm2_prompt_from_messages(messages))
        ids = list(self.prefix_ids)
        for message in check_messages(messages):
            ids.extend(self.build_single_message(message["role"], "", message["content"]))
        ids.append(self.token_id("<|assistant|>"))
        return ids


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are written in.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, 0x7F-0xA0,
    0xAD) take the characters from U+0100 on, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) whose split differs from GPT-2's, in the
# regex syntax of the `tokenizers` library. Anything else gets GPT-2's split, as in transformers.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>")
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _bpe_backend(vocab: dict[str, int], merges: Sequence[str], pre: object) -> HFTokenizer:
    """The byte-level BPE pipeline transformers builds for a GGUF vocabulary (GPT-2's, by default)."""
    pairs: list[tuple[str, str]] = []
    for merge in merges:
        left, _, right = merge.partition(" ")
        if not left or not right:
            raise ConfigError(f"GGUF tokenizer.ggml.merges holds {merge!r}; each merge is two tokens and a space")
        pairs.append((left, right))
    bpe = models.BPE(vocab=vocab, merges=pairs, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    backend = HFTokenizer(bpe)
    split = _PRE_TOKENIZER_SPLITS.get(str(pre))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    return backend


class GGUFTokenizer:
    """Byte-level BPE (`tokenizer.ggml.model == "gpt2"`) built from a GGUF file's metadata.

    Built like transformers' GGUF conversion: the file's tokens and merges, GPT-2's byte-level
    pre-tokenizer (or the split named by `tokenizer.ggml.pre`), CONTROL tokens and the
    bos/eos/unk/pad tokens added as special tokens, USER_DEFINED tokens added as whole but
    ordinary tokens. Chats are rendered with the file's `tokenizer.chat_template`.
    """

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        name: str,
        bos_token: str,
        eos_token: str,
        eos_token_ids: tuple[int, ...],
        special_ids: frozenset[int],
        chat_template: str | None = None,
        add_bos_token: bool = False,
    ) -> None:
        self._backend = backend
        self.name = name
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token, self.eos_token = bos_token, eos_token
        self.eos_token_ids = eos_token_ids
        self.special_ids = special_ids
        self.chat_template = chat_template
        self._bos_id = backend.token_to_id(bos_token) if bos_token else None
        self._add_bos = add_bos_token and self._bos_id is not None
        self._compiled: jinja2.Template | None = None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> GGUFTokenizer:
        """Read a .gguf file's metadata and build its tokenizer."""
        return cls.from_metadata(read_gguf_metadata(path))

    @classmethod
    def from_metadata(cls, fields: Mapping[str, Any]) -> GGUFTokenizer:
        """Build from GGUF metadata given as plain values (see `glmrun.gguf_meta.read_gguf_metadata`)."""
        model_kind = fields.get("tokenizer.ggml.model")
        if model_kind != "gpt2":
            raise UnsupportedModelError(
                f"GGUF tokenizer.ggml.model is {model_kind!r}; glmrun reads byte-level BPE ('gpt2') vocabularies only"
            )
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id"):
            if key not in fields:
                raise ConfigError(f"GGUF metadata lacks {key}; the file cannot describe its tokenizer without it")
        tokens: list[str] = list(fields["tokenizer.ggml.tokens"])
        types: list[int] = list(fields.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        if len(types) != len(tokens):
            raise ConfigError(f"GGUF tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
        alphabet = _byte_alphabet()
        letters = set(alphabet.values())
        # A token written outside the byte alphabet (e.g. with a real space) is spelled in it first.
        spelled = [t if set(t) <= letters else "".join(alphabet[b] for b in t.encode("utf-8")) for t in tokens]
        vocab = {token: index for index, token in enumerate(spelled)}
        backend = _bpe_backend(vocab, fields["tokenizer.ggml.merges"], fields.get("tokenizer.ggml.pre"))

        def token_at(key: str) -> str:
            index = fields.get(key)
            return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else ""

        named = [token_at(f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos", "unknown", "padding")]
        # A CONTROL token outside the byte alphabet is a llama.cpp mislabel; transformers skips it too.
        control = [t for t, kind in zip(tokens, types, strict=True) if kind == _CONTROL and set(t) <= letters]
        specials = list(dict.fromkeys(control + [t for t in named if t and t in vocab]))
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        user_defined = [t for t, kind in zip(tokens, types, strict=True) if kind == _USER_DEFINED and t in vocab]
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])

        eos_id = int(fields["tokenizer.ggml.eos_token_id"])
        end_ids = [vocab[t] for t in _END_OF_TURN_TOKENS if t in vocab]
        template = fields.get("tokenizer.chat_template")
        return cls(
            backend,
            name=str(fields.get("general.name") or "gguf-bpe"),
            bos_token=named[0],
            eos_token=named[1],
            eos_token_ids=tuple(dict.fromkeys([eos_id, *end_ids])),
            special_ids=frozenset(vocab[t] for t in specials),
            chat_template=template if isinstance(template, str) else None,
            add_bos_token=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        )

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text`; special-token text in it (`<|im_start|>`) becomes its id. BOS is
        prepended only when `add_special_tokens` and the file sets `tokenizer.ggml.add_bos_token`."""
        ids: list[int] = self._backend.encode(_check_text(text), add_special_tokens=False).ids
        return [self._bos_id, *ids] if add_special_tokens and self._add_bos and self._bos_id is not None else ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `ids`; ids past the vocabulary decode to nothing."""
        return str(self._backend.decode(_check_ids(ids), skip_special_tokens=skip_special_tokens))

    def build_chat_ids(self, messages: Sequence[Message]) -> list[int]:
        """Render the file's chat template (generation prompt on) and encode the text as is."""
        if self.chat_template is None:
            raise ConfigError(
                f"{self.name} has no tokenizer.chat_template in its GGUF metadata; it is not a chat model"
            )
        if self._compiled is None:
            self._compiled = compile_chat_template(self.chat_template)
        text = render_chat_template(self._compiled, messages, bos_token=self.bos_token, eos_token=self.eos_token)
        return self.encode(text, add_special_tokens=False)


class IncrementalDetokenizer:
    """Streams text as ids arrive: each `push` returns only the newly finished text.

    Decoding single tokens loses SentencePiece's spaces and splits multi-byte characters, so it
    decodes a short window instead: the ids of the last emitted piece (context) plus the ids not
    yet emitted, and returns what the window adds beyond its context. Text ending in U+FFFD (a
    character whose bytes have not all arrived) is held back. The window restarts at every
    emission, so the work per token does not grow with the length of the stream (only a run of
    ids that add no text, like skipped special ids, widens it), and
    `"".join(pushes) + flush() == tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._window: list[int] = []
        self._context_len = 0  # the window's first ids, already emitted
        self._context_text = ""

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (often "", e.g. half an emoji)."""
        self._window.extend(_check_ids([token_id]))
        text = self._decode(self._window)
        if len(text) <= len(self._context_text) or text.endswith("\ufffd"):
            return ""
        # Keep only the ids of what is emitted now: they are the next window's context.
        self._window = self._window[self._context_len :]
        self._context_len = len(self._window)
        new_text = text[len(self._context_text) :]
        self._context_text = self._decode(self._window)
        return new_text

    def flush(self) -> str:
        """Return whatever is held back (e.g. an unfinished character as U+FFFD); the stream ends.

        The detokenizer is then empty and can start a new, unrelated stream."""
        text = self._decode(self._window)[len(self._context_text) :]
        self._window, self._context_len, self._context_text = [], 0, ""
        return text
