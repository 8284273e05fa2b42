"""The fused Triton matmuls against the dequantized reference: every launch shape the dispatcher uses.

On a machine without a GPU they run in Triton's interpreter on the CPU (tests/conftest.py), which
executes the same kernel code with numpy: the arithmetic (code unpacking, scales, zeros, split-K
accumulation, masking of a cut last block) is checked here; speed is measured on the GPU by benchmarks.
"""

from __future__ import annotations

import pytest
import torch

from glmrun.quant import QuantizedWeight, dequantize, quantize_int4, quantize_int8
from glmrun.quant_kernels import KernelConfig, quant_matmul, triton_available, triton_config_for, triton_quant_matmul

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
