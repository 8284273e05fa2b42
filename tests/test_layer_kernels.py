"""The fused decode-attention kernels against the model's plain path (rotary, cache write, masked attention).

Without a GPU they run in Triton's interpreter on CPU tensors (tests/conftest.py): rows of different
lengths in one batch, a padded length bucket, keys cut into several slices (some empty for the shorter
row), partial rotary (ChatGLM2) and whole-head rotary with 3 query heads per KV head (SmolLM2's layout).
"""

from __future__ import annotations

import pytest
import torch

from glmrun import layer_kernels
from glmrun.cache import KVCache
from glmrun.config import ModelConfig
from glmrun.model import _decode_attention, apply_rotary, rotary_tables

pytestmark = pytest.mark.skipif(layer_kernels.triton is None, reason="needs Triton (the test extra installs it)")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _config(heads: int, kv_heads: int, head_dim: int, rotary_dim: int) -> ModelConfig:
    return ModelConfig(
        hidden_size=heads * head_dim,
        num_layers=1,
        num_attention_heads=heads,
        multi_query_group_num=kv_heads,
        kv_channels=head_dim,
        ffn_hidden_size=64,
        padded_vocab_size=64,
        seq_length=1024,
        rotary_dim=rotary_dim,
    )


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "rotary_dim", "positions", "bucket"),
    [
        (8, 2, 32, 16, [5, 290], 512),  # ChatGLM2-like: half the head rotates; 5 slices, row 0 uses one
        (9, 3, 64, 64, [0, 63], 256),  # SmolLM2-like: 3 query heads per KV head, a row at position 0
        (4, 4, 16, 16, [130], 256),  # no grouping, one row
        (2, 1, 16, 16, [3000, 8000], 8192),  # 128 slices, merged 64 at a time: row 0's second 64 all empty
    ],
)
def test_fused_decode_matches_the_plain_path(heads, kv_heads, head_dim, rotary_dim, positions, bucket):
    cfg = _config(heads, kv_heads, head_dim, rotary_dim)
    B, H, K, D = len(positions), heads, kv_heads, head_dim
    first_row = 1
    gen = torch.Generator().manual_seed(sum(positions) + heads)
    caches = []
    for _ in range(2):
        cache = KVCache(cfg, rows=B + 2, max_len=bucket, dtype=torch.float16, devices=[DEVICE])
        caches.append(cache)
    history_k = torch.randn(caches[0].k[0].shape, generator=gen).half()
    history_v = torch.randn(caches[0].v[0].shape, generator=gen).half()
    for cache in caches:
        cache.k[0].copy_(history_k)
        cache.v[0].copy_(history_v)
    qkv = (torch.randn(B, (H + 2 * K) * D, generator=gen) * 2).half().to(DEVICE)
    pos = torch.tensor(positions, device=DEVICE)[:, None]  # [B, 1]
    cos, sin = rotary_tables(cfg, pos)  # [B, 1, R]

    # the plain path, as SelfAttention runs it for decode rows
    plain, fused = caches
    qk = apply_rotary(qkv[:, None, : (H + K) * D].view(B, 1, H + K, D), cos, sin)
    q, k = qk.split((H, K), dim=2)
    v = qkv[:, None, (H + K) * D :].view(B, 1, K, D)
    plain.write(0, pos, k, v, first_row)
    keys, values = plain.view(0, B, bucket, first_row)
    visible = torch.arange(bucket, device=DEVICE)[None, :] <= pos  # [B, L]
    mask = torch.zeros(B, 1, H // K, bucket, dtype=torch.float16, device=DEVICE)
    mask.masked_fill_(~visible[:, None, None, :], float("-inf"))
    qf = q.view(B, K, H // K, D)
    want = _decode_attention(qf, keys, values, mask).reshape(B, H, D)

    k_buf, v_buf = fused.buffers(0)
    q1 = layer_kernels.rope_write(qkv, cos.view(B, -1), sin.view(B, -1), pos.view(B), k_buf, v_buf, first_row, H, K)
    assert torch.equal(q1.cpu(), q.reshape(B, H, D).cpu())  # same float32 math, same rounding
    assert torch.equal(fused.k[0].cpu(), plain.k[0].cpu()) and torch.equal(fused.v[0].cpu(), plain.v[0].cpu())
    got = layer_kernels.decode_attention(q1, k_buf, v_buf, pos.view(B), first_row, bucket)
    assert got.shape == (B, H, D) and got.dtype == torch.float16
    err = (got.float() - want.float()).abs().max().item()
    assert err < 4e-3, err


@pytest.mark.parametrize(("n", "k", "bias"), [(7, 576, True), (33, 1500, False), (4, 2048, True)])
def test_half_gemv_matches_linear(n, k, bias):
    gen = torch.Generator().manual_seed(n * k)
    w = (torch.randn(n, k, generator=gen) * 0.05).half().to(DEVICE)
    b = torch.randn(n, generator=gen).half().to(DEVICE) if bias else None
    x = torch.randn(1, 1, k, generator=gen).half().to(DEVICE)
    assert layer_kernels.gemv_supported(x, w, interpret_ok=True)
    got = layer_kernels.half_gemv(x, w, b)
    want = x.float() @ w.float().T + (b.float() if b is not None else 0)
    assert got.shape == (1, 1, n) and got.dtype == torch.float16
    assert (got.float() - want).abs().max().item() < 2e-3 * want.abs().max().item() + 1e-3
    residual = torch.randn(1, 1, n, generator=gen).half().to(DEVICE)
    with_res = layer_kernels.half_gemv(x, w, b, residual)
    assert (with_res.float() - want - residual.float()).abs().max().item() < 2e-3 * want.abs().max().item() + 2e-3
    assert not layer_kernels.gemv_supported(x.expand(2, 1, k), w, interpret_ok=True)  # one row only
    assert not layer_kernels.gemv_supported(x, w.float(), interpret_ok=True)


@pytest.mark.parametrize(("batch", "positions"), [(2, range(0, 5)), (1, range(7, 12))])
def test_rope_write_of_prompt_tokens_matches_the_plain_path(batch, positions):
    """A prompt piece: T tokens per row, B rows (a fresh padded batch) or one row's later chunk."""
    cfg = _config(8, 2, 32, 16)
    T = len(positions)
    gen = torch.Generator().manual_seed(T + batch)
    plain, fused = (KVCache(cfg, rows=3, max_len=64, dtype=torch.float16, devices=[DEVICE]) for _ in range(2))
    qkv = torch.randn(batch, T, 12 * 32, generator=gen).half().to(DEVICE)
    pos = torch.tensor(list(positions), device=DEVICE)[None].expand(batch, T)
    cos, sin = rotary_tables(cfg, pos)
    qk = apply_rotary(qkv[..., : 10 * 32].view(batch, T, 10, 32), cos, sin)
    plain.write(0, pos, qk[:, :, 8:], qkv[..., 10 * 32 :].view(batch, T, 2, 32), 1)
    n = batch * T
    k_buf, v_buf = fused.buffers(0)
    q = layer_kernels.rope_write(
        qkv.view(n, -1), cos.view(n, -1), sin.view(n, -1), pos.reshape(n), k_buf, v_buf, 1, 8, 2, tokens_per_row=T
    )
    assert torch.equal(q.view(batch, T, 8, 32).cpu(), qk[:, :, :8].cpu())
    assert torch.equal(fused.k[0].cpu(), plain.k[0].cpu()) and torch.equal(fused.v[0].cpu(), plain.v[0].cpu())


def test_swiglu_matches_the_eager_form():
    from glmrun import kernels

    h = (torch.randn(3, 5, 2 * 1500, generator=torch.Generator().manual_seed(4)) * 3).half().to(DEVICE)
    assert layer_kernels.elementwise_supported(h, interpret_ok=True)
    got = layer_kernels.swiglu(h)
    want = kernels.swiglu(h.cpu().float()).half()
    assert got.shape == (3, 5, 1500)
    assert (got.float().cpu() - want.float()).abs().max().item() <= 2e-3 * want.float().abs().max().item()


def test_split_plan_covers_the_keys_with_whole_blocks():
    for length in (1, 63, 64, 300, 2048, 32768):
        for programs in (1, 2, 64, 512):
            slices, per_slice = layer_kernels.split_plan(length, programs)
            assert per_slice % layer_kernels._BLOCK_L == 0
            assert slices * per_slice >= length > (slices - 1) * per_slice
    block = layer_kernels._BLOCK_L
    most = layer_kernels._TARGET_PROGRAMS // 2  # one row, two KV heads: a slice per block of keys up to `most`
    assert layer_kernels.split_plan(2048, 2) == (2048 // block, block)
    assert layer_kernels.split_plan(most * block * 3, 2) == (most, 3 * block)


def test_supported_only_for_half_precision_and_power_of_two_heads():
    half = torch.zeros(2, dtype=torch.float16)
    assert layer_kernels.supported(half, 128, interpret_ok=True)
    assert not layer_kernels.supported(half.float(), 128, interpret_ok=True)
    assert not layer_kernels.supported(half, 96, interpret_ok=True)
    assert not layer_kernels.supported(half, 128) or half.is_cuda  # a CPU tensor never takes it in the model


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("split", [False, True], ids=["one-gpu", "two-gpus"])
def test_cuda_decode_steps_match_float32_on_the_cpu(bits, split):
    """The model's CUDA decode (fused kernels, eager and graph-replayed) against its CPU float32 plain path.

    Split over two GPUs, the second layer and the head live on cuda:1 while cuda:0 stays the current device:
    every Triton launch must follow its tensors there.
    """
    if split and torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    import copy

    from glmrun.bench import random_model
    from glmrun.checkpoint import PRESETS
    from glmrun.config import QuantSpec
    from glmrun.fastpath import GraphDecoder
    from glmrun.quant import quantize_model_

    config = PRESETS["tiny"].replace(num_layers=2, seq_length=512)
    cpu = random_model(config, torch.device("cpu"), torch.float32, seed=3)
    if bits is not None:
        for layer in cpu.layers:
            quantize_model_(layer, QuantSpec(bits=bits, group_size=32))
    gpu = copy.deepcopy(cpu).to("cuda:0", torch.float16)
    if split:
        gpu.layers[1].to("cuda:1")
        gpu.transformer.encoder.final_layernorm.to("cuda:1")
        gpu.transformer.output_layer.to("cuda:1")
    caches = {
        m: KVCache(config, rows=2, max_len=512, dtype=d, devices=m.layer_devices())
        for m, d in ((cpu, torch.float32), (gpu, torch.float16))
    }
    prompts = torch.randint(5, 1000, (2, 40), generator=torch.Generator().manual_seed(1))
    lengths = [40, 23]  # row 1 is shorter: rows attend only their own keys
    graphs = GraphDecoder(gpu, caches[gpu])
    with torch.inference_mode():
        prefill = {}
        for m in (cpu, gpu):
            dev = m.layer_devices()[0]
            ids = prompts.to(dev)
            first = m(ids[:1, :40], torch.arange(40, device=dev)[None], caches[m])  # row 0: one causal piece
            m(ids[1:, :10], torch.arange(10, device=dev)[None], caches[m], first_row=1)  # row 1: two chunks
            second = m(ids[1:, 10:23], torch.arange(10, 23, device=dev)[None], caches[m], first_row=1)
            prefill[m] = torch.cat((first, second)).float().cpu()
        assert (prefill[gpu] - prefill[cpu]).abs().max().item() < 2e-2 * prefill[cpu].abs().max().item()
        tokens = torch.tensor([[7], [9]])
        for step in range(4):
            pos = torch.tensor([[lengths[0] + step], [lengths[1] + step]])
            want = cpu(tokens, pos, caches[cpu], length=int(pos.max()) + 1, masked=True)
            if step % 2 == 0:
                got = gpu(tokens.cuda(), pos.cuda(), caches[gpu], length=int(pos.max()) + 1, masked=True)
            else:
                got = graphs.step(tokens.cuda(), pos.cuda(), int(pos.max()) + 1)
            err = (got.float().cpu() - want).abs().max().item()
            assert err < 2e-2 * want.abs().max().item(), (step, err)
            tokens = want.argmax(-1, keepdim=True)
        for step in range(4, 6):  # one row: the one-row GEMV kernels
            pos = torch.tensor([[lengths[0] + step]])
            want = cpu(tokens[:1], pos, caches[cpu], length=int(pos) + 1)
            if step == 4:
                got = gpu(tokens[:1].cuda(), pos.cuda(), caches[gpu], length=int(pos) + 1)
            else:
                got = graphs.step(tokens[:1].cuda(), pos.cuda(), int(pos) + 1)
            assert (got.float().cpu() - want).abs().max().item() < 2e-2 * want.abs().max().item(), step
            tokens = want.argmax(-1, keepdim=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_overlapped_launch_changes_no_bit_of_a_decode_row(bits):
    """One-row decode steps give the same logits, bit for bit, with programmatic dependent launch off and on
    (eager and graph-replayed): the kernels wait before they read anything the kernel before them wrote."""
    from glmrun import kernels
    from glmrun.bench import random_model
    from glmrun.checkpoint import PRESETS
    from glmrun.config import QuantSpec
    from glmrun.fastpath import GraphDecoder
    from glmrun.quant import quantize_model_

    config = PRESETS["tiny"].replace(num_layers=3, seq_length=512)
    model = random_model(config, torch.device("cpu"), torch.float32, seed=5)
    if bits is not None:
        for layer in model.layers:
            quantize_model_(layer, QuantSpec(bits=bits, group_size=32))
    model = model.to("cuda", torch.float16)
    cache = KVCache(config, rows=1, max_len=512, dtype=torch.float16, devices=model.layer_devices())
    ids = torch.randint(5, 1000, (1, 300), generator=torch.Generator().manual_seed(2)).cuda()
    got: dict[bool, list[torch.Tensor]] = {}
    try:
        with torch.inference_mode():
            model(ids, torch.arange(300, device="cuda")[None], cache)
            for pdl in (False, True):
                kernels.set_overlapped_launch(pdl)
                graphs = GraphDecoder(model, cache)  # captured under this setting
                token, rows = torch.tensor([[11]], device="cuda"), []
                for step in range(4):  # the same positions each time: each run rewrites the same cache rows
                    pos = torch.tensor([[300 + step]], device="cuda")
                    if step % 2 == 0:
                        out = model(token, pos, cache, length=301 + step)
                    else:
                        out = graphs.step(token, pos, 301 + step)
                    rows.append(out.float().cpu())
                    token = out.argmax(-1).view(1, 1)
                got[pdl] = rows
    finally:
        kernels.set_overlapped_launch(True)
    for off, on in zip(got[False], got[True], strict=True):
        assert torch.equal(off, on)
