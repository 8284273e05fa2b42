"""Tests for glmrun.chat_format: message checks, ChatGLM2 rounds, template rendering, format detection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from glmrun.chat_format import (
    build_chatglm2_prompt,
    chatglm2_prompt_from_messages,
    check_messages,
    compile_chat_template,
    detect_chatglm_format,
    render_chat_template,
)
from glmrun.errors import ConfigError, InvalidArgumentError

# THUDM/chatglm3-6b's tokenizer_config.json chat_template (its role token comes from a variable).
CHATGLM3_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}[gMASK]sop<|{{ message['role'] }}|>\n {{ message['content'] }}"
    "{% else %}<|{{ message['role'] }}|>\n {{ message['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
GREETING = "你好👋！我是人工智能助手 ChatGLM2-6B，很高兴见到你，欢迎问我任何问题。"


def test_chatglm2_prompt_first_round() -> None:
    assert build_chatglm2_prompt("你好") == "[Round 1]\n\n问：你好\n\n答："


def test_chatglm2_prompt_with_history() -> None:
    # Expected text from li-plus/chatglm.cpp chatglm_test.cpp (ChatGLM2 prompter case).
    expected = f"[Round 1]\n\n问：你好\n\n答：{GREETING}\n\n[Round 2]\n\n问：晚上睡不着应该怎么办\n\n答："
    assert build_chatglm2_prompt("晚上睡不着应该怎么办", [("你好", GREETING)]) == expected
    messages = [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": GREETING},
        {"role": "user", "content": "晚上睡不着应该怎么办"},
    ]
    assert chatglm2_prompt_from_messages(messages) == expected


def test_chatglm2_system_message_is_text_before_round_one() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert chatglm2_prompt_from_messages(messages) == "Be brief.\n\n[Round 1]\n\n问：hi\n\n答："


def test_chatglm2_empty_system_message_adds_nothing() -> None:
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}]
    assert chatglm2_prompt_from_messages(messages) == build_chatglm2_prompt("hi")


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ([], "empty"),
        ("hello", "list"),
        ([{"role": "user"}], "content"),
        ([{"role": "user", "content": 3}], "str"),
        ([{"role": "bot", "content": "x"}], "role"),
        (["hello"], "dict"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "last message"),
    ],
)
def test_check_messages_rejects(messages: object, needle: str) -> None:
    with pytest.raises(InvalidArgumentError, match=needle):
        check_messages(messages)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "roles",
    [
        ["user", "user"],
        ["assistant", "user"],
        ["system", "system", "user"],
        ["user", "system", "user"],
        ["user", "assistant", "assistant", "user"],
    ],
)
def test_chatglm2_turns_must_alternate(roles: list[str]) -> None:
    messages = [{"role": role, "content": role} for role in roles]
    check_messages(messages)  # the loose check lets these through
    with pytest.raises(InvalidArgumentError, match="alternation"):
        chatglm2_prompt_from_messages(messages)


def test_render_official_chatglm3_template() -> None:
    messages = [
        {"role": "system", "content": "You are a helpful assistant"},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there"},
        {"role": "user", "content": "Who are you"},
    ]
    expected = (
        "[gMASK]sop<|system|>\n You are a helpful assistant<|user|>\n Hello<|assistant|>\n Hi there"
        "<|user|>\n Who are you<|assistant|>"
    )
    assert render_chat_template(CHATGLM3_TEMPLATE, messages) == expected
    assert (
        render_chat_template(CHATGLM3_TEMPLATE, messages, add_generation_prompt=False)
        == expected[: -len("<|assistant|>")]
    )


def test_render_trims_blocks_like_transformers() -> None:
    # A block tag eats the newline after it and the indentation before it; `{{ }}` keeps both.
    template = (
        "{{ bos_token }}\n{% for m in messages %}\n    {% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}\n"
        "{% endfor %}  {{ eos_token }}"
    )
    text = render_chat_template(template, [{"role": "user", "content": "hi"}], bos_token="<s>", eos_token="</s>")
    assert text == "<s>\nhi  </s>"


def test_render_helpers() -> None:
    template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
        "{{ m | tojson }}{% endfor %}{{ strftime_now('%Y') | length }}"
    )
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "<é>"}]
    assert render_chat_template(template, messages) == '{"role": "user", "content": "<é>"}4'


def test_template_can_refuse_a_conversation() -> None:
    template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}ok"
    assert render_chat_template(template, [{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(InvalidArgumentError, match="System role not supported"):
        render_chat_template(template, [{"role": "system", "content": "s"}, {"role": "user", "content": "x"}])


def test_template_is_sandboxed() -> None:
    template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(InvalidArgumentError):
        render_chat_template(template, [{"role": "user", "content": "x"}])


def test_broken_template_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="does not parse"):
        compile_chat_template("{% for m in messages %}")


def _write_config(folder: Path, config: dict[str, object]) -> Path:
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.mark.parametrize(
    "config",
    [
        {"tokenizer_class": "ChatGLMTokenizer", "chat_template": CHATGLM3_TEMPLATE},
        {"chat_template": "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"},
        {"chat_template": [{"name": "default", "template": "<|user|>{{ messages[0]['content'] }}"}]},
        {"added_tokens_decoder": {"64795": {"content": "<|user|>", "special": True}}},
        {"additional_special_tokens": ["<|system|>", "<|user|>"]},
        {"special_tokens": {"<|user|>": 64795}},
    ],
)
def test_detect_chatglm3(tmp_path: Path, config: dict[str, object]) -> None:
    assert detect_chatglm_format(_write_config(tmp_path, config)) == "chatglm3"


@pytest.mark.parametrize(
    "config",
    [
        {"name_or_path": "THUDM/chatglm2-6b", "tokenizer_class": "ChatGLMTokenizer", "remove_space": False},
        {"chat_template": "{% for m in messages %}[Round {{ loop.index }}]{% endfor %}"},
        {"additional_special_tokens": ["<|im_start|>"]},
    ],
)
def test_detect_chatglm2(tmp_path: Path, config: dict[str, object]) -> None:
    assert detect_chatglm_format(_write_config(tmp_path, config)) == "chatglm2"


def test_detect_never_reads_the_folder_name(tmp_path: Path) -> None:
    folder = tmp_path / "chatglm3-6b"
    folder.mkdir()
    assert detect_chatglm_format(folder) == "chatglm2"  # no tokenizer_config.json at all


def test_detect_broken_config(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="tokenizer_config.json"):
        detect_chatglm_format(tmp_path)
