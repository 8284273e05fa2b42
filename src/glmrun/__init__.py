"""glmrun: run ChatGLM2-6B (and its family) natively on your own GPUs or CPU.

    import glmrun
    with glmrun.load("path/to/chatglm2-6b", device="cuda", dtype="float16") as model:
        text, history = model.chat("你好")

Heavy modules (torch) are imported on first use, so ``import glmrun`` and ``glmrun --help`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "load",
    "GLMModel",
    "ChatReply",
    "ChatChunk",
    "Conversation",
    "Document",
    "GenerationResult",
    "StreamChunk",
    "SamplingParams",
    "ModelConfig",
    "QuantSpec",
    "errors",
    "__version__",
]

_LAZY = {
    "load": "glmrun.api",
    "GLMModel": "glmrun.api",
    "ChatReply": "glmrun.api",
    "ChatChunk": "glmrun.api",
    "Conversation": "glmrun.chat",
    "Document": "glmrun.chat",
    "GenerationResult": "glmrun.engine",
    "StreamChunk": "glmrun.engine",
    "SamplingParams": "glmrun.sampling",
    "ModelConfig": "glmrun.config",
    "QuantSpec": "glmrun.config",
}

if TYPE_CHECKING:
    from . import errors
    from .api import ChatChunk, ChatReply, GLMModel, load
    from .chat import Conversation, Document
    from .config import ModelConfig, QuantSpec
    from .engine import GenerationResult, StreamChunk
    from .sampling import SamplingParams


def __getattr__(name: str) -> Any:
    if name == "errors":
        return importlib.import_module("glmrun.errors")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'glmrun' has no attribute {name!r}")
