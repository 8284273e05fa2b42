"""Tests of glmrun.checkpoint: presets, the official folder layout, determinism, streaming, the CLI."""

from __future__ import annotations

import argparse
import gc
import json
import weakref
from pathlib import Path

import pytest
import torch

import glmrun.checkpoint as checkpoint
from glmrun.checkpoint import PRESETS, add_parser, default_tokenizer_path, random_tensor, run, write_random_checkpoint
from glmrun.config import ModelConfig, load_chatglm_config
from glmrun.errors import CheckpointNotFoundError, InvalidArgumentError
from glmrun.weights import TensorAccount, iter_tensors, official_tensor_shapes

TINY = PRESETS["tiny"]
SHARED_TOKENIZER = default_tokenizer_path()
needs_tokenizer = pytest.mark.skipif(
    SHARED_TOKENIZER is None or not SHARED_TOKENIZER.is_file(), reason="no ChatGLM2 tokenizer.model found"
)


def _shard_of_layer(weight_map: dict[str, str]) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for name, shard in weight_map.items():
        if name.startswith("transformer.encoder.layers."):
            out.setdefault(int(name.split(".")[3]), set()).add(shard)
    return out


# Presets -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_survive_config_json(name: str) -> None:
    config = PRESETS[name]
    assert ModelConfig.from_chatglm_dict(config.to_chatglm_dict()) == config


def test_tiny_keeps_the_real_proportions() -> None:
    assert TINY.kv_channels == TINY.hidden_size // TINY.num_attention_heads
    assert TINY.rotary_dim == TINY.kv_channels // 2
    assert TINY.multi_query_group_num == 2 and TINY.add_qkv_bias and not TINY.add_bias_linear
    assert TINY.padded_vocab_size == 65024 and TINY.torch_dtype == "float32"


def test_6b_presets() -> None:
    config = PRESETS["chatglm2-6b"]
    assert config.num_parameters() == 6_243_584_000
    assert (config.hidden_size, config.num_layers, config.ffn_hidden_size, config.seq_length) == (
        4096,
        28,
        13696,
        32768,
    )
    assert config.torch_dtype == "float16" and config.rope_ratio == 1.0
    assert PRESETS["chatglm2-6b-32k"].rope_ratio == 16.0


# The folder layout ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fmt", "shards", "weights"),
    [
        ("safetensors", 1, ["model.safetensors"]),
        (
            "safetensors",
            3,
            [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)] + ["model.safetensors.index.json"],
        ),
        ("bin", 1, ["pytorch_model.bin"]),
        ("bin", 3, [f"pytorch_model-0000{k}-of-00003.bin" for k in (1, 2, 3)] + ["pytorch_model.bin.index.json"]),
    ],
)
def test_official_file_names(tmp_path: Path, fmt: str, shards: int, weights: list[str]) -> None:
    out = write_random_checkpoint(tmp_path / "m", TINY, fmt=fmt, shards=shards, tokenizer_path=SHARED_TOKENIZER)
    expected = ["config.json", "tokenizer_config.json"] + weights + (["tokenizer.model"] if SHARED_TOKENIZER else [])
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    assert load_chatglm_config(out) == TINY


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_index_json(tmp_path: Path, fmt: str) -> None:
    out = write_random_checkpoint(tmp_path / "m", TINY, fmt=fmt, shards=3)
    index = json.loads(next(out.glob("*.index.json")).read_text())
    assert set(index) == {"metadata", "weight_map"}
    shapes = official_tensor_shapes(TINY)
    assert index["metadata"]["total_size"] == sum(4 * torch.Size(s).numel() for s in shapes.values())
    assert set(index["weight_map"]) == set(shapes)
    assert set(index["weight_map"].values()) == {p.name for p in out.iterdir() if p.suffix in (".bin", ".safetensors")}
    # Layers stay whole and come in order, as in the official shards.
    layer_shards = _shard_of_layer(index["weight_map"])
    assert all(len(s) == 1 for s in layer_shards.values())
    ordered = [next(iter(layer_shards[i])) for i in sorted(layer_shards)]
    assert ordered == sorted(ordered)
    assert index["weight_map"]["transformer.embedding.word_embeddings.weight"].startswith(
        ("model-00001", "pytorch_model-00001")
    )
    for name, shard in index["weight_map"].items():  # each tensor is where the index says
        assert name in dict(iter_tensors_of_file(out / shard))


def iter_tensors_of_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".bin":
        return torch.load(path, map_location="cpu", weights_only=True)
    from safetensors.torch import load_file

    return load_file(str(path))


def test_6b_split_like_the_official_seven_shards() -> None:
    shapes = official_tensor_shapes(PRESETS["chatglm2-6b"])
    emb = 2 * 65024 * 4096
    layer = 2 * sum(torch.Size(s).numel() for n, s in shapes.items() if ".layers.0." in n)
    blocks = [emb] + [layer] * 28 + [2 * 4096, emb]
    runs = checkpoint._split_blocks(blocks, 7)
    assert [a for a, _ in runs[1:]] == [b for _, b in runs[:-1]]  # contiguous, in order
    assert runs[0][0] == 0 and runs[-1][1] == len(blocks) and all(a < b for a, b in runs)
    sizes = [sum(blocks[a:b]) for a, b in runs]
    assert max(sizes) < 2.2e9  # about 1.6-2.2 GB each, like the official ~2 GB shards


def test_tokenizer_files(tmp_path: Path) -> None:
    fake = tmp_path / "tok.model"
    fake.write_bytes(b"not really sentencepiece")
    out = write_random_checkpoint(tmp_path / "m", TINY, tokenizer_path=fake)
    assert (out / "tokenizer.model").read_bytes() == fake.read_bytes()
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "ChatGLMTokenizer" and config["padding_side"] == "left"
    assert config["remove_space"] is False and config["do_lower_case"] is False
    assert config["auto_map"] == {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}
    assert config["name_or_path"] == "THUDM/chatglm2-6b"


@needs_tokenizer
def test_shared_tokenizer_fits_the_vocabulary(tmp_path: Path) -> None:
    sentencepiece = pytest.importorskip("sentencepiece")
    out = write_random_checkpoint(tmp_path / "m", TINY)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert processor.vocab_size() == 64789 < TINY.padded_vocab_size


def test_tokenizer_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "env.model"
    fake.write_bytes(b"from env")
    monkeypatch.setenv("GLMRUN_TOKENIZER", str(fake))
    out = write_random_checkpoint(tmp_path / "m", TINY)
    assert (out / "tokenizer.model").read_bytes() == b"from env"


def test_missing_tokenizer_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="nope.model"):
        write_random_checkpoint(tmp_path / "m", TINY, tokenizer_path=tmp_path / "nope.model")
    assert not (tmp_path / "m").exists()


def test_no_tokenizer_found_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoint, "default_tokenizer_path", lambda: None)
    with pytest.warns(UserWarning, match="no tokenizer.model"):
        out = write_random_checkpoint(tmp_path / "m", TINY)
    assert not (out / "tokenizer.model").exists()
    assert (out / "tokenizer_config.json").is_file()


# Values --------------------------------------------------------------------------------------------------
def test_values_are_deterministic_and_seeded(tmp_path: Path) -> None:
    a = dict(iter_tensors(write_random_checkpoint(tmp_path / "a", TINY, seed=7)))
    b = dict(iter_tensors(write_random_checkpoint(tmp_path / "b", TINY, fmt="bin", shards=2, seed=7)))
    c = dict(iter_tensors(write_random_checkpoint(tmp_path / "c", TINY, seed=8)))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not any(torch.equal(a[n], c[n]) for n in a)


def test_value_scales_are_sane() -> None:
    name = "transformer.encoder.layers.0.self_attention.query_key_value.weight"
    qkv = random_tensor(name, (512, 4096), seed=0, dtype=torch.float16)
    assert abs(qkv.float().std().item() - 4096**-0.5) < 1e-3
    norm = random_tensor("transformer.encoder.final_layernorm.weight", (4096,), seed=0, dtype=torch.float32)
    assert abs(norm.mean().item() - 1.0) < 0.01 and norm.std().item() < 0.1
    # A unit-size hidden state gives logits spread around unit size: neither flat nor huge.
    head = random_tensor("transformer.output_layer.weight", (65024, 64), seed=0, dtype=torch.float32)
    logits = head @ torch.randn(64, generator=torch.Generator().manual_seed(0))
    assert 0.5 < logits.std().item() < 2.0 and torch.isfinite(logits).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_override(tmp_path: Path, dtype: torch.dtype) -> None:
    out = write_random_checkpoint(tmp_path / "m", TINY, dtype=dtype)
    assert load_chatglm_config(out).torch_dtype == str(dtype).removeprefix("torch.")
    assert {t.dtype for _, t in iter_tensors(out)} == {dtype}


def test_inv_freq_like_the_official_bin(tmp_path: Path) -> None:
    out = write_random_checkpoint(tmp_path / "m", TINY, fmt="bin", shards=2, include_inv_freq=True)
    tensors = dict(iter_tensors(out))
    expected = 1.0 / 10000.0 ** (torch.arange(0, TINY.rotary_dim, 2, dtype=torch.float32) / TINY.rotary_dim)
    assert torch.allclose(tensors["transformer.rotary_pos_emb.inv_freq"], expected)
    index = json.loads((out / "pytorch_model.bin.index.json").read_text())
    assert index["weight_map"]["transformer.rotary_pos_emb.inv_freq"] == "pytorch_model-00001-of-00002.bin"
    account = TensorAccount(official_tensor_shapes(TINY))
    for name, tensor in tensors.items():
        account.add(name, tensor)
    account.finish()


# Refusals and streaming ------------------------------------------------------------------------------------
def test_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(InvalidArgumentError, match="not an empty folder"):
        write_random_checkpoint(tmp_path, TINY)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]
    with pytest.raises(InvalidArgumentError):
        write_random_checkpoint(tmp_path / "mine.txt", TINY)


def test_writes_into_an_empty_existing_folder(tmp_path: Path) -> None:
    assert (write_random_checkpoint(tmp_path, TINY) / "model.safetensors").is_file()


@pytest.mark.parametrize("kwargs", [{"fmt": "gguf"}, {"shards": 0}, {"shards": 6}, {"dtype": torch.int8}], ids=str)
def test_invalid_options(tmp_path: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidArgumentError):
        write_random_checkpoint(tmp_path / "m", TINY, **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "m").exists()


def test_one_shard_in_memory_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tensor of a shard is freed before the next shard is generated."""
    real_save = checkpoint._save_shard
    alive: list[weakref.ref[torch.Tensor]] = []
    live_counts: list[int] = []

    def save(tensors: dict[str, torch.Tensor], path: Path, fmt: str) -> None:
        gc.collect()
        live_counts.append(sum(ref() is not None for ref in alive))
        alive.extend(weakref.ref(t) for t in tensors.values())
        real_save(tensors, path, fmt)

    monkeypatch.setattr(checkpoint, "_save_shard", save)
    progress: list[tuple[int, int]] = []
    write_random_checkpoint(tmp_path / "m", TINY, shards=4, progress=lambda d, t: progress.append((d, t)))
    assert live_counts == [0, 0, 0, 0]
    assert len(progress) == 4 and progress[-1][0] == progress[-1][1]


# CLI ------------------------------------------------------------------------------------------------------
def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="glmrun")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = "make-checkpoint --preset tiny --format bin --shards 2 --seed 3 --dtype bfloat16".split()
    args = _parse([*argv, "--out", str(out), "--tokenizer", str(tmp_path / "t.model")])
    (tmp_path / "t.model").write_bytes(b"tok")
    assert args.func is run
    assert run(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and str(out) in lines[0] and "bfloat16" in lines[0] and "2 bin" in lines[0]
    assert load_chatglm_config(out).torch_dtype == "bfloat16"
    assert (out / "pytorch_model.bin.index.json").is_file() and (out / "tokenizer.model").read_bytes() == b"tok"
    written = dict(iter_tensors(out))
    name = "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"
    assert torch.equal(written[name], random_tensor(name, (64, 128), seed=3, dtype=torch.bfloat16))


def test_cli_says_when_no_tokenizer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpoint, "default_tokenizer_path", lambda: None)
    assert run(_parse(["make-checkpoint", "--preset", "tiny", "--out", str(tmp_path / "m")])) == 0
    assert "no tokenizer.model" in capsys.readouterr().out


def test_cli_refuses_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("x")
    with pytest.raises(InvalidArgumentError):
        run(_parse(["make-checkpoint", "--preset", "tiny", "--out", str(tmp_path)]))
