"""The web chat page: Gradio's ``ChatInterface`` mounted at ``/ui`` on the same app.

The page streams from the same scheduler as the API (a chat typed here shares decode steps with API
clients), with the official ``web_demo.py``'s controls: maximum length, top-p, temperature. It
works offline: no analytics, no web fonts, no server-side rendering process. With ``--api-key``
the page asks for a login whose password is the key.
"""

from __future__ import annotations

import hmac
import inspect
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI

from ..chat_format import Message
from ..sampling import SamplingParams
from .http_errors import APIError
from .service import Service

__all__ = ["mount_chat_ui", "history_messages", "page_params", "start_temperature"]

_SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
_MONO_FONTS = ["ui-monospace", "Consolas", "monospace"]


def _text(content: Any) -> str:
    """Gradio message content as text (files and components have none)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_text(part) for part in content)
    if isinstance(content, dict):
        return str(content.get("text") or "") if content.get("type", "text") == "text" else ""
    return ""


def history_messages(history: list[Any], message: Any) -> list[Message]:
    """Gradio's chat history (message dicts, or the older [user, bot] pairs) and the new message."""
    out: list[Message] = []
    for turn in history:
        if isinstance(turn, dict):
            role = turn.get("role")
            if role in ("user", "assistant", "system"):
                out.append({"role": role, "content": _text(turn.get("content"))})
        elif isinstance(turn, (list, tuple)) and len(turn) == 2:
            out.append({"role": "user", "content": _text(turn[0])})
            out.append({"role": "assistant", "content": _text(turn[1])})
    out.append({"role": "user", "content": _text(message)})
    return out


_MAX_NEW_INFO = "at most this many, and never past the end of the context the conversation leaves"


def start_temperature(defaults: SamplingParams) -> float:
    """The temperature slider's starting value: the model's default, or 0 where the model answers greedily."""
    return defaults.temperature if defaults.do_sample else 0.0


def page_params(
    defaults: SamplingParams, room: int, max_new_tokens: float, top_p: float, temperature: float
) -> SamplingParams:
    """A web chat turn's sampling from the page's sliders.

    Temperature or top-p 0 means greedy. "Maximum new tokens" is a ceiling: a reply stops where the
    context ends (``room`` tokens after the conversation), as the official web demo's maximum length
    does, instead of refusing a short question because the slider still reads 512. A conversation
    with no room left (``room`` < 1) asks for one token, so the scheduler refuses it with the counts.
    """
    greedy = temperature == 0 or top_p == 0
    return SamplingParams(
        temperature=float(temperature) if not greedy else defaults.temperature,
        top_p=float(top_p) if not greedy else defaults.top_p,
        do_sample=not greedy,
        max_new_tokens=max(1, min(int(max_new_tokens), room)),
    )


def mount_chat_ui(app: FastAPI, service: Service, *, path: str = "/ui") -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # gradio reads it when imported
    import gradio as gr

    async def respond(
        message: Any, history: list[Any], max_new_tokens: float, top_p: float, temperature: float
    ) -> AsyncIterator[str]:
        try:
            ids = service.chat_ids(history_messages(history, message))
            room = service.context_length - len(ids)
            params = page_params(service.defaults, room, max_new_tokens, top_p, temperature)
            handle = service.submit(ids, params, request_id=f"ui-{uuid.uuid4().hex}", param="messages")
        except APIError as exc:
            raise gr.Error(exc.message) from None
        text = ""
        try:
            async for chunk in service.stream(handle):  # a Stop click cancels this task, and so the request
                text += chunk.text
                yield text
        except APIError as exc:
            raise gr.Error(exc.message) from None

    context = service.context_length
    controls = [
        gr.Slider(1, context, value=min(512, context), step=1, label="Maximum new tokens", info=_MAX_NEW_INFO),
        gr.Slider(0.0, 1.0, value=service.defaults.top_p, step=0.01, label="Top P"),
        gr.Slider(0.0, 2.0, value=start_temperature(service.defaults), step=0.01, label="Temperature (0 = greedy)"),
    ]
    theme = gr.themes.Default(font=_SYSTEM_FONTS, font_mono=_MONO_FONTS)
    chat_options: dict[str, Any] = {
        "title": f"glmrun · {service.model_id}",
        "additional_inputs": controls,
        "analytics_enabled": False,
        "concurrency_limit": None,  # the scheduler queues and batches, not Gradio
        "fill_height": True,
    }
    chat_params = inspect.signature(gr.ChatInterface).parameters
    if "type" in chat_params:  # Gradio 4/5: ask for the message-dict history of Gradio 6
        chat_options["type"] = "messages"
    mount_options: dict[str, Any] = {"ssr_mode": False}
    mount_params = inspect.signature(gr.mount_gradio_app).parameters
    if "theme" in mount_params:  # Gradio 6 takes the theme at mount time, earlier ones on the Blocks
        mount_options["theme"] = theme
    else:
        chat_options["theme"] = theme
    if "footer_links" in mount_params:
        mount_options["footer_links"] = []
    key = service.settings.api_key
    if key is not None:
        expected = key.encode()
        mount_options["auth"] = lambda _user, password: hmac.compare_digest(str(password).encode(), expected)
        mount_options["auth_message"] = "Password: the server's API key (glmrun serve --api-key)."
    demo = gr.ChatInterface(respond, **chat_options)
    gr.mount_gradio_app(app, demo, path=path, **mount_options)
