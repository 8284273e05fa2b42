"""The official ChatGLM2 ``api.py`` endpoint: ``POST /`` with ``{prompt, history, max_length, top_p, temperature}``.

Answers ``{response, history, status, time}`` as THUDM/ChatGLM2-6B's ``api.py`` does
(https://github.com/THUDM/ChatGLM2-6B/blob/main/api.py), with its defaults: max_length 2048,
top_p 0.7, temperature 0.95. Unlike it, ``temperature=0`` (or ``top_p=0``) means greedy rather
than "use the default", and the request goes through the scheduler like every other.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Request

from ..chat_format import Message
from ..sampling import SamplingParams
from .http_errors import APIError
from .protocol import LegacyChatRequest
from .service import Service

__all__ = ["legacy_router"]

_TOP_P, _TEMPERATURE = 0.7, 0.95  # api.py: top_p if top_p else 0.7, temperature if temperature else 0.95


def legacy_router(service: Service, auth: Callable[..., Any]) -> APIRouter:
    router = APIRouter(dependencies=[Depends(auth)])

    @router.post("/")
    async def chat(body: LegacyChatRequest, request: Request) -> dict[str, Any]:
        history = [(str(q), str(a)) for q, a in body.history or []]
        messages: list[Message] = []
        for query, answer in history:
            messages.append({"role": "user", "content": query})
            messages.append({"role": "assistant", "content": answer})
        messages.append({"role": "user", "content": body.prompt})
        ids = service.chat_ids(messages)
        greedy = body.temperature == 0 or body.top_p == 0
        max_length = min(body.max_length or service.settings.legacy_max_length, service.context_length)
        try:
            params = SamplingParams(
                temperature=body.temperature if body.temperature and not greedy else _TEMPERATURE,
                top_p=body.top_p if body.top_p and not greedy else _TOP_P,
                do_sample=not greedy,
                max_length=max_length,
            )
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        handle = service.submit(ids, params, request_id=f"legacy-{uuid.uuid4().hex}", param="prompt")
        result = await service.complete(handle, request)
        return {
            "response": result.text,
            "history": [list(turn) for turn in history] + [[body.prompt, result.text]],
            "status": 200,
            "time": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
        }

    return router
