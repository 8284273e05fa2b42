"""glmrun.gguf_index against gguf's own GGUFReader: every metadata value and every tensor, the same.

The reader is the oracle here (the independent implementation); its fields are turned into Python
values the way its ``ReaderField`` documents them, written out below.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.gguf_reader import ReaderField

from glmrun.errors import CheckpointNotFoundError, CorruptCheckpointError, UnsupportedModelError
from glmrun.gguf_index import GGUFIndex, index_gguf
from glmrun.gguf_meta import embedded_gguf_path, open_gguf


def reader_value(field: ReaderField) -> Any:
    """A GGUFReader field as a Python value: its ``data`` indexes the ``parts`` that hold the values."""
    kind = field.types[0]
    if kind == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    if kind != GGUFValueType.ARRAY:
        return field.parts[field.data[0]].tolist()[0]
    if field.types[1] == GGUFValueType.STRING:
        return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
    return [field.parts[i].tolist()[0] for i in field.data]


def assert_same_as_reader(path: Path, index: GGUFIndex) -> None:
    reader = GGUFReader(path, "r")
    fields = {name: f for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    assert list(index.metadata) == list(fields)  # the file's order
    for name, f in fields.items():
        expected = reader_value(f)
        assert index.metadata[name] == expected, name
        assert type(index.metadata[name]) is type(expected), name
    assert index.version == reader.fields["GGUF.version"].parts[0][0]
    assert [t.name for t in index.tensors] == [t.name for t in reader.tensors]
    for ours, theirs in zip(index.tensors, reader.tensors, strict=True):
        assert ours.tensor_type == theirs.tensor_type, ours.name
        assert ours.shape == tuple(theirs.shape.tolist()) and ours.n_elements == theirs.n_elements, ours.name
        assert ours.data.dtype == theirs.data.dtype and ours.data.shape == theirs.data.shape, ours.name
        assert np.array_equal(ours.data, theirs.data), ours.name


def test_the_embedded_file_reads_as_gguf_reads_it() -> None:
    try:
        path = embedded_gguf_path()
    except CheckpointNotFoundError:
        pytest.skip("the embedded SmolLM2 GGUF is not installed")
    index = open_gguf(path)
    assert len(index.metadata["tokenizer.ggml.tokens"]) == 49152 and len(index.tensors) == 272
    assert_same_as_reader(path, index)


def write_file(path: Path, alignment: int | None = None) -> Path:
    writer = gguf.GGUFWriter(path, "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -5)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -300)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -7)
    writer.add_float32("t.f32", 0.1)
    writer.add_uint64("t.u64", 2**40)
    writer.add_int64("t.i64", -(2**40))
    writer.add_float64("t.f64", 1 / 3)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo <|im_end|>")
    writer.add_array("t.ints", [1, 2, 3])
    writer.add_array("t.floats", [0.5, -1.25])
    writer.add_array("t.strs", ["a", "", "é"])
    gen = np.random.default_rng(0)
    writer.add_tensor("f32", gen.standard_normal((3, 5)).astype(np.float32))
    writer.add_tensor("f16", gen.standard_normal((4, 2, 6)).astype(np.float16))
    q8 = gguf.quants.quantize(gen.standard_normal((2, 64)).astype(np.float32), GGMLQuantizationType.Q8_0)
    writer.add_tensor("q8", q8, raw_shape=q8.shape, raw_dtype=GGMLQuantizationType.Q8_0)
    writer.add_tensor("i32", np.arange(7, dtype=np.int32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("alignment", [None, 64])
def test_every_value_type_and_tensor_layout(tmp_path: Path, alignment: int | None) -> None:
    path = write_file(tmp_path / "all.gguf", alignment)
    index = index_gguf(path)
    assert index.metadata["t.str"] == "héllo <|im_end|>" and index.metadata["t.bool"] is True
    assert index.metadata["t.strs"] == ["a", "", "é"] and index.metadata["t.ints"] == [1, 2, 3]
    assert index.metadata["t.u64"] == 2**40 and index.metadata["t.f64"] == 1 / 3
    q8 = next(t for t in index.tensors if t.name == "q8")
    assert q8.data.dtype == np.uint8 and q8.data.shape == (2, 2 * 34)  # two 34-byte blocks a row
    assert_same_as_reader(path, index)


def test_broken_files_name_the_problem(tmp_path: Path) -> None:
    good = write_file(tmp_path / "good.gguf").read_bytes()
    with pytest.raises(CheckpointNotFoundError):
        open_gguf(tmp_path / "missing.gguf")
    cases = {
        "empty.gguf": (b"", CorruptCheckpointError, "does not start with 'GGUF'"),
        "text.gguf": (b"hello world, not a model" * 3, CorruptCheckpointError, "does not start with 'GGUF'"),
        "header.gguf": (good[:40], CorruptCheckpointError, "truncated"),
        # cut inside the string array "t.strs" (key, type, item type, count, then "a", "" and "é"): the
        # one-loop reader of string arrays checks each string's end as the one-value reader does
        "strings.gguf": (
            good[: good.index(b"t.strs") + 6 + 4 + 4 + 8 + 9 + 8 + 8 + 1],
            CorruptCheckpointError,
            "truncated",
        ),
        "data.gguf": (good[:-16], CorruptCheckpointError, "tensor i32 ends at byte"),
        "v1.gguf": (good[:4] + struct.pack("<I", 1) + good[8:], UnsupportedModelError, "version 1"),
        "big.gguf": (good[:4] + struct.pack(">I", 3) + good[8:], UnsupportedModelError, "big-endian"),
    }
    for name, (content, error, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(error, match=message):
            open_gguf(tmp_path / name)
