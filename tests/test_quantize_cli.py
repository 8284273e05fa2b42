"""``glmrun quantize``: a saved INT4/INT8 folder loads directly and computes what on-load quantization does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import glmrun
import glmrun.compat
from glmrun.checkpoint import PRESETS, write_random_checkpoint
from glmrun.cli import main
from glmrun.loader import load_model, resolve_checkpoint
from glmrun.quantize_cli import save_quantized

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
    expected = {"bits": int(bits[3:]), "group_size": 32, "head_bits": 8, "int8_zero": True}
    assert config["glmrun_quantization"] == expected
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


def test_a_model_with_tiled_int4_layers_saves_the_canonical_codes(folder, tmp_path):
    """What a CUDA float16 model holds (tiled INT4 codes, glmrun.quant_kernels.tile_int4) is saved in the canonical
    order: the folder equals one saved from the untiled model."""
    from glmrun.quant import QuantLinear

    spec = glmrun.QuantSpec(4, 32)
    ckpt = resolve_checkpoint(folder)
    plain, _ = load_model(ckpt, dtype="float32", device="cpu", quantize=spec, progress=False)
    tiled, _ = load_model(ckpt, dtype="float32", device="cpu", quantize=spec, progress=False)
    layers = [m for m in tiled.modules() if isinstance(m, QuantLinear) and m.can_tile()]
    assert layers and all(m.tile_().tiled for m in layers)
    for model, name in ((plain, "plain"), (tiled, "tiled")):
        (tmp_path / name).mkdir()
        save_quantized(model, model.config.to_chatglm_dict(), folder, tmp_path / name)
    assert not any(m.tiled for m in layers)  # put back in place before the state was taken
    want, got = (load_file(str(next((tmp_path / n).glob("*.safetensors")))) for n in ("plain", "tiled"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_a_float16_folder_quantized_on_the_cpu_is_written_in_float16(folder, tmp_path):
    """The CPU computes in float32 whatever --dtype says; the saved float tensors are still --dtype's (they were
    float32: twice the bytes of a float16 folder's embedding, under a config that says float16)."""
    out = tmp_path / "f16"
    args = ["quantize", "--model", str(folder), "--to", "int4", "--out", str(out), "--group-size", "32"]
    assert main([*args, "--dtype", "float16"]) == 0
    state = load_file(str(next(out.glob("*.safetensors"))))
    assert state["transformer.embedding.word_embeddings.weight"].dtype == torch.float16
    assert state["transformer.encoder.final_layernorm.weight"].dtype == torch.float16
    assert state["transformer.encoder.layers.0.self_attention.query_key_value.weight_scale"].dtype == torch.float16
    assert state["transformer.encoder.layers.0.self_attention.query_key_value.weight_q"].dtype == torch.uint8
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    with glmrun.load(out, device="cpu", progress=False) as saved:
        reply = saved.chat("你好", max_new_tokens=4, do_sample=False)
        assert reply.result.completion_tokens >= 1 or reply.result.finish_reason == "stop"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_folder_quantized_on_cuda_holds_canonical_codes_and_loads_tiled(folder, tmp_path):
    """On CUDA in float16 the INT4 layers hold tiled codes; the folder gets the canonical ones, and loading it on CUDA
    tiles them again and computes what on-load quantization computes."""
    out = tmp_path / "cuda"
    args = ["quantize", "--model", str(folder), "--to", "int4", "--out", str(out), "--group-size", "32"]
    assert main([*args, "--device", "cuda", "--dtype", "float16"]) == 0
    ids = torch.tensor([[64790, 64792, 36474, 54591, 13, 30910]])
    spec = glmrun.QuantSpec(4, 32)
    with (
        glmrun.load(out, device="cuda", dtype="float16", progress=False) as saved,
        glmrun.load(folder, device="cuda", dtype="float16", quantize=spec, progress=False) as onload,
    ):
        tiled = [[m for m in s.engine.model.modules() if getattr(m, "tiled", False)] for s in (saved, onload)]
        assert len(tiled[0]) == len(tiled[1]) > 0
        for a, b in zip(tiled[0], tiled[1], strict=True):
            assert torch.equal(a.weight_q, b.weight_q)
        assert torch.equal(glmrun.compat.CompatModel(saved)(ids).logits, glmrun.compat.CompatModel(onload)(ids).logits)


def test_folder_in_the_first_saved_format_still_loads(folder, tmp_path):
    """A config without ``head_bits`` and ``int8_zero``: symmetric INT8 layers and a float output layer."""
    first_format = glmrun.QuantSpec(8, 32, head_bits=None, int8_zero=False)
    model, _ = load_model(resolve_checkpoint(folder), dtype="float32", device="cpu", quantize=first_format)
    config = model.config.to_chatglm_dict()
    del config["glmrun_quantization"]["head_bits"], config["glmrun_quantization"]["int8_zero"]
    out = tmp_path / "old"
    out.mkdir()
    save_quantized(model, config, folder, out)
    saved = {}
    for f in out.glob("*.safetensors"):
        saved.update(load_file(f))
    assert not any(name.endswith("weight_zero") for name in saved)  # symmetric: scales only
    assert saved["transformer.output_layer.weight"].dtype == torch.float32
    ids = torch.tensor([[64790, 64792, 36474, 54591, 13, 30910]])
    with (
        glmrun.load(out, device="cpu", dtype="float32", progress=False) as old,
        glmrun.load(folder, device="cpu", dtype="float32", quantize=first_format, progress=False) as onload,
    ):
        assert old.config.quantization == first_format
        head = old.engine.model.transformer.output_layer
        assert torch.equal(head.weight, model.transformer.output_layer.weight)
        assert torch.equal(glmrun.compat.CompatModel(old)(ids).logits, glmrun.compat.CompatModel(onload)(ids).logits)
        assert old.chat("你好", max_new_tokens=2, do_sample=False).result.completion_tokens >= 1


def test_quantize_refuses_to_overwrite(folder, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    assert main(["quantize", "--model", str(folder), "--to", "int4", "--out", str(busy)]) == 2
    assert main(["quantize", "--model", str(folder), "--to", "int4", "--out", str(folder)]) == 2
    assert (busy / "keep.txt").read_text() == "x"
