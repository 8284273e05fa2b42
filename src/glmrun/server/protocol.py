"""The wire formats: OpenAI's chat and completion requests, the official api.py request, and their replies.

Requests are pydantic models that ignore unknown fields (clients send many we have no use for).
Fields left out take the model's own defaults (ChatGLM2's ``chat()``: temperature 0.8, top_p 0.8);
``temperature=0`` or ``top_p=0`` mean greedy. ``top_k`` and ``repetition_penalty`` are accepted as
extensions, as vLLM does. Replies are plain dicts in OpenAI's shape.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..chat_format import Message
from ..engine import GenerationResult
from ..errors import InvalidArgumentError
from ..sampling import SamplingParams
from .http_errors import APIError

__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "LegacyChatRequest",
    "chat_messages",
    "sampling_params",
    "chat_response",
    "chat_chunk",
    "completion_response",
    "completion_chunk",
    "finish_reason",
    "usage",
]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Lenient):
    type: str
    text: str | None = None


class ChatMessage(_Lenient):
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class _Generation(_Lenient):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for /v1/completions
    echo: bool = False


class LegacyChatRequest(_Lenient):
    """The body of the official ChatGLM2 ``api.py``: ``POST /`` with prompt, history and options."""

    prompt: str
    history: list[tuple[str, str]] | None = None
    max_length: int | None = Field(default=None, ge=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    temperature: float | None = Field(default=None, ge=0)


def chat_messages(messages: list[ChatMessage]) -> list[Message]:
    """OpenAI messages as glmrun's; text parts are joined, "developer" is a system message."""
    out: list[Message] = []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        if role not in ("system", "user", "assistant"):
            raise APIError(
                400,
                f"messages[{i}] has role {message.role!r}; use system, user or assistant",
                param=f"messages.{i}.role",
            )
        content = message.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise APIError(400, f"messages[{i}]: only text content parts are supported", param=f"messages.{i}")
            content = "".join(part.text or "" for part in content)
        out.append({"role": role, "content": content or ""})  # type: ignore[typeddict-item]
    return out


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stops):
        raise APIError(400, "stop sequences must be non-empty strings", param="stop")
    return tuple(stops)


def sampling_params(req: _Generation, defaults: SamplingParams, *, max_tokens: int | None) -> SamplingParams:
    """The request's sampling options over the model's defaults."""
    if req.n != 1:
        raise APIError(400, "only n=1 is supported: send several requests instead", param="n")
    greedy = req.temperature == 0 or req.top_p == 0
    try:
        return SamplingParams(
            temperature=req.temperature if req.temperature is not None and not greedy else defaults.temperature,
            top_p=req.top_p if req.top_p is not None and not greedy else defaults.top_p,
            top_k=req.top_k if req.top_k is not None else defaults.top_k,
            repetition_penalty=req.repetition_penalty or defaults.repetition_penalty,
            do_sample=not greedy,
            seed=req.seed,
            max_new_tokens=max_tokens,
            stop=_stops(req.stop),
        )
    except InvalidArgumentError as exc:
        raise APIError(400, str(exc)) from None


# Replies ------------------------------------------------------------------------------------------
def finish_reason(result: GenerationResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def usage(result: GenerationResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def chat_response(rid: str, model: str, created: int, result: GenerationResult) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "logprobs": None,
                "finish_reason": finish_reason(result),
            }
        ],
        "usage": usage(result),
    }


def chat_chunk(
    rid: str,
    model: str,
    created: int,
    delta: dict[str, str],
    finish: str | None = None,
    usage_: dict[str, int] | None = None,
    *,
    choices: bool = True,
) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return _stream_chunk(rid, model, created, "chat.completion.chunk", choice if choices else None, usage_)


def _stream_chunk(
    rid: str, model: str, created: int, obj: str, choice: dict[str, Any] | None, usage_: dict[str, int] | None
) -> dict[str, Any]:
    """One SSE chunk; ``choice`` None gives the usage-only last chunk of ``stream_options.include_usage``."""
    chunk: dict[str, Any] = {
        "id": rid,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [choice] if choice is not None else [],
    }
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def completion_response(rid: str, model: str, created: int, text: str, result: GenerationResult) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(result)}],
        "usage": usage(result),
    }


def completion_chunk(
    rid: str,
    model: str,
    created: int,
    text: str,
    finish: str | None = None,
    usage_: dict[str, int] | None = None,
    *,
    choices: bool = True,
) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return _stream_chunk(rid, model, created, "text_completion", choice if choices else None, usage_)
