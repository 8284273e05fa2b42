"""Triton, where it is installed: ``triton`` and ``triton.language`` as ``tl``, or ``None`` for both.

Triton ships with CUDA builds of torch; CPU installs do not have it, and glmrun's kernel modules still import
there (every call then takes the portable path). Import from here so the kernel modules agree on it.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["tl", "triton"]


def _load() -> tuple[Any, Any]:
    try:
        return importlib.import_module("triton"), importlib.import_module("triton.language")
    except ImportError:  # pragma: no cover - depends on the installation
        return None, None


triton, tl = _load()
