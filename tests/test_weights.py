"""Tests of glmrun.weights: finding weight files, streaming tensors, and strict accounting.

Checkpoints come from glmrun.checkpoint (the tiny preset, in the official folder layout), then are
damaged on purpose to check that each kind of broken download gets its own error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from glmrun.checkpoint import PRESETS, random_tensor, write_random_checkpoint
from glmrun.errors import CheckpointNotFoundError, CorruptCheckpointError, WeightsMismatchError
from glmrun.weights import (
    IGNORED_TENSORS,
    TensorAccount,
    check_tensor,
    find_weight_files,
    is_ignored_tensor,
    iter_tensors,
    official_tensor_shapes,
)

TINY = PRESETS["tiny"]
VARIANTS = [("safetensors", 1), ("safetensors", 3), ("bin", 1), ("bin", 3)]


def _write(folder: Path, fmt: str = "safetensors", shards: int = 1, **kwargs: object) -> Path:
    return write_random_checkpoint(folder, TINY, fmt=fmt, shards=shards, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], Path]:
    """The tiny preset written once in each format and shard count (not modified by tests)."""
    root = tmp_path_factory.mktemp("tiny")
    return {(fmt, n): _write(root / f"{fmt}-{n}", fmt, n) for fmt, n in VARIANTS}


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


# official_tensor_shapes --------------------------------------------------------------------------
def test_official_shapes_tiny() -> None:
    shapes = official_tensor_shapes(TINY)
    assert len(shapes) == 1 + TINY.num_layers * 7 + 2
    assert shapes["transformer.embedding.word_embeddings.weight"] == (65024, 64)
    assert shapes["transformer.encoder.layers.1.self_attention.query_key_value.weight"] == ((4 + 2 * 2) * 16, 64)
    assert shapes["transformer.encoder.layers.1.self_attention.query_key_value.bias"] == (128,)
    assert shapes["transformer.encoder.layers.0.self_attention.dense.weight"] == (64, 64)
    assert shapes["transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"] == (256, 64)
    assert shapes["transformer.encoder.layers.0.mlp.dense_4h_to_h.weight"] == (64, 128)
    assert shapes["transformer.output_layer.weight"] == (65024, 64)
    assert not any("inv_freq" in name for name in shapes)
    assert next(iter(shapes)) == "transformer.embedding.word_embeddings.weight"  # checkpoint order


def test_official_shapes_follow_bias_and_tying() -> None:
    shapes = official_tensor_shapes(TINY.replace(add_qkv_bias=False, tie_word_embeddings=True))
    assert not any(name.endswith(".bias") for name in shapes)
    assert "transformer.output_layer.weight" not in shapes


def test_official_shapes_6b_count_the_real_parameters() -> None:
    config = PRESETS["chatglm2-6b"]
    shapes = official_tensor_shapes(config)
    assert sum(torch.Size(s).numel() for s in shapes.values()) == config.num_parameters() == 6_243_584_000
    assert shapes["transformer.encoder.layers.27.self_attention.query_key_value.weight"] == (4608, 4096)
    assert shapes["transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"] == (27392, 4096)


def test_ignored_tensors() -> None:
    assert "transformer.rotary_pos_emb.inv_freq" in IGNORED_TENSORS
    assert is_ignored_tensor("transformer.rotary_pos_emb.inv_freq")
    assert not is_ignored_tensor("transformer.output_layer.weight")


# find_weight_files -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("variant", "names"),
    [
        (("safetensors", 1), ["model.safetensors"]),
        (("safetensors", 3), [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]),
        (("bin", 1), ["pytorch_model.bin"]),
        (("bin", 3), [f"pytorch_model-0000{k}-of-00003.bin" for k in (1, 2, 3)]),
    ],
)
def test_find_weight_files(written: dict[tuple[str, int], Path], variant: tuple[str, int], names: list[str]) -> None:
    folder = written[variant]
    assert find_weight_files(folder) == [folder / n for n in names]


def test_find_prefers_safetensors(tmp_path: Path, written: dict[tuple[str, int], Path]) -> None:
    folder = _write(tmp_path / "both", "bin", 3)
    (folder / "model.safetensors").write_bytes((written[("safetensors", 1)] / "model.safetensors").read_bytes())
    assert find_weight_files(folder) == [folder / "model.safetensors"]


def test_no_weights_lists_what_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointNotFoundError) as info:
        find_weight_files(tmp_path)
    for name in (
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    ):
        assert name in str(info.value)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        find_weight_files(tmp_path / "nowhere")


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_missing_shard_names_shard_and_index(tmp_path: Path, fmt: str) -> None:
    folder = _write(tmp_path / "m", fmt, 3)
    shard = find_weight_files(folder)[1]
    shard.unlink()
    with pytest.raises(CheckpointNotFoundError) as info:
        list(iter_tensors(folder))
    assert shard.name in str(info.value)
    assert ".index.json" in str(info.value)


def test_index_that_is_not_json(tmp_path: Path) -> None:
    folder = _write(tmp_path / "m", "bin", 3)
    (folder / "pytorch_model.bin.index.json").write_text('{"weight_map": ')
    with pytest.raises(CorruptCheckpointError, match="pytorch_model.bin.index.json"):
        find_weight_files(folder)


def test_index_without_weight_map(tmp_path: Path) -> None:
    folder = _write(tmp_path / "m", "safetensors", 3)
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CorruptCheckpointError, match="weight_map"):
        find_weight_files(folder)


def test_index_pointing_outside_the_folder(tmp_path: Path) -> None:
    folder = _write(tmp_path / "m", "safetensors", 3)
    index = {"weight_map": {"transformer.output_layer.weight": "../elsewhere.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match="not a file name"):
        find_weight_files(folder)


# iter_tensors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_names_shapes_values(written: dict[tuple[str, int], Path], variant: tuple[str, int]) -> None:
    expected = official_tensor_shapes(TINY)
    got = dict(iter_tensors(written[variant]))
    assert set(got) == set(expected)
    for name, tensor in got.items():
        assert tuple(tensor.shape) == expected[name]
        assert tensor.dtype == torch.float32
        # Values depend only on (seed, name): identical whatever the format and shard count.
        assert torch.equal(tensor, random_tensor(name, expected[name], seed=0, dtype=torch.float32)), name


def test_progress_once_per_shard_in_file_bytes(written: dict[tuple[str, int], Path]) -> None:
    folder = written[("bin", 3)]
    calls: list[tuple[int, int]] = []
    for _ in iter_tensors(folder, progress=lambda done, total: calls.append((done, total))):
        pass
    total = sum(p.stat().st_size for p in find_weight_files(folder))
    assert len(calls) == 3
    assert [c[1] for c in calls] == [total] * 3
    assert calls[0][0] < calls[1][0] < calls[2][0] == total


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_reading_never_writes_into_the_folder(written: dict[tuple[str, int], Path], fmt: str) -> None:
    folder = written[(fmt, 3)]
    before = _snapshot(folder)
    account = TensorAccount(official_tensor_shapes(TINY))
    for name, tensor in iter_tensors(folder):
        account.add(name, tensor)
    account.finish()
    assert _snapshot(folder) == before


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("damage", ["cut in half", "last bytes cut", "random bytes", "empty"])
def test_damaged_shard_is_reported_as_corrupt(tmp_path: Path, fmt: str, damage: str) -> None:
    folder = _write(tmp_path / "m", fmt, 3)
    shard = find_weight_files(folder)[1]
    data = shard.read_bytes()
    damaged = {
        "cut in half": data[: len(data) // 2],
        "last bytes cut": data[:-10],
        "random bytes": os.urandom(4096),
        "empty": b"",
    }[damage]
    shard.write_bytes(damaged)
    with pytest.raises(CorruptCheckpointError) as info:
        list(iter_tensors(folder))
    assert str(shard) in str(info.value)
    assert "download it again" in str(info.value)


def test_legacy_torch_save_format_still_loads(tmp_path: Path) -> None:
    tensors = {"transformer.encoder.final_layernorm.weight": torch.ones(64)}
    torch.save(tensors, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    got = dict(iter_tensors(tmp_path))
    assert torch.equal(got["transformer.encoder.final_layernorm.weight"], torch.ones(64))


def test_bin_that_is_not_a_state_dict(tmp_path: Path) -> None:
    torch.save([torch.ones(2)], tmp_path / "pytorch_model.bin")
    with pytest.raises(CorruptCheckpointError, match="not a dict of named tensors"):
        list(iter_tensors(tmp_path))


def test_duplicate_tensor_across_shards(tmp_path: Path) -> None:
    name = "transformer.encoder.final_layernorm.weight"
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for shard in shards:
        save_file({name: torch.ones(64)}, str(tmp_path / shard))
    index = {"metadata": {"total_size": 512}, "weight_map": {name: shards[0], "other": shards[1]}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsMismatchError) as info:
        list(iter_tensors(tmp_path))
    assert name in str(info.value) and shards[0] in str(info.value) and shards[1] in str(info.value)


# Accounting -------------------------------------------------------------------------------------------
def test_account_of_a_complete_checkpoint_passes(written: dict[tuple[str, int], Path]) -> None:
    account = TensorAccount(official_tensor_shapes(TINY))
    used = [name for name, tensor in iter_tensors(written[("safetensors", 3)]) if account.add(name, tensor)]
    account.finish()
    assert sorted(used) == sorted(official_tensor_shapes(TINY))


def test_account_skips_inv_freq(tmp_path: Path) -> None:
    folder = _write(tmp_path / "m", "bin", 2, include_inv_freq=True)
    account = TensorAccount(official_tensor_shapes(TINY))
    for name, tensor in iter_tensors(folder):
        account.add(name, tensor)
    account.finish()
    assert account.ignored == ["transformer.rotary_pos_emb.inv_freq"]


def test_account_names_missing_unexpected_and_misshaped() -> None:
    expected = official_tensor_shapes(TINY)
    account = TensorAccount(expected, source="/models/x")
    for name, shape in expected.items():
        if name == "transformer.output_layer.weight":
            continue  # missing
        if name == "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight":
            shape = (64, 64)  # misshaped
        account.add(name, torch.empty(shape))
    account.add("transformer.encoder.layers.2.input_layernorm.weight", torch.empty(64))  # unexpected
    with pytest.raises(WeightsMismatchError) as info:
        account.finish()
    message = str(info.value)
    assert "1 missing: transformer.output_layer.weight" in message
    assert "1 unexpected: transformer.encoder.layers.2.input_layernorm.weight" in message
    assert "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight (expected [64, 128], found [64, 64])" in message
    assert "/models/x" in message


def test_account_lists_first_ten_and_counts_the_rest() -> None:
    account = TensorAccount(official_tensor_shapes(TINY))
    for k in range(25):
        account.add(f"extra.{k}", torch.empty(1))
    with pytest.raises(WeightsMismatchError) as info:
        account.finish()
    message = str(info.value)
    assert "25 unexpected" in message and "extra.9," in message and "extra.10," not in message
    assert "and 15 more" in message
    assert f"{len(official_tensor_shapes(TINY))} missing" in message


def test_account_refuses_a_tensor_twice() -> None:
    account = TensorAccount({"a": (2,)})
    assert account.add("a", torch.empty(2))
    with pytest.raises(WeightsMismatchError, match="twice"):
        account.add("a", torch.empty(2))


def test_check_tensor() -> None:
    expected = {"a": (2, 3)}
    check_tensor("a", torch.empty(2, 3), expected)
    check_tensor("transformer.rotary_pos_emb.inv_freq", torch.empty(4), expected)
    with pytest.raises(WeightsMismatchError, match="unexpected tensor 'b'"):
        check_tensor("b", torch.empty(1), expected)
    with pytest.raises(WeightsMismatchError, match=r"'a' has shape \[3, 2\], expected \[2, 3\]"):
        check_tensor("a", torch.empty(3, 2), expected)
