"""The HTTP server: an OpenAI-compatible API, the official ChatGLM2 ``api.py`` endpoint and a web chat.

``create_app(model, settings)`` builds the FastAPI application; nothing is loaded or started at
import time. FastAPI, uvicorn and Gradio are imported only when an app is built, so
``glmrun.server.cli`` (the ``glmrun serve`` command) stays cheap to import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["ServerSettings", "create_app"]

if TYPE_CHECKING:
    from .app import create_app
    from .settings import ServerSettings

_LAZY = {"create_app": "glmrun.server.app", "ServerSettings": "glmrun.server.settings"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'glmrun.server' has no attribute {name!r}")
