"""Jupyter display: stream a chat answer as live Markdown in the cell's output."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .api import GLMModel

__all__ = ["display_chat"]


def display_chat(
    model: GLMModel,
    query: str,
    history: Sequence[tuple[str, str]] | None = None,
    *,
    system: str | None = None,
    **options: Any,
) -> list[tuple[str, str]]:
    """Show the answer to ``query`` growing as Markdown in the notebook; return the new history.

    ``options`` are generation options (``temperature``, ``max_new_tokens``, ``do_sample``...).
    """
    from IPython.display import Markdown, display

    handle = display(Markdown(""), display_id=True)
    new_history = list(history or [])
    for chunk in model.stream_chat(query, history, system=system, **options):
        if chunk.delta or chunk.result is not None:
            if handle is not None:
                handle.update(Markdown(chunk.text))
        new_history = chunk.history
    return new_history
