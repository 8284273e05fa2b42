"""``glmrun quantize``: a saved INT4/INT8 folder loads directly and computes what on-load quantization does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import glmrun
import glmrun.compat
from glmrun.checkpoint import PRESETS, write_random_checkpoint
from glmrun.cli import main

TOKENIZER = Path(__file__).resolve().parents[1].parent / "shared/tokenizers/chatglm2/tokenizer.model"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    if not TOKENIZER.is_file():
        pytest.skip("the shared ChatGLM2 tokenizer is not present")
    out = tmp_path_factory.mktemp("src")
    write_random_checkpoint(out, PRESETS["tiny"], fmt="bin", shards=2, tokenizer_path=TOKENIZER, seed=4)
    return out


@pytest.mark.parametrize("bits", ["int4", "int8"])
def test_saved_quantized_folder_loads_and_matches_on_load_quantization(folder, tmp_path, bits):
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    out = tmp_path / bits
    assert (
        main(
            [
                "quantize",
                "--model",
                str(folder),
                "--to",
                bits,
                "--out",
                str(out),
                "--group-size",
                "32",
                "--dtype",
                "float32",
            ]
        )
        == 0
    )
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before  # the source is untouched
    config = json.loads((out / "config.json").read_text())
    assert config["glmrun_quantization"] == {"bits": int(bits[3:]), "group_size": 32, "head_bits": 8}
    assert (out / "tokenizer.model").is_file()
    ids = torch.tensor([[64790, 64792, 36474, 54591, 13, 30910]])
    with (
        glmrun.load(out, device="cpu", dtype="float32", progress=False) as saved,
        glmrun.load(
            folder, device="cpu", dtype="float32", quantize=glmrun.QuantSpec(int(bits[3:]), 32), progress=False
        ) as onload,
    ):
        assert saved.config.quantization == onload.config.quantization
        a = glmrun.compat.CompatModel(saved)(ids).logits
        b = glmrun.compat.CompatModel(onload)(ids).logits
        assert torch.equal(a, b)
        reply = saved.chat("你好", max_new_tokens=4, do_sample=False)
        assert reply.result.completion_tokens >= 1 or reply.result.finish_reason == "stop"
        head = saved.engine.model.transformer.output_layer
        assert head.weight_q.dtype == torch.int8  # the output layer is saved at 8 bits whatever the layers' bits


def test_folder_saved_before_head_bits_keeps_a_float_output_layer(folder, tmp_path):
    """A config without ``head_bits`` (written before the output layer was quantized) still loads."""
    out = tmp_path / "old"
    args = ["quantize", "--model", str(folder), "--to", "int8", "--out", str(out), "--dtype", "float32"]
    assert main([*args, "--group-size", "32"]) == 0
    with glmrun.load(folder, device="cpu", dtype="float32", progress=False) as ref:
        float_head = ref.engine.model.transformer.output_layer.weight.detach().clone()
    # Rewrite the folder as the old format was: the float output matrix and no head_bits.
    from safetensors.torch import load_file, save_file

    index = (
        json.loads((out / "model.safetensors.index.json").read_text())
        if (out / "model.safetensors.index.json").exists()
        else None
    )
    files = sorted(out.glob("*.safetensors"))
    for f in files:
        tensors = load_file(f)
        if "transformer.output_layer.weight_q" in tensors:
            for key in ("weight_q", "weight_scale"):
                del tensors[f"transformer.output_layer.{key}"]
            tensors["transformer.output_layer.weight"] = float_head
            save_file(tensors, f)
            if index is not None:
                for key in ("weight_q", "weight_scale"):
                    del index["weight_map"][f"transformer.output_layer.{key}"]
                index["weight_map"]["transformer.output_layer.weight"] = f.name
                (out / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((out / "config.json").read_text())
    del config["glmrun_quantization"]["head_bits"]
    (out / "config.json").write_text(json.dumps(config))
    with glmrun.load(out, device="cpu", dtype="float32", progress=False) as old:
        assert old.config.quantization == glmrun.QuantSpec(8, 32, head_bits=None)
        assert torch.equal(old.engine.model.transformer.output_layer.weight, float_head)
        assert old.chat("你好", max_new_tokens=2, do_sample=False).result.completion_tokens >= 1


def test_quantize_refuses_to_overwrite(folder, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    assert main(["quantize", "--model", str(folder), "--to", "int4", "--out", str(busy)]) == 2
    assert main(["quantize", "--model", str(folder), "--to", "int4", "--out", str(folder)]) == 2
    assert (busy / "keep.txt").read_text() == "x"
