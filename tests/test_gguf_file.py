"""Tests of glmrun.gguf_file: GGUF metadata -> ModelConfig, and GGUF tensors -> official names and values.

The real-file tests use the embedded SmolLM2-135M-Instruct Q4_1 GGUF and compare against transformers'
own GGUF loading of the same file; they prove the rotary layout claim of gguf_file (q/k rows are used
as stored, glmrun's interleaved-pair rotary matches transformers' rotate-half on its un-permuted rows).
Small hand-written GGUF files cover the dequantization round trip and the error paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from glmrun.config import ModelConfig
from glmrun.errors import (
    CheckpointNotFoundError,
    ConfigError,
    InvalidArgumentError,
    UnsupportedModelError,
    WeightsMismatchError,
)
from glmrun.gguf_file import (
    KNOWN_IGNORED,
    Q4Blocks,
    dequantize_blocks,
    gguf_config,
    gguf_tensor_types,
    is_known_ignored,
    iter_gguf_q4,
    iter_gguf_tensors,
    load_gguf_config,
    q4_blocks,
)
from glmrun.gguf_index import GGUFIndex
from glmrun.gguf_meta import EMBEDDED_INSTALL_HINT, embedded_gguf_path, open_gguf, read_gguf_metadata
from glmrun.model import apply_rotary, rotary_tables
from glmrun.weights import official_tensor_shapes

LAYER0 = "transformer.encoder.layers.0."


def hf_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's converter permutation of q/k rows: per head, row j -> 2j and row j + d/2 -> 2j + 1."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


# The embedded SmolLM2 file -------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> GGUFIndex:
    try:
        path = embedded_gguf_path()
    except CheckpointNotFoundError:
        pytest.skip(f"the embedded SmolLM2 GGUF is not installed ({EMBEDDED_INSTALL_HINT})")
    return open_gguf(path)  # opened once, shared by the tests


@pytest.fixture(scope="module")
def smollm2_config(smollm2: GGUFIndex) -> ModelConfig:
    return load_gguf_config(smollm2)


@pytest.fixture(scope="module")
def smollm2_stream(smollm2: GGUFIndex, smollm2_config: ModelConfig) -> dict[str, Any]:
    """One pass over the file: every yielded name in order with its shape, and layer 0's tensors."""
    skipped: list[str] = []
    names: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    kept: dict[str, torch.Tensor] = {}
    for name, tensor in iter_gguf_tensors(smollm2, smollm2_config, skipped=skipped):
        names.append(name)
        shapes[name] = tuple(tensor.shape)
        if not name.startswith("transformer.encoder.layers.") or name.startswith(LAYER0):
            kept[name] = tensor
    return {"names": names, "shapes": shapes, "kept": kept, "skipped": skipped}


@pytest.fixture(scope="module")
def transformers_gguf(smollm2: GGUFIndex, smollm2_config: ModelConfig) -> dict[str, Any]:
    """transformers' own reading of the file: its parsed config and its (dequantized, q/k un-permuted) tensors.

    ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`` gets its tensors from
    ``load_gguf_checkpoint``; it is called directly because from_pretrained also insists on the
    ``accelerate`` package for GGUF files, which glmrun's test extras do not install.
    """
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    c = smollm2_config
    # The model only maps GGUF names to HF names (transformers takes the head counts that un-permute
    # q/k from the file). One layer keeps that mapping cheap: tensors of blocks 1-29 are then left out.
    names_only = transformers.LlamaConfig(
        vocab_size=c.padded_vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.ffn_hidden_size,
        num_hidden_layers=1,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_kv_heads,
        tie_word_embeddings=c.tie_word_embeddings,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(names_only)
    loaded = load_gguf_checkpoint(str(smollm2.path), return_tensors=True, model_to_load=model)
    return {"config": loaded["config"], "tensors": {k: v.float() for k, v in loaded["tensors"].items()}}


def test_smollm2_config_matches_the_file(smollm2: GGUFIndex, smollm2_config: ModelConfig) -> None:
    meta = read_gguf_metadata(smollm2)
    c = smollm2_config
    assert c.family == "llama" and c.torch_dtype == "float32"
    file_shape = (meta["llama.embedding_length"], meta["llama.block_count"], meta["llama.feed_forward_length"])
    assert (c.hidden_size, c.num_layers, c.ffn_hidden_size) == file_shape == (576, 30, 1536)
    file_heads = (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"])
    assert (c.num_attention_heads, c.num_kv_heads) == file_heads == (9, 3)
    assert c.head_dim == c.rotary_dim == 64 == meta["llama.rope.dimension_count"]
    assert c.padded_vocab_size == 49152 == len(meta["tokenizer.ggml.tokens"])
    assert c.rope_base == 100000.0 == meta["llama.rope.freq_base"] and c.rope_ratio == 1.0
    assert c.layernorm_epsilon == meta["llama.attention.layer_norm_rms_epsilon"]
    assert c.seq_length == 8192 == meta["llama.context_length"]
    assert c.eos_token_ids == (meta["tokenizer.ggml.eos_token_id"],)
    assert not c.add_qkv_bias and not c.add_bias_linear
    assert c.tie_word_embeddings and "output.weight" not in {t.name for t in smollm2.tensors}


def test_smollm2_config_agrees_with_transformers(smollm2_config: ModelConfig, transformers_gguf: dict) -> None:
    hf = transformers_gguf["config"]
    c = smollm2_config
    assert (c.hidden_size, c.num_layers, c.ffn_hidden_size, c.padded_vocab_size) == (
        hf["hidden_size"],
        hf["num_hidden_layers"],
        hf["intermediate_size"],
        hf["vocab_size"],
    )
    assert (c.num_attention_heads, c.num_kv_heads, c.head_dim) == (
        hf["num_attention_heads"],
        hf["num_key_value_heads"],
        hf["head_dim"],
    )
    assert (c.rope_theta, c.layernorm_epsilon, c.tie_word_embeddings) == (
        hf["rope_theta"],
        hf["rms_norm_eps"],
        hf["tie_word_embeddings"],
    )


def test_smollm2_tensor_types(smollm2: GGUFIndex) -> None:
    types = gguf_tensor_types(smollm2)
    assert len(types) == len(smollm2.tensors) == 272
    assert types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_q.weight"] == types["blk.29.ffn_down.weight"] == "Q4_1"
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"


def test_smollm2_every_official_name_once_with_its_shape(smollm2_config: ModelConfig, smollm2_stream: dict) -> None:
    expected = official_tensor_shapes(smollm2_config)
    assert smollm2_stream["names"] == list(expected)  # each once, in checkpoint order
    assert smollm2_stream["shapes"] == expected
    assert "transformer.output_layer.weight" not in expected  # tied embeddings
    assert smollm2_stream["skipped"] == []


def test_smollm2_values_equal_transformers(smollm2_stream: dict, transformers_gguf: dict) -> None:
    ours, hf = smollm2_stream["kept"], transformers_gguf["tensors"]
    f = 1536
    pairs = {
        "transformer.embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
        "transformer.encoder.final_layernorm.weight": hf["model.norm.weight"],
        LAYER0 + "input_layernorm.weight": hf["model.layers.0.input_layernorm.weight"],
        LAYER0 + "post_attention_layernorm.weight": hf["model.layers.0.post_attention_layernorm.weight"],
        LAYER0 + "self_attention.dense.weight": hf["model.layers.0.self_attn.o_proj.weight"],
        LAYER0 + "mlp.dense_4h_to_h.weight": hf["model.layers.0.mlp.down_proj.weight"],
    }
    for name, reference in pairs.items():
        assert torch.equal(ours[name], reference), name
    h_to_4h = ours[LAYER0 + "mlp.dense_h_to_4h.weight"]
    assert torch.equal(h_to_4h[:f], hf["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(h_to_4h[f:], hf["model.layers.0.mlp.up_proj.weight"])
    qkv = ours[LAYER0 + "self_attention.query_key_value.weight"]
    assert torch.equal(qkv[576 + 192 :], hf["model.layers.0.self_attn.v_proj.weight"])


def test_smollm2_q_k_rows_are_transformers_rows_interleaved(smollm2_stream: dict, transformers_gguf: dict) -> None:
    qkv = smollm2_stream["kept"][LAYER0 + "self_attention.query_key_value.weight"]
    q, k = qkv[:576], qkv[576 : 576 + 192]
    hf_q = transformers_gguf["tensors"]["model.layers.0.self_attn.q_proj.weight"]
    hf_k = transformers_gguf["tensors"]["model.layers.0.self_attn.k_proj.weight"]
    assert not torch.equal(q, hf_q)  # transformers did un-permute: the layouts differ...
    assert torch.equal(q, hf_to_interleaved(hf_q, 9))  # ...by exactly llama.cpp's permutation
    assert torch.equal(k, hf_to_interleaved(hf_k, 3))


def test_interleaved_rotary_on_stored_rows_gives_transformers_attention_scores(
    smollm2_config: ModelConfig, smollm2_stream: dict, transformers_gguf: dict
) -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    c = smollm2_config
    heads, kv, d = c.num_attention_heads, c.num_kv_heads, c.head_dim
    qkv = smollm2_stream["kept"][LAYER0 + "self_attention.query_key_value.weight"]
    q_rows, k_rows = qkv[: heads * d], qkv[heads * d : (heads + kv) * d]
    hf_q = transformers_gguf["tensors"]["model.layers.0.self_attn.q_proj.weight"]
    hf_k = transformers_gguf["tensors"]["model.layers.0.self_attn.k_proj.weight"]
    x = torch.randn(1, 8, c.hidden_size, generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[0, 1, 2, 7, 31, 500, 2047, 8000]])

    def glmrun_scores(wq: torch.Tensor, wk: torch.Tensor) -> torch.Tensor:
        cos, sin = rotary_tables(c, positions)
        q = apply_rotary((x @ wq.T).view(1, 8, heads, d), cos, sin)
        k = apply_rotary((x @ wk.T).view(1, 8, kv, d), cos, sin).repeat_interleave(heads // kv, dim=2)
        return torch.einsum("bqhd,bkhd->bhqk", q, k)

    rope = LlamaRotaryEmbedding(config=transformers.LlamaConfig(**transformers_gguf["config"]))
    cos, sin = rope(x, positions)
    q, k = apply_rotary_pos_emb(
        (x @ hf_q.T).view(1, 8, heads, d).transpose(1, 2), (x @ hf_k.T).view(1, 8, kv, d).transpose(1, 2), cos, sin
    )
    hf_scores = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(heads // kv, dim=1))

    torch.testing.assert_close(glmrun_scores(q_rows, k_rows), hf_scores, rtol=1e-4, atol=1e-3)
    # The check has teeth: un-permuted rows under interleaved rotary give other scores.
    assert not torch.allclose(glmrun_scores(hf_q, hf_k), hf_scores, rtol=1e-2, atol=1e-1)


# Hand-made GGUF files -------------------------------------------------------------------------

H, HEADS, KV, D, F, V = 64, 2, 1, 32, 96, 48  # Q8_0 blocks are 32 values: rows of 64 and 96


def tiny_metadata(**changes: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "general.architecture": "llama",
        "llama.embedding_length": H,
        "llama.block_count": 1,
        "llama.attention.head_count": HEADS,
        "llama.attention.head_count_kv": KV,
        "llama.feed_forward_length": F,
        "llama.context_length": 128,
        "llama.attention.layer_norm_rms_epsilon": 1e-6,
        "llama.rope.freq_base": 500000.0,
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(V)],
        "tokenizer.ggml.eos_token_id": 3,
    }
    meta.update(changes)
    return {k: v for k, v in meta.items() if v is not None}


def tiny_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {
        "token_embd.weight": (V, H),
        "blk.0.attn_norm.weight": (H,),
        "blk.0.attn_q.weight": (HEADS * D, H),
        "blk.0.attn_k.weight": (KV * D, H),
        "blk.0.attn_v.weight": (KV * D, H),
        "blk.0.attn_output.weight": (H, HEADS * D),
        "blk.0.ffn_norm.weight": (H,),
        "blk.0.ffn_gate.weight": (F, H),
        "blk.0.ffn_up.weight": (F, H),
        "blk.0.ffn_down.weight": (H, F),
        "output_norm.weight": (H,),
        "output.weight": (V, H),
    }
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def write_gguf(
    path: Path, meta: dict[str, Any], tensors: dict[str, np.ndarray], *, quantize: dict[str, GGMLQuantizationType]
) -> Path:
    """A GGUF file holding ``meta`` and ``tensors`` (float32 arrays stored as F32 unless ``quantize`` says)."""
    writer = gguf.GGUFWriter(str(path), str(meta["general.architecture"]))
    for key, value in meta.items():
        if key == "general.architecture":
            continue  # written by GGUFWriter itself
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    for name, array in tensors.items():
        qtype = quantize.get(name)
        if qtype is None:
            writer.add_tensor(name, array)
        elif qtype == GGMLQuantizationType.F16:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tiny_f16_and_q8_0_round_trip(tmp_path: Path) -> None:
    arrays = tiny_tensors()
    q8 = GGMLQuantizationType.Q8_0
    quantize = {"token_embd.weight": GGMLQuantizationType.F16, "blk.0.attn_q.weight": q8, "blk.0.ffn_down.weight": q8}
    path = write_gguf(tmp_path / "tiny.gguf", tiny_metadata(), arrays, quantize=quantize)
    config = load_gguf_config(path)
    assert not config.tie_word_embeddings and config.rope_base == 500000.0 and config.eos_token_ids == (3,)
    assert gguf_tensor_types(path)["blk.0.attn_q.weight"] == "Q8_0"
    assert gguf_tensor_types(path)["token_embd.weight"] == "F16"
    out = dict(iter_gguf_tensors(path, config))
    assert {name: tuple(t.shape) for name, t in out.items()} == official_tensor_shapes(config)

    embedding = out["transformer.embedding.word_embeddings.weight"]
    assert torch.equal(embedding, torch.from_numpy(arrays["token_embd.weight"].astype(np.float16)).float())
    qkv = out[LAYER0 + "self_attention.query_key_value.weight"]
    q = qkv[: HEADS * D]
    q_ref = torch.from_numpy(arrays["blk.0.attn_q.weight"])
    q8_0 = gguf.quants.dequantize(gguf.quants.quantize(arrays["blk.0.attn_q.weight"], q8), q8)
    assert torch.equal(q, torch.from_numpy(q8_0))
    # Q8_0 keeps one f16 scale per 32 values: the error stays within a step, 1/127 of the block's largest value.
    step = q_ref.reshape(-1, 32).abs().amax(dim=1, keepdim=True) / 127
    assert bool(((q.reshape(-1, 32) - q_ref.reshape(-1, 32)).abs() <= step).all())
    assert torch.equal(qkv[HEADS * D : (HEADS + KV) * D], torch.from_numpy(arrays["blk.0.attn_k.weight"]))
    assert torch.equal(qkv[(HEADS + KV) * D :], torch.from_numpy(arrays["blk.0.attn_v.weight"]))
    down = out[LAYER0 + "mlp.dense_4h_to_h.weight"]
    torch.testing.assert_close(down, torch.from_numpy(arrays["blk.0.ffn_down.weight"]), atol=0.02, rtol=0.0)
    h_to_4h = out[LAYER0 + "mlp.dense_h_to_4h.weight"]
    assert torch.equal(h_to_4h[:F], torch.from_numpy(arrays["blk.0.ffn_gate.weight"]))
    assert torch.equal(h_to_4h[F:], torch.from_numpy(arrays["blk.0.ffn_up.weight"]))
    assert torch.equal(out["transformer.output_layer.weight"], torch.from_numpy(arrays["output.weight"]))


def test_tiny_dtype_and_reader_source(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "tiny.gguf", tiny_metadata(), tiny_tensors(), quantize={})
    reader = open_gguf(path)
    config = load_gguf_config(reader)
    assert all(t.dtype == torch.bfloat16 for _, t in iter_gguf_tensors(reader, config, dtype=torch.bfloat16))
    with pytest.raises(InvalidArgumentError):
        iter_gguf_tensors(reader, config, dtype=torch.int8)


def test_tied_file_has_no_output_layer(tmp_path: Path) -> None:
    arrays = tiny_tensors()
    del arrays["output.weight"]
    path = write_gguf(tmp_path / "tied.gguf", tiny_metadata(), arrays, quantize={})
    config = load_gguf_config(path)
    assert config.tie_word_embeddings
    assert "transformer.output_layer.weight" not in dict(iter_gguf_tensors(path, config))
    # Without tensor names, gguf_config lists them from the file that source names.
    assert gguf_config(read_gguf_metadata(path), source=str(path)).tie_word_embeddings
    with pytest.raises(ConfigError, match="tensor_names"):
        gguf_config(read_gguf_metadata(path), source="not a file")


def test_unsupported_architecture() -> None:
    with pytest.raises(UnsupportedModelError, match="qwen2"):
        gguf_config(tiny_metadata(**{"general.architecture": "qwen2"}), source="x.gguf", tensor_names=[])


@pytest.mark.parametrize("key", ["llama.embedding_length", "llama.attention.layer_norm_rms_epsilon"])
def test_missing_metadata_key_is_named(key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        gguf_config(tiny_metadata(**{key: None}), source="x.gguf", tensor_names=[])


def test_metadata_fallbacks() -> None:
    meta = tiny_metadata(
        **{
            "tokenizer.ggml.tokens": None,
            "llama.vocab_size": 77,
            "llama.rope.freq_base": None,
            "llama.attention.key_length": 40,
            "tokenizer.ggml.eot_token_id": 9,
        }
    )
    config = gguf_config(meta, source="x.gguf", tensor_names=["output.weight"])
    assert config.padded_vocab_size == 77 and config.rope_base == 10000.0
    assert config.head_dim == config.rotary_dim == 40 and config.eos_token_ids == (3, 9)


@pytest.mark.parametrize(
    "changes",
    [
        {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0},
        {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0},
        {"llama.expert_count": 8},
    ],
)
def test_unsupported_settings(changes: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedModelError):
        gguf_config(tiny_metadata(**changes), source="x.gguf", tensor_names=[])


def test_linear_rope_scaling_of_one_is_accepted() -> None:
    meta = tiny_metadata(**{"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 1.0})
    assert gguf_config(meta, source="x.gguf", tensor_names=[]).rope_ratio == 1.0


def test_unsupported_tensor_type_names_tensor_and_type(tmp_path: Path) -> None:
    arrays: dict[str, np.ndarray] = dict(tiny_tensors())
    arrays["output_norm.weight"] = np.arange(H, dtype=np.int32)  # stored as I32, which nothing dequantizes
    path = write_gguf(tmp_path / "i32.gguf", tiny_metadata(), arrays, quantize={})
    stream = iter_gguf_tensors(path, load_gguf_config(path))
    with pytest.raises(UnsupportedModelError, match=r"output_norm\.weight.*I32"):
        list(stream)


def test_unknown_and_ignored_tensors(tmp_path: Path) -> None:
    arrays = tiny_tensors()
    arrays["rope_freqs.weight"] = np.ones(D // 2, dtype=np.float32)
    arrays["blk.0.attn_q.bias"] = np.zeros(HEADS * D, dtype=np.float32)
    path = write_gguf(tmp_path / "extra.gguf", tiny_metadata(), arrays, quantize={})
    config = load_gguf_config(path)
    with pytest.raises(WeightsMismatchError, match=r"blk\.0\.attn_q\.bias"):
        iter_gguf_tensors(path, config)
    skipped: list[str] = []
    names = [name for name, _ in iter_gguf_tensors(path, config, strict=False, skipped=skipped)]
    assert names == list(official_tensor_shapes(config))
    assert sorted(skipped) == ["blk.0.attn_q.bias", "rope_freqs.weight"]
    assert [name for name in skipped if not is_known_ignored(name)] == ["blk.0.attn_q.bias"]


def test_rope_freqs_that_change_the_model_are_refused(tmp_path: Path) -> None:
    arrays = tiny_tensors()
    arrays["rope_freqs.weight"] = np.full(D // 2, 8.0, dtype=np.float32)
    path = write_gguf(tmp_path / "llama31.gguf", tiny_metadata(), arrays, quantize={})
    with pytest.raises(UnsupportedModelError, match="rope_freqs"):
        iter_gguf_tensors(path, load_gguf_config(path))


def test_missing_and_misshapen_tensors(tmp_path: Path) -> None:
    arrays = tiny_tensors()
    del arrays["blk.0.ffn_up.weight"]
    path = write_gguf(tmp_path / "missing.gguf", tiny_metadata(), arrays, quantize={})
    with pytest.raises(WeightsMismatchError, match=r"blk\.0\.ffn_up\.weight"):
        iter_gguf_tensors(path, load_gguf_config(path))
    config = load_gguf_config(write_gguf(tmp_path / "ok.gguf", tiny_metadata(), tiny_tensors(), quantize={}))
    with pytest.raises(WeightsMismatchError, match=r"token_embd\.weight has shape \[48, 64\]"):
        iter_gguf_tensors(tmp_path / "ok.gguf", config.replace(padded_vocab_size=50))


def test_is_known_ignored() -> None:
    assert KNOWN_IGNORED == {"blk.{i}.attn_rot_embd.weight", "rope_freqs.weight"}
    assert is_known_ignored("blk.17.attn_rot_embd.weight") and is_known_ignored("rope_freqs.weight")
    assert not is_known_ignored("blk.0.attn_q.bias") and not is_known_ignored("output.weight")


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1])
def test_torch_dequantization_is_gguf_s_bit_for_bit(qtype: GGMLQuantizationType) -> None:
    values = np.random.default_rng(int(qtype)).standard_normal((6, 96)).astype(np.float32) * 0.1 + 0.03
    blocks = gguf.quants.quantize(values, qtype)  # [6, row bytes]
    ours = dequantize_blocks(blocks, qtype)
    theirs = torch.from_numpy(gguf.quants.dequantize(blocks, qtype).astype(np.float32).reshape(-1))
    assert torch.equal(ours, theirs)
    assert (ours.view(6, 96) - torch.from_numpy(values)).abs().max() < 0.1  # and it is the weights, roughly


def test_torch_dequantization_of_the_embedded_file(smollm2: GGUFIndex) -> None:
    seen = set()
    for tensor in smollm2.tensors:
        if (
            tensor.tensor_type in (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_1)
            and tensor.tensor_type not in seen
        ):
            seen.add(tensor.tensor_type)
            theirs = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32).reshape(-1)
            assert torch.equal(dequantize_blocks(tensor.data, tensor.tensor_type), torch.from_numpy(theirs))
    assert seen == {GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_1}


# The file's own 4-bit blocks ------------------------------------------------------------------


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1])
def test_q4_blocks_are_the_dequantized_values(qtype: GGMLQuantizationType) -> None:
    values = np.random.default_rng(int(qtype)).standard_normal((6, 96)).astype(np.float32) * 0.1 + 0.03
    data = gguf.quants.quantize(values, qtype)
    blocks = q4_blocks(data, qtype, (6, 96))
    assert blocks.codes.dtype == torch.uint8 and blocks.codes.shape == (6, 96) and int(blocks.codes.max()) <= 15
    assert blocks.scale.shape == blocks.low.shape == (6, 3)
    assert len(blocks.codes.unique()) == 16  # every code occurs: the nibble order is tested on all of them
    assert torch.equal(blocks.dequantize(), dequantize_blocks(data, qtype).view(6, 96))
    if qtype == GGMLQuantizationType.Q4_0:
        assert torch.equal(blocks.low, -8 * blocks.scale)  # (q - 8) d


def test_q4_blocks_refuses_other_types() -> None:
    data = gguf.quants.quantize(np.ones((1, 32), dtype=np.float32), GGMLQuantizationType.Q8_0)
    with pytest.raises(InvalidArgumentError, match="Q8_0"):
        q4_blocks(data, GGMLQuantizationType.Q8_0, (1, 32))


def test_q4_of_the_embedded_file_is_its_stream(
    smollm2: GGUFIndex, smollm2_config: ModelConfig, smollm2_stream: dict
) -> None:
    q4 = dict(iter_gguf_q4(smollm2, smollm2_config))
    shapes = smollm2_stream["shapes"]
    matrices = [n for n in shapes if n.startswith("transformer.encoder.layers.") and len(shapes[n]) == 2]
    assert sorted(q4) == sorted(matrices) and len(q4) == 4 * 30  # every layer matrix of the file is Q4_1
    for name, blocks in q4.items():
        assert isinstance(blocks, Q4Blocks) and tuple(blocks.codes.shape) == shapes[name]
        if name.startswith(LAYER0):
            assert torch.equal(blocks.dequantize(), smollm2_stream["kept"][name])
    only = dict(iter_gguf_q4(smollm2, smollm2_config, layers=[3]))
    assert sorted(only) == sorted(n for n in q4 if n.startswith("transformer.encoder.layers.3."))


def test_q4_skips_matrices_with_other_pieces(tmp_path: Path) -> None:
    arrays = tiny_tensors()
    q4_0, q4_1 = GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1
    quantize = {f"blk.0.{p}.weight": q4_1 for p in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up")}
    quantize["blk.0.attn_v.weight"] = GGMLQuantizationType.Q8_0  # q/k/v has a Q8_0 piece: left out
    quantize["blk.0.ffn_down.weight"] = q4_0
    path = write_gguf(tmp_path / "tiny.gguf", tiny_metadata(), arrays, quantize=quantize)
    config = load_gguf_config(path)
    floats = dict(iter_gguf_tensors(path, config))
    q4 = dict(iter_gguf_q4(path, config))
    suffixes = ("self_attention.dense.weight", "mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight")
    assert sorted(q4) == sorted(LAYER0 + s for s in suffixes)
    for name, blocks in q4.items():  # fused gate/up rows included, Q4_0 and Q4_1 alike
        assert torch.equal(blocks.dequantize(), floats[name])
