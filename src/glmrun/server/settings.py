"""What a server is configured with: one frozen dataclass, filled from ``glmrun serve``'s flags."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidArgumentError

__all__ = ["ServerSettings"]


@dataclass(frozen=True)
class ServerSettings:
    """Options of one server. ``api_key=None`` leaves the API open (fine on 127.0.0.1 only)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 8  # requests decoded together
    max_queue: int = 64  # requests waiting for a batch row before new ones get 429
    max_context: int | None = None  # tokens a batch row holds (default: the model's context)
    ui: bool = True  # mount the Gradio chat page at /ui
    legacy_max_length: int = 2048  # the official api.py's default max_length

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise InvalidArgumentError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_queue < 0:
            raise InvalidArgumentError(f"max_queue must be >= 0, got {self.max_queue}")
        if not 0 <= self.port <= 65535:
            raise InvalidArgumentError(f"port must be between 0 and 65535, got {self.port}")
        if self.api_key is not None and not self.api_key:
            raise InvalidArgumentError("the API key is empty: pass a non-empty --api-key, or none")
        if self.max_context is not None and self.max_context < 2:
            raise InvalidArgumentError(f"max_context must be at least 2 tokens, got {self.max_context}")
