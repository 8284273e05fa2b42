"""The exceptions glmrun raises: one type per kind of user mistake.

Every message says what was wrong and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "GlmrunError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "UnsupportedModelError",
    "ConfigError",
    "WeightsMismatchError",
    "InvalidArgumentError",
    "DeviceError",
    "ContextOverflowError",
    "OutOfMemoryError",
    "PlacementError",
]


class GlmrunError(Exception):
    """Base class of every error glmrun raises on purpose."""


class CheckpointNotFoundError(GlmrunError, FileNotFoundError):
    """The model folder, or a file it must contain, does not exist."""


class CorruptCheckpointError(GlmrunError):
    """A weight file exists but cannot be read (truncated download, wrong format)."""


class UnsupportedModelError(GlmrunError):
    """The checkpoint is of an architecture (or a tensor type) glmrun does not run."""


class ConfigError(GlmrunError):
    """config.json (or GGUF metadata) lacks a required key or holds an invalid value."""


class WeightsMismatchError(GlmrunError):
    """Missing, unexpected or wrongly shaped tensors in a checkpoint."""


class InvalidArgumentError(GlmrunError, ValueError):
    """A caller passed an invalid option (dtype, sampling value, empty query...)."""


class DeviceError(GlmrunError):
    """The requested device does not exist or cannot be used."""


class ContextOverflowError(GlmrunError):
    """A prompt plus the tokens to generate do not fit the model's context window."""

    def __init__(self, message: str, *, prompt_tokens: int, max_new_tokens: int, context_length: int):
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.context_length = context_length


class OutOfMemoryError(GlmrunError, MemoryError):
    """A device ran out of memory; the message carries the numbers."""


class PlacementError(GlmrunError):
    """No placement of the model fits the given devices and budgets."""
