"""OpenAI-compatible routes: ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models``.

Streams are Server-Sent Events, one ``data: {json}`` per piece of text, ending with ``data: [DONE]``,
as the official ``openai`` client reads them. A client that disconnects cancels its generation
(Starlette cancels the stream when the connection drops; non-streamed requests poll for it).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..scheduler import RequestHandle
from .http_errors import APIError, from_glmrun_error
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_chunk,
    chat_messages,
    chat_response,
    completion_chunk,
    completion_response,
    finish_reason,
    sampling_params,
    usage,
)
from .service import Service

__all__ = ["openai_router", "sse"]

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(obj: dict[str, Any] | str) -> str:
    """One Server-Sent Event carrying ``obj`` as JSON (or the literal ``[DONE]``)."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


def openai_router(service: Service, auth: Callable[..., Any]) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(auth)])
    started = int(time.time())

    def model_card() -> dict[str, Any]:
        return {
            "id": service.model_id,
            "object": "model",
            "created": started,
            "owned_by": "glmrun",
            "max_model_len": service.context_length,
        }

    @router.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @router.get("/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        service.check_model(model)
        return model_card()

    @router.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        service.check_model(body.model)
        ids = service.chat_ids(chat_messages(body.messages))
        params = sampling_params(body, service.defaults, max_tokens=body.max_completion_tokens or body.max_tokens)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        handle = service.submit(ids, params, request_id=rid, param="messages")
        created = int(time.time())
        model = service.model_id
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def events() -> AsyncIterator[str]:
                yield sse(chat_chunk(rid, model, created, {"role": "assistant", "content": ""}))
                async for kind, value in _pieces(service, handle):
                    if kind == "text":
                        yield sse(chat_chunk(rid, model, created, {"content": value}))
                    elif kind == "end":
                        yield sse(chat_chunk(rid, model, created, {}, finish_reason(value)))
                        if include_usage:
                            yield sse(chat_chunk(rid, model, created, {}, None, usage(value), choices=False))
                    else:
                        yield sse(value)
                yield sse("[DONE]")

            return StreamingResponse(events(), media_type="text/event-stream", headers=_SSE_HEADERS)
        result = await service.complete(handle, request)
        return JSONResponse(chat_response(rid, model, created, result))

    @router.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        service.check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", param="prompt")
            prompt = str(prompt[0])
        if isinstance(prompt, str):
            ids = service.text_ids(prompt)
        else:
            ids = [int(t) for t in prompt]  # list[int] (or [])
            vocab = service.engine.tokenizer.vocab_size
            if not ids or any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt token ids must be non-empty and in [0, {vocab})", param="prompt")
        params = sampling_params(body, service.defaults, max_tokens=body.max_tokens)
        rid = f"cmpl-{uuid.uuid4().hex}"
        handle = service.submit(ids, params, request_id=rid, param="prompt")
        created = int(time.time())
        model = service.model_id
        echo = ""
        if body.echo:
            echo = prompt if isinstance(prompt, str) else service.engine.tokenizer.decode(ids)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def events() -> AsyncIterator[str]:
                if echo:
                    yield sse(completion_chunk(rid, model, created, echo))
                async for kind, value in _pieces(service, handle):
                    if kind == "text":
                        yield sse(completion_chunk(rid, model, created, value))
                    elif kind == "end":
                        yield sse(completion_chunk(rid, model, created, "", finish_reason(value)))
                        if include_usage:
                            yield sse(completion_chunk(rid, model, created, "", None, usage(value), choices=False))
                    else:
                        yield sse(value)
                yield sse("[DONE]")

            return StreamingResponse(events(), media_type="text/event-stream", headers=_SSE_HEADERS)
        result = await service.complete(handle, request)
        return JSONResponse(completion_response(rid, model, created, echo + result.text, result))

    return router


async def _pieces(service: Service, handle: RequestHandle) -> AsyncIterator[tuple[str, Any]]:
    """("text", str) per piece, then ("end", GenerationResult); or ("error", body) if the generation failed.

    A failure after the response started can only be reported inside the stream, as OpenAI does.
    """
    try:
        async for chunk in service.stream(handle):
            if chunk.text:
                yield "text", chunk.text
            if chunk.result is not None:
                yield "end", chunk.result
    except Exception as exc:  # asyncio.CancelledError (client gone) is not an Exception: it propagates
        yield "error", from_glmrun_error(exc).body()
