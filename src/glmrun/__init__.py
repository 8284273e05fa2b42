"""glmrun: run ChatGLM2-6B (and its family) natively on your own GPUs or CPU."""

from __future__ import annotations

__version__ = "0.1.0"
