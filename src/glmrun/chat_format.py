"""Chat formats: turning a conversation into the prompt text a model was trained on.

One responsibility: the *text side* of chat prompts. This module knows the message shape
(`Message`), checks a conversation is well formed, writes the ChatGLM2 round format, renders a
Jinja chat template the way transformers does, and tells ChatGLM2 from ChatGLM3 checkpoints by
their own `tokenizer_config.json`. Turning the text into ids is the tokenizer's job
(`glmrun.tokenizer`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, NoReturn, TypedDict

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from glmrun.errors import ConfigError, InvalidArgumentError

__all__ = [
    "CHAT_FORMATS",
    "ROLES",
    "Message",
    "Role",
    "build_chatglm2_prompt",
    "chatglm2_prompt_from_messages",
    "check_messages",
    "compile_chat_template",
    "detect_chatglm_format",
    "render_chat_template",
]

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")
CHAT_FORMATS: tuple[str, ...] = ("chatglm2", "chatglm3")

# The role tokens only ChatGLM3's tokenizer has; any of them in a tokenizer_config marks ChatGLM3.
_CHATGLM3_ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")


class Message(TypedDict):
    """One chat turn, in the OpenAI / transformers shape."""

    role: Role
    content: str


def check_messages(messages: Sequence[Mapping[str, Any]], *, strict_turns: bool = False) -> list[Message]:
    """Return `messages` as a list after checking they form a prompt that asks for a reply.

    Always checked: at least one message, each a mapping with a known `role` and a `str`
    `content`, and the last one from the user (the model answers it). With `strict_turns`
    (ChatGLM2's rounds) also: at most one system message, only first, then user and assistant
    strictly alternating. Raises `InvalidArgumentError` naming the offending message.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidArgumentError(
            f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}"
        )
    if not messages:
        raise InvalidArgumentError("messages is empty: pass at least one {'role': 'user', 'content': ...} message")
    checked: list[Message] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidArgumentError(f"messages[{index}] must be a dict with 'role' and 'content', got {message!r}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise InvalidArgumentError(f"messages[{index}] has role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise InvalidArgumentError(f"messages[{index}]['content'] must be a str, got {type(content).__name__}")
        checked.append(Message(role=role, content=content))
    if checked[-1]["role"] != "user":
        raise InvalidArgumentError(
            f"the last message must come from the user (the model replies to it), got {checked[-1]['role']!r}"
        )
    if strict_turns:
        turns = checked[1:] if checked[0]["role"] == "system" else checked
        for offset, message in enumerate(turns):
            expected = "user" if offset % 2 == 0 else "assistant"
            if message["role"] != expected:
                index = offset + len(checked) - len(turns)
                raise InvalidArgumentError(
                    f"messages[{index}] is {message['role']!r} but {expected!r} was expected: this chat format "
                    "takes an optional first system message, then user and assistant turns in alternation"
                )
    return checked


def build_chatglm2_prompt(query: str, history: Sequence[tuple[str, str]] = ()) -> str:
    """ChatGLM2's prompt text, exactly as the official `ChatGLMTokenizer.build_prompt`.

    Rounds count from 1 (ChatGLM-6B counted from 0): every past (question, answer) pair is
    `"[Round i]\\n\\n问：{q}\\n\\n答：{r}\\n\\n"`, and the new query ends the text with `"答："`.
    """
    parts = [
        f"[Round {index}]\n\n问：{question}\n\n答：{answer}\n\n" for index, (question, answer) in enumerate(history, 1)
    ]
    parts.append(f"[Round {len(history) + 1}]\n\n问：{query}\n\n答：")
    return "".join(parts)


def chatglm2_prompt_from_messages(messages: Sequence[Mapping[str, Any]]) -> str:
    """The ChatGLM2 prompt for a conversation given as messages.

    ChatGLM2 was trained without a system role. A system message, when there is one, is written
    as plain text followed by a blank line before `[Round 1]`; this is glmrun's choice, the
    official code has no place for it. User/assistant pairs become the history rounds.
    """
    checked = check_messages(messages, strict_turns=True)
    system = checked[0]["content"] if checked[0]["role"] == "system" else None
    turns = checked[1:] if system is not None else checked
    history = [(turns[i]["content"], turns[i + 1]["content"]) for i in range(0, len(turns) - 1, 2)]
    prompt = build_chatglm2_prompt(turns[-1]["content"], history)
    return f"{system}\n\n{prompt}" if system else prompt


def _raise_exception(message: str) -> NoReturn:
    # Templates call raise_exception('...') to refuse a conversation (e.g. a system role).
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    # Jinja's own `tojson` escapes HTML characters; chat templates expect plain JSON (as transformers does).
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def compile_chat_template(template: str) -> jinja2.Template:
    """Compile a chat template in a sandbox set up like transformers' `apply_chat_template`.

    Blocks trim their newline and leading spaces (`trim_blocks`, `lstrip_blocks`), `break` and
    `continue` work, and templates get `raise_exception`, `strftime_now` and a plain `tojson`.
    A template that does not parse raises `ConfigError`.
    """
    if not isinstance(template, str):
        raise ConfigError(f"tokenizer.chat_template must be a string, got {type(template).__name__}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as error:
        raise ConfigError(f"the model's chat template does not parse (line {error.lineno}): {error.message}") from error


def render_chat_template(
    template: jinja2.Template | str,
    messages: Sequence[Mapping[str, Any]],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
) -> str:
    """Render a conversation with a chat template; the text ends where the reply starts.

    Whatever the template writes is kept as is, including a default system prompt it adds when
    the messages have none. A template that refuses the conversation (`raise_exception`) raises
    `InvalidArgumentError` with the template's message.
    """
    checked = check_messages(messages)
    compiled = compile_chat_template(template) if isinstance(template, str) else template
    try:
        return compiled.render(
            messages=[dict(message) for message in checked],
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
        )
    except jinja2.exceptions.TemplateError as error:
        raise InvalidArgumentError(f"the model's chat template refused these messages: {error}") from error


def _names_in(value: Any) -> list[str]:
    """Token strings found in a tokenizer_config value (a list, an id->token dict, or token dicts)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        if isinstance(value.get("content"), str):
            return [value["content"]]
        keys = [key for key in value if isinstance(key, str)]  # {"<|user|>": 64795} style lists
        return keys + [name for item in value.values() for name in _names_in(item)]
    if isinstance(value, (list, tuple)):
        return [name for item in value for name in _names_in(item)]
    return []


def detect_chatglm_format(folder: Path) -> str:
    """`"chatglm3"` or `"chatglm2"`, read from the checkpoint's own `tokenizer_config.json`.

    ChatGLM2 and ChatGLM3 ship byte-identical `tokenizer.model` files; only the tokenizer config
    tells them apart. It is ChatGLM3 when the config's `chat_template` writes a role token
    (`<|user|>`, `<|assistant|>`...; the official template writes `<|assistant|>` literally) or a
    special-token list names one. Otherwise (or without the file) ChatGLM2. The folder's name is
    never looked at.
    """
    config_path = Path(folder) / "tokenizer_config.json"
    if not config_path.is_file():
        return "chatglm2"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{config_path} is not valid JSON ({error}); restore it from the model's folder") from error
    if not isinstance(config, Mapping):
        raise ConfigError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
    # A string, or a list of {"name", "template"} dicts in configs with several templates.
    templates = _names_in(config.get("chat_template"))
    if any(token in template for template in templates for token in _CHATGLM3_ROLE_TOKENS):
        return "chatglm3"
    listed = [
        name
        for key in ("additional_special_tokens", "added_tokens_decoder", "special_tokens", "extra_special_tokens")
        for name in _names_in(config.get(key))
    ]
    return "chatglm3" if any(token in listed for token in _CHATGLM3_ROLE_TOKENS) else "chatglm2"
