"""A read-only index of a GGUF file: its metadata as Python values, its tensors as memory-mapped arrays.

gguf's ``GGUFReader`` makes a numpy view for every element of every array field: about 250,000 views
for SmolLM2's 49,152-token vocabulary and its merges, some 6 seconds of a 2-core machine's start (40%
of the time to the first token). This index reads the same header in one pass with ``struct`` and
``numpy.frombuffer`` (a tenth of a second) and keeps only what glmrun uses: ``metadata`` (key ->
str / int / float / bool, or a list of them) and ``tensors`` laid out exactly as ``GGUFReader`` lays
them out (float arrays for F32/F16/F64 and the integer types, raw block bytes ``[..., row bytes]``
for quantized types), so ``gguf.quants.dequantize`` reads them as it reads the reader's. The gguf
package stays the source of the format's tables (value types, ggml types, block sizes) and of the
dequantization; the tests check this index field by field and tensor by tensor against
``GGUFReader`` on the real embedded file.

Format (GGUF v2/v3, little-endian): magic ``GGUF``, version u32, tensor count u64, metadata count
u64; each metadata entry is a string key (u64 length + UTF-8 bytes), a value type u32 and the value
(arrays: item type u32, count u64, items); each tensor info is a name, dimension count u32, the
dimensions (u64, innermost first), a ggml type u32 and an offset u64 from the start of the data,
which begins at the next multiple of ``general.alignment`` (default 32) after the infos.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import quant_shape_to_byte_shape

from .errors import CorruptCheckpointError, UnsupportedModelError

__all__ = ["GGUFIndex", "GGUFTensor", "index_gguf"]

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_ARRAY_DTYPES = {kind: np.dtype(fmt) for kind, fmt in _SCALAR_FORMATS.items()}
# ggml types stored as plain arrays (the others are blocks of bytes), with GGUFReader's numpy dtypes
_PLAIN_TYPES = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the file: ``shape`` in ggml order (innermost first), ``data`` a view of the file."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray = field(repr=False)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class GGUFIndex:
    """What :func:`index_gguf` read: the file, its format version, metadata and tensors (in file order)."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensor]


_U64 = struct.Struct("<Q")


class _Cursor:
    """Reads little-endian GGUF values from ``buf`` at a moving position."""

    def __init__(self, buf: np.ndarray) -> None:
        self.buf = buf
        self.view = memoryview(buf)  # type: ignore[arg-type]  # a uint8 memmap is a buffer
        self.pos = 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.view, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        return self.strings(1)[0]

    def strings(self, count: int) -> list[str]:
        """``count`` strings in a row, in one loop (a vocabulary and its merges are ~100k strings: a method call
        each took ~0.4 s of a CPU start). GGUF strings are UTF-8; a stray invalid byte should not make the
        whole file unreadable."""
        view, pos, size_of = self.view, self.pos, _U64.unpack_from
        end_of_file = len(self.buf)
        out: list[str] = []
        append = out.append
        for _ in range(count):
            (size,) = size_of(view, pos)
            pos += 8
            end = pos + size
            if end > end_of_file:
                raise struct.error(f"a string of {size} bytes runs past the end of the file")
            append(str(view[pos:end], "utf-8", errors="replace"))
            pos = end
        self.pos = pos
        return out

    def value(self, kind: int) -> Any:
        if kind == GGUFValueType.STRING:
            return self.string()
        if kind != GGUFValueType.ARRAY:
            return self.scalar(_SCALAR_FORMATS[GGUFValueType(kind)])
        item_kind, count = self.scalar("<I"), self.scalar("<Q")
        if item_kind == GGUFValueType.STRING:
            return self.strings(count)
        if item_kind == GGUFValueType.ARRAY:
            return [self.value(item_kind) for _ in range(count)]
        dtype = _ARRAY_DTYPES[GGUFValueType(item_kind)]
        if self.pos + count * dtype.itemsize > len(self.buf):
            raise struct.error(f"an array of {count} values runs past the end of the file")
        items = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        self.pos += count * dtype.itemsize
        return items.tolist()


def index_gguf(path: str | os.PathLike[str]) -> GGUFIndex:
    """Read a GGUF file's header: metadata and tensor index; tensor data stays in the memory map.

    A file that is not GGUF, is cut short or holds an unknown value type raises
    :class:`CorruptCheckpointError`; a big-endian file or a ggml type this gguf package does not know
    raises :class:`UnsupportedModelError`.
    """
    file = Path(path)
    mapped = np.memmap(file, mode="r") if file.stat().st_size else np.zeros(0, np.uint8)
    cursor = _Cursor(mapped)
    try:
        if mapped[:4].tobytes() != _MAGIC:
            raise CorruptCheckpointError(f"{file} is not a GGUF file (it does not start with 'GGUF')")
        cursor.pos = 4
        version = cursor.scalar("<I")
        if version & 0xFFFF == 0 and version:
            raise UnsupportedModelError(f"{file} is a big-endian GGUF file, which glmrun does not read")
        if version not in _VERSIONS:
            raise UnsupportedModelError(f"{file} is GGUF version {version}; glmrun reads versions 2 and 3")
        tensor_count, kv_count = cursor.scalar("<Q"), cursor.scalar("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = cursor.string()
            metadata[key] = cursor.value(cursor.scalar("<I"))
        infos = []
        for _ in range(tensor_count):
            name = cursor.string()
            dims = [cursor.scalar("<Q") for _ in range(cursor.scalar("<I"))]
            infos.append((name, tuple(dims), cursor.scalar("<I"), cursor.scalar("<Q")))
    except (struct.error, ValueError, KeyError) as error:  # cut short, or an unknown value type
        raise CorruptCheckpointError(
            f"{file} is not a readable GGUF file ({error}); the download may be truncated, fetch it again"
        ) from error
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise CorruptCheckpointError(f"{file}: general.alignment {alignment!r} is not a power of two")
    start = -(-cursor.pos // alignment) * alignment
    return GGUFIndex(file, version, metadata, [_tensor(file, mapped, start, *info) for info in infos])


def _tensor(
    file: Path, mapped: np.ndarray, start: int, name: str, dims: tuple[int, ...], raw_type: int, offset: int
) -> GGUFTensor:
    try:
        ggml_type = GGMLQuantizationType(raw_type)
    except ValueError:
        raise UnsupportedModelError(
            f"{file}: tensor {name} has ggml type {raw_type}, which the installed gguf package does not know"
        ) from None
    n_elements = int(np.prod(dims, dtype=np.int64))
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    n_bytes = n_elements * type_size // block_size
    begin = start + offset
    if begin + n_bytes > len(mapped):
        raise CorruptCheckpointError(
            f"{file}: tensor {name} ends at byte {begin + n_bytes} of a {len(mapped)}-byte file; the download may "
            "be truncated, fetch it again"
        )
    np_shape = tuple(reversed(dims))
    plain = _PLAIN_TYPES.get(ggml_type)
    if plain is not None:
        data = mapped[begin : begin + n_bytes].view(plain).reshape(np_shape)
    else:
        data = mapped[begin : begin + n_bytes].reshape(quant_shape_to_byte_shape(np_shape, ggml_type))
    return GGUFTensor(name, ggml_type, dims, data)
