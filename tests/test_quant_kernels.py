"""The fused Triton matmuls against the dequantized reference: every launch shape the dispatcher uses.

On a machine without a GPU they run in Triton's interpreter on the CPU (tests/conftest.py), which
executes the same kernel code with numpy: the arithmetic (code unpacking, scales, zeros, split-K
accumulation, masking of a cut last block) is checked here; speed is measured on the GPU by benchmarks.
"""

from __future__ import annotations

import pytest
import torch

from glmrun.quant import QuantizedWeight, dequantize, quantize_int4, quantize_int8
from glmrun.quant_kernels import (
    KernelConfig,
    dequant_matmul,
    quant_matmul,
    tile_int4,
    tiled_int4_fits,
    tiling_pays,
    triton_available,
    triton_config_for,
    triton_quant_matmul,
    untile_int4,
)
from glmrun.row_fusion import RowFusion

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs Triton (the test extra installs it)")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

FORMATS = {
    "int8": lambda w, g: quantize_int8(w, g),
    "int8-sym": lambda w, g: quantize_int8(w, g, zero=False),
    "int4": lambda w, g: quantize_int4(w, g),
}
# (kind, m, n, k, group, block_k, split_k, stages): a block inside a group, blocks of several groups, a cut last
# block (576 = SmolLM2's width, not a multiple of 512), one group per row, split K; the gemv loop software-
# pipelined (stages > 1: asynchronous copies on a GPU, the same arithmetic in the interpreter), with a cut last
# block too; mm over 1 and 2 row tiles.
LAUNCHES = [
    ("gemv", 1, 24, 256, 64, 32, 1, 1),
    ("gemv", 1, 24, 256, 32, 128, 1, 1),
    ("gemv", 2, 24, 576, 64, 512, 1, 1),
    ("gemv", 1, 16, 192, 192, 64, 1, 1),
    ("gemv", 1, 24, 512, 64, 128, 2, 1),
    ("gemv", 1, 24, 1024, 64, 128, 1, 3),
    ("gemv", 1, 24, 576, 64, 128, 1, 4),
    ("mm", 3, 40, 256, 64, 64, 1, 3),
    ("mm", 17, 40, 256, 64, 32, 2, 3),
]


def _quantized(fmt: str, n: int, k: int, group: int, seed: int) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05 + 0.02  # off-centre, as real rows often are
    return FORMATS[fmt](w, group)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize(("kind", "m", "n", "k", "group", "block_k", "split_k", "stages"), LAUNCHES)
def test_kernel_matches_the_dequantized_matmul(fmt, kind, m, n, k, group, block_k, split_k, stages):
    qw = _quantized(fmt, n, k, group, seed=m * 1000 + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).half()
    ref = x.float() @ dequantize(qw).T  # [m, n]
    bn = 8 if kind == "gemv" else 32
    config = KernelConfig(kind, block_n=bn, block_k=block_k, split_k=split_k, block_m=16, num_stages=stages)
    args = [t.to(DEVICE) if t is not None else None for t in (x, qw.q, qw.scale, qw.zero)]
    y = triton_quant_matmul(*args, qw.bits, group, config)
    assert y.dtype == torch.float16 and y.shape == (m, n)
    err = (y.float().cpu() - ref).abs().max().item()
    assert err <= 2e-3 * ref.abs().max().item() + 1e-3, (err, ref.abs().max().item())


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_dispatch_picks_a_kernel_for_every_chatglm2_and_smollm2_shape(fmt):
    bits = 4 if fmt == "int4" else 8
    for k, group in ((4096, 128), (13696, 128), (576, 32), (1536, 32), (576, 64)):
        for m in (1, 4, 64):
            assert triton_config_for(m, 64, k, group, bits) is not None, (k, group, m)


def test_quant_matmul_uses_the_kernel_only_on_cuda():
    qw = _quantized("int8", 24, 256, 64, seed=1)
    x = torch.randn(1, 256).half()
    on_cpu = quant_matmul(x, qw.q, qw.scale, qw.zero, 8, 64)  # the dequantize path, even with Triton here
    assert torch.allclose(on_cpu.float(), x.float() @ dequantize(qw).T.half().float(), atol=1e-2)


def test_int4_without_zeros_is_refused():
    qw = _quantized("int4", 8, 64, 32, seed=2)
    with pytest.raises(ValueError, match="zeros"):
        triton_quant_matmul(torch.randn(1, 64).half(), qw.q, qw.scale, None, 4, 32, KernelConfig("gemv", 8, 32))


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("split_k", [1, 2])
def test_bias_and_residual_are_added_in_the_kernel_or_after_a_split(fmt, split_k):
    qw = _quantized(fmt, 24, 256, 64, seed=5)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 256, generator=gen).half()
    bias = torch.randn(24, generator=gen).half()
    residual = torch.randn(2, 24, generator=gen).half()
    ref = x.float() @ dequantize(qw).T + bias.float()
    config = KernelConfig("gemv", block_n=8, block_k=128, split_k=split_k)
    args = [t.to(DEVICE) if t is not None else None for t in (x, qw.q, qw.scale, qw.zero)]
    y = triton_quant_matmul(*args, qw.bits, 64, config, bias.to(DEVICE))
    assert (y.float().cpu() - ref).abs().max().item() <= 2e-3 * ref.abs().max().item() + 1e-3
    y = triton_quant_matmul(*args, qw.bits, 64, config, bias.to(DEVICE), residual.to(DEVICE))
    assert (y.float().cpu() - ref - residual.float()).abs().max().item() <= 2e-3 * ref.abs().max().item() + 2e-3


# -- INT4 codes in the tiled order (tile_int4) ----------------------------------------------------


def test_tile_int4_puts_each_column_where_the_tiled_kernel_reads_it():
    qw = _quantized("int4", 6, 512, 128, seed=11)
    tiled = tile_int4(qw.q, 128)
    assert tiled.shape == qw.q.shape and tiled.dtype == torch.uint8 and not torch.equal(tiled, qw.q)
    assert torch.equal(untile_int4(tiled, 128), qw.q)
    canonical = torch.stack((qw.q & 15, qw.q >> 4), dim=-1).view(6, 512).long()
    words = tiled.view(torch.int32).long() & 0xFFFFFFFF  # [6, 64]: 16 words a group
    for g in range(4):
        for j in range(16):
            for i in range(4):  # plane i: pair 16 i + j of the group, even column in nibble i, odd in nibble i + 4
                for h in range(2):
                    column = 128 * g + 2 * (16 * i + j) + h
                    code = (words[:, 16 * g + j] >> (4 * (i + 4 * h))) & 15
                    assert torch.equal(code, canonical[:, column]), (g, j, i, h)


def test_tiling_takes_groups_of_4_to_64_words_only():
    assert tiled_int4_fits(128, 4096) and tiled_int4_fits(32, 576) and tiled_int4_fits(512, 1024)
    assert not tiled_int4_fits(16, 64)  # 2 words a group
    assert not tiled_int4_fits(96, 192)  # 12 words: not a power of two
    assert not tiled_int4_fits(1024, 2048)  # 128 words
    assert not tiled_int4_fits(128, 4160)  # K not whole groups
    with pytest.raises(ValueError, match="tiled order"):
        tile_int4(torch.zeros(2, 48, dtype=torch.uint8), 96)


# (m, n, k, group, block_k, block_n): blocks of 8 groups and of 1, a cut last block (13 groups, 8 a block), SmolLM2's
# group 32 (4 words), two rows of x, an odd number of weight rows.
TILED_GEMV = [
    (1, 24, 1024, 128, 1024, 8),
    (1, 20, 1664, 128, 1024, 8),
    (1, 16, 1664, 128, 128, 4),
    (1, 24, 576, 32, 256, 8),
    (2, 17, 512, 64, 256, 4),
]


@pytest.mark.parametrize(("m", "n", "k", "group", "block_k", "block_n"), TILED_GEMV)
def test_the_tiled_one_row_kernel_matches_the_dequantized_matmul(m, n, k, group, block_k, block_n):
    qw = _quantized("int4", n, k, group, seed=k + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(n)).half()
    ref = x.float() @ dequantize(qw).T
    config = KernelConfig("gemv", block_n=block_n, block_k=block_k, num_warps=4, num_stages=1)
    args = [t.to(DEVICE) for t in (x, tile_int4(qw.q, group), qw.scale, qw.zero)]
    y = triton_quant_matmul(*args, 4, group, config, tiled=True)
    assert y.dtype == torch.float16 and y.shape == (m, n)
    err = (y.float().cpu() - ref).abs().max().item()
    assert err <= 2e-3 * ref.abs().max().item() + 1e-3, (err, ref.abs().max().item())


def test_tiled_codes_give_the_canonical_products_on_every_path():
    """The tiled one-row kernel (with SwiGLU too), the multi-row kernel and the dequantize path against the
    canonical order's kernels on the same weight."""
    qw = _quantized("int4", 32, 512, 64, seed=3)
    gen = torch.Generator().manual_seed(4)
    one, many = (
        torch.randn(1, 512, generator=gen).half().to(DEVICE),
        torch.randn(5, 512, generator=gen).half().to(DEVICE),
    )
    qw = QuantizedWeight(4, 64, qw.shape, *(t.to(DEVICE) for t in (qw.q, qw.scale, qw.zero)))
    tiled = tile_int4(qw.q, 64)
    row = KernelConfig("gemv", block_n=8, block_k=512, num_stages=1)
    tiled_row = KernelConfig("gemv", block_n=4, block_k=256, num_warps=4, num_stages=1)
    mm = KernelConfig("mm", block_n=32, block_k=32, split_k=1, block_m=16, num_stages=1)
    s, z = qw.scale, qw.zero
    pairs = [
        (
            triton_quant_matmul(one, qw.q, s, z, 4, 64, row),
            triton_quant_matmul(one, tiled, s, z, 4, 64, tiled_row, tiled=True),
        ),
        (
            triton_quant_matmul(one, qw.q, s, z, 4, 64, row, fusion=RowFusion(glu=True)),
            triton_quant_matmul(one, tiled, s, z, 4, 64, tiled_row, fusion=RowFusion(glu=True), tiled=True),
        ),
        (
            triton_quant_matmul(many, qw.q, s, z, 4, 64, mm),
            triton_quant_matmul(many, tiled, s, z, 4, 64, mm, tiled=True),
        ),
        (dequant_matmul(many, qw.q, s, z, 4, 64), dequant_matmul(many, tiled, s, z, 4, 64, tiled=True)),
    ]
    for canonical, from_tiled in pairs:
        assert canonical.shape == from_tiled.shape
        assert (
            canonical.float() - from_tiled.float()
        ).abs().max().item() <= 2e-3 * canonical.float().abs().max().item()


def test_tiled_launches_that_do_not_fit_are_refused():
    qw = _quantized("int4", 8, 512, 64, seed=6)
    x = torch.randn(1, 512).half()
    tiled = tile_int4(qw.q, 64)
    for config in (
        KernelConfig("gemv", 8, 192, num_stages=1),  # 3 groups a block
        KernelConfig("gemv", 8, 32, num_stages=1),  # half a group
        KernelConfig("gemv", 8, 128, split_k=2, num_stages=1),
    ):
        with pytest.raises(ValueError, match="whole groups"):
            triton_quant_matmul(x, tiled, qw.scale, qw.zero, 4, 64, config, tiled=True)
    q8 = _quantized("int8", 8, 512, 64, seed=6)
    with pytest.raises(ValueError, match="INT4"):
        triton_quant_matmul(x, q8.q, q8.scale, q8.zero, 8, 64, KernelConfig("gemv", 8, 128), tiled=True)


def test_only_shapes_the_tiled_kernel_ran_faster_on_are_tiled():
    assert tiling_pays(4608, 4096) and tiling_pays(4096, 4096) and tiling_pays(4096, 13696)  # QKV, dense, down
    assert not tiling_pays(27392, 4096)  # ChatGLM2-6B's up projection (with SwiGLU): the canonical kernel was faster


def test_dispatch_gives_tiled_codes_one_row_kernel_of_whole_groups():
    for k, group in ((4096, 128), (13696, 128), (576, 32)):
        config = triton_config_for(1, 4096, k, group, 4, tiled=True)
        assert config is not None and config.kind == "gemv" and config.block_k % group == 0 and config.split_k == 1
        assert triton_config_for(8, 4096, k, group, 4, tiled=True).kind == "mm"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the PTX of the tiled kernel)")
@pytest.mark.parametrize(("k", "n"), [(4096, 4608), (13696, 512)])
def test_the_tiled_kernels_ptx_is_as_close_to_the_float32_product_as_the_canonical_kernel(k, n):
    """float16 sums in the PTX (products, x sums) against the float32 reference, next to the canonical kernel's error,
    with activations as large as the down projection's input gets."""
    gen = torch.Generator().manual_seed(k)
    w = torch.randn(n, k, generator=gen) * 0.02 + 0.003
    qw = quantize_int4(w, 128)
    x = (torch.randn(1, k, generator=gen) * 4.0).half()
    x[0, ::97] = 900.0  # a few large activations
    ref = x.double() @ dequantize(qw).double().T
    cuda = [t.cuda() for t in (x, qw.q, qw.scale, qw.zero)]
    canonical = triton_quant_matmul(*cuda, 4, 128, triton_config_for(1, n, k, 128, 4))
    tiled = triton_quant_matmul(
        cuda[0], tile_int4(cuda[1], 128), *cuda[2:], 4, 128, triton_config_for(1, n, k, 128, 4, tiled=True), tiled=True
    )
    err_canonical = (canonical.double().cpu() - ref).norm().item()
    err_tiled = (tiled.double().cpu() - ref).norm().item()
    assert err_tiled <= 1.5 * err_canonical + 1e-6 * ref.norm().item(), (err_tiled, err_canonical)
    assert err_tiled <= 2e-3 * ref.norm().item()
