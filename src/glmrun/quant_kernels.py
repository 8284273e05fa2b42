"""Matmul against quantized weights: fused Triton kernels for CUDA, chunked dequantization elsewhere.

Both paths read the canonical format of :mod:`glmrun.quant` as it is (no second copy of the weight):
``q`` int8 ``[N, K]`` or uint8 ``[N, K/2]`` (low nibble = even column), ``scale`` / ``zero`` float16
``[N, K/group]``. Triton is optional: without it (CPU installs) this module still imports and every
call takes the dequantize path.

The Triton kernels compute ``y[m, n] = sum_k x[m, k] * (c[n, k] * s[n, g(k)] + z[n, g(k)])`` (``c`` the
code from 0, i.e. ``q + 128`` for INT8; ``z = 0`` and ``c = q`` for symmetric INT8) one
K-block at a time, with each block inside one group so a group's scale multiplies a whole partial
dot product (``s * sum(x*q) + z * sum(x)``): the weight bytes are read once and never expanded in
memory. ``gemv`` (one program per ``BLOCK_N`` outputs of one input row, reduction in registers) serves
one row (batch-1 decode); ``mm`` (tensor-core ``tl.dot`` on ``BLOCK_M`` rows) 2 to 64 rows. More rows
(prefill) dequantize chunk by chunk and call cuBLAS, which is compute-bound there anyway.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels import dependent_launch, launch_device
from .row_fusion import RowFusion, fusion_args
from .triton_import import tl, triton

__all__ = [
    "KernelConfig",
    "dequantize_rows",
    "dequant_matmul",
    "quant_matmul",
    "tile_int4",
    "tiled_int4_fits",
    "tiling_pays",
    "triton_available",
    "triton_config_for",
    "triton_quant_matmul",
    "untile_int4",
]

_CPU_CHUNK_ELEMENTS = 1 << 21  # ~8 MB of float32 weight per chunk: large enough for a fast matmul
_GPU_CHUNK_ELEMENTS = 1 << 25  # 64 MB of fp16: big enough for cuBLAS to run at full speed
_MAX_GLU_WORDS = 4096  # a SwiGLU program's 32-bit weight words a K-block, at most (see triton_quant_matmul)
# The tiled INT4 one-row kernel's settings (outputs a program, columns a step, warps): "long" (K >= 2N: ChatGLM2-6B's
# down projection) and "square" (the rest), the fastest of 13 settings on an H100 (`results/h100/fourteenth/`):
# QKV 6.92 us and dense 6.60 (the canonical kernel: 7.48, 6.97), down 16.34 (19.56). The up projection (N >= 4K) keeps
# the canonical order: there the canonical kernel took 25.8 us and the best tiled setting 28.7 (see tiling_pays).
_TILED_SETTINGS: dict[str, tuple[int, int, int]] = {"square": (4, 1024, 4), "long": (4, 2048, 4)}
_MAX_TRITON_ROWS = 64  # above this many rows: dequantize + cuBLAS (compute-bound; crossover not yet timed)


def triton_available() -> bool:
    return triton is not None


# -- INT4 codes in the one-row kernel's order ----------------------------------------------------
#
# The one-row INT4 kernel multiplies a 32-bit word of codes by float16 x read as 32-bit pairs (x[2m], x[2m + 1]).
# In the canonical order word j holds columns 8j..8j+7, whose four pairs are x words 4j..4j+3: a program holding
# four weight words would need sixteen scattered x words, and Triton then loads x in a layout of its own and
# redistributes it through shared memory (16 barriers an iteration in the sm_90 build). "Tiled" order permutes
# the codes inside each group of G columns (G / 8 = P words) so that nibble i + 4h of word j holds column
# 2 * (P * i + j) + h: plane i of a group is the P contiguous x words P*i .. P*i + P - 1, loaded in the weight
# tile's own layout. Same bytes, same shape ([N, K/2] uint8); only CUDA copies take it (QuantLinear.tile_).


def tiled_int4_fits(group_size: int, in_features: int) -> bool:
    """Whether INT4 codes of this group size can take the tiled order: a group holds 4..64 words, a power of two."""
    words = group_size // 8
    return group_size % 8 == 0 and 4 <= words <= 64 and words & (words - 1) == 0 and in_features % group_size == 0


def tiling_pays(out_features: int, in_features: int) -> bool:
    """Whether the tiled one-row kernel beat the canonical one on an H100 for this shape: not for N >= 4K (the up
    projection, whose many programs keep the canonical kernel at 2.3 TB/s; see _TILED_SETTINGS)."""
    return out_features < 4 * in_features


@functools.lru_cache(maxsize=32)
def tiled_columns(group_size: int, in_features: int, device: torch.device) -> Tensor:
    """The input column of each code of tiled INT4 codes read in the canonical way (byte b: codes 2b, 2b + 1)."""
    stored = torch.arange(in_features, device=device)
    group, at = stored // group_size * group_size, stored % group_size
    word, nibble = at // 8, at % 8  # nibble i + 4h of word j: column 2 (P i + j) + h
    return group + 2 * ((group_size // 8) * (nibble % 4) + word) + nibble // 4


def tile_int4(q: Tensor, group_size: int) -> Tensor:
    """Canonical INT4 codes ``uint8 [N, K/2]`` (low nibble = even column) in the tiled order (see above)."""
    codes, columns = _codes_and_columns(q, group_size)
    return _packed(codes.index_select(1, columns))


def untile_int4(q: Tensor, group_size: int) -> Tensor:
    """Tiled INT4 codes back in the canonical order (the inverse of :func:`tile_int4`)."""
    codes, columns = _codes_and_columns(q, group_size)
    return _packed(torch.empty_like(codes).index_copy_(1, columns, codes))


def _codes_and_columns(q: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """``q``'s codes ``[N, K]`` as stored (byte b: codes 2b, 2b + 1) and :func:`tiled_columns` for them."""
    n, k = q.shape[0], q.shape[1] * 2
    if not tiled_int4_fits(group_size, k):
        raise ValueError(f"INT4 codes of group size {group_size} over {k} columns cannot take the tiled order")
    return torch.stack((q & 15, q >> 4), dim=-1).view(n, k), tiled_columns(group_size, k, q.device)


def _packed(codes: Tensor) -> Tensor:
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


# -- the portable path -------------------------------------------------------------------------


def dequantize_rows(
    q: Tensor,
    scale: Tensor,
    zero: Tensor | None,
    bits: int,
    group_size: int,
    *,
    dtype: torch.dtype,
    start: int = 0,
    stop: int | None = None,
) -> Tensor:
    """Rows ``start:stop`` of the float weight ``[rows, K]`` in ``dtype`` (tiled INT4 codes: their columns in the
    stored order, see tiled_columns)."""
    qs = q[start:stop]
    rows = qs.shape[0]
    s = scale[start:stop].to(dtype)[..., None]  # [rows, G, 1]
    if zero is None:
        if bits == 4:
            raise ValueError("an INT4 weight needs its zeros")
        return (qs.to(dtype).view(rows, -1, group_size) * s).view(rows, -1)  # symmetric INT8 (older folders)
    if bits == 8:
        codes = qs.to(dtype).view(rows, -1, group_size) + 128.0  # stored codes are code - 128
    else:
        codes = torch.stack((qs & 15, qs >> 4), dim=-1).view(rows, -1, group_size).to(dtype)  # even, odd columns
    w = torch.addcmul(zero[start:stop].to(dtype)[..., None], codes, s)
    return w.view(rows, -1)


def dequant_matmul(
    x2d: Tensor, q: Tensor, scale: Tensor, zero: Tensor | None, bits: int, group_size: int, *, tiled: bool = False
) -> Tensor:
    """``x2d [M, K] @ W.T`` by dequantizing blocks of output rows to ``x2d.dtype``; returns ``[M, N]``. Tiled codes
    are dequantized as they are stored and x's columns put in that order instead (M x K values, not N x K)."""
    n_out = q.shape[0]
    k = x2d.shape[1]
    if tiled:
        x2d = x2d.index_select(1, tiled_columns(group_size, k, x2d.device))
    budget = _GPU_CHUNK_ELEMENTS if x2d.is_cuda else _CPU_CHUNK_ELEMENTS
    step = max(1, budget // k)
    parts = [
        F.linear(x2d, dequantize_rows(q, scale, zero, bits, group_size, dtype=x2d.dtype, start=r0, stop=r0 + step))
        for r0 in range(0, n_out, step)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


# -- the Triton path ---------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    """Launch settings of one Triton call; ``kind`` is ``"gemv"`` or ``"mm"``."""

    kind: str
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    block_m: int = 16  # mm only: rows of x per program (at least 16 for tl.dot)
    num_stages: int = 2  # software pipelining of the K loop; gemv: 1 = none (2-4 measured slower on an H100)


def _block_k_fits(block_k: int, group_size: int, k: int, kind: str, bits: int) -> bool:
    """A K-block must lie inside one group, or (gemv) cover a power-of-two number of whole groups.

    ``gemv`` masks a last, cut block and reads 32-bit words, so groups and K hold whole words;
    ``mm`` needs K to be a multiple of the block.
    """
    if kind == "mm":
        return k % block_k == 0 and group_size % block_k == 0
    per_word = 32 // bits
    if k % per_word or (group_size % per_word and group_size != k):
        return False
    if group_size % block_k == 0 or group_size == k:  # one group per row: every block has scale 0
        return True
    n = block_k // group_size
    return block_k % group_size == 0 and n & (n - 1) == 0


def triton_config_for(
    m: int, n: int, k: int, group_size: int, bits: int, *, tiled: bool = False
) -> KernelConfig | None:
    """The launch settings for an ``[m, k] x [n, k]`` product, or None when the Triton path does not apply
    (``tiled``: INT4 codes in tile_int4's order)."""
    if m > _MAX_TRITON_ROWS:
        return None
    if tiled and m == 1:
        block_n, columns, warps = _TILED_SETTINGS["long" if k >= 2 * n else "square"]
        groups = max(1, min(columns // group_size, 1 << (k // group_size - 1).bit_length()))
        return KernelConfig("gemv", block_n=block_n, block_k=groups * group_size, num_warps=warps, num_stages=1)
    # Picked from `benchmarks/quant_kernels_gpu.py --sweep` (one row: on an H100, torch 2.11, Triton 3.6,
    # `results/h100/kernel_sweep.json`; more rows: on an H200): one row -> gemv with long K-blocks, 8 outputs
    # per program and no split of K (a split costs a zeroed float32 output and a cast: two more kernels);
    # more rows -> 16-row tensor-core tiles, narrow in N and split over K twice. An INT4 weight of 4K rows or more
    # (ChatGLM2-6B's up projection, whose fused SwiGLU puts 16 rows in a program) takes 1,024-column blocks:
    # 26.3 us against 29.2 at 2,048 (`results/h100/stages/gemv_stages_call1.json`).
    if m == 1:
        longest = 1024 if bits == 4 and n >= 4 * k else 2048
        sizes = (2048, 1024, 512, 256, 128, 64, 32)
        fits = (b for b in sizes if b <= longest and _block_k_fits(b, group_size, k, "gemv", bits))
        block_k = next(fits, None)
        if block_k is None:
            return None
        return KernelConfig("gemv", block_n=8, block_k=block_k, split_k=1, num_warps=4, num_stages=1)
    block_k = next((b for b in (128, 64, 32) if _block_k_fits(b, group_size, k, "mm", bits)), None)
    if block_k is None:
        return None
    return KernelConfig("mm", block_n=32, block_k=block_k, split_k=2, num_warps=4, block_m=16, num_stages=3)


def _check_tiled(config: KernelConfig, bits: int, group_size: int, k: int) -> None:
    if bits != 4 or not tiled_int4_fits(group_size, k):
        raise ValueError(f"tiled codes are INT4 with a group size tile_int4 takes, got {bits} bits, group {group_size}")
    if config.kind == "gemv":
        groups = config.block_k // group_size
        if config.split_k != 1 or config.block_k % group_size or groups & (groups - 1):
            raise ValueError(
                f"the tiled one-row kernel takes whole groups a block (a power of two), no split: {config}"
            )
    elif not _block_k_fits(config.block_k, group_size, k, config.kind, bits):
        raise ValueError(f"block_k {config.block_k} does not fit group_size {group_size} and K {k}")


def triton_quant_matmul(
    x2d: Tensor,
    q: Tensor,
    scale: Tensor,
    zero: Tensor | None,
    bits: int,
    group_size: int,
    config: KernelConfig,
    bias: Tensor | None = None,
    residual: Tensor | None = None,
    fusion: RowFusion | None = None,
    *,
    tiled: bool = False,
) -> Tensor:
    """``x2d [M, K] @ W.T (+ bias) (+ residual [M, N]) -> [M, N]`` in ``x2d.dtype`` with one fused Triton kernel.

    (CUDA, fp16/bf16 x; or Triton's interpreter.) Bias and residual are added in the kernel by ``gemv``
    without a split of K, after it otherwise. ``fusion`` (one row, ``gemv`` without a split): the norms and
    SwiGLU of :mod:`glmrun.row_fusion` in the same kernel (x is then ``fusion.row.scaled``; with ``glu`` the
    output is ``[1, N / 2]``). ``tiled``: INT4 codes in :func:`tile_int4`'s order (``gemv``: blocks of whole
    groups, a power-of-two count, no split of K).
    """
    if triton is None:
        raise RuntimeError("Triton is not installed")
    m, k = x2d.shape
    n = q.shape[0]
    if tiled:
        _check_tiled(config, bits, group_size, k)
    elif not _block_k_fits(config.block_k, group_size, k, config.kind, bits):
        raise ValueError(f"block_k {config.block_k} does not fit group_size {group_size} and K {k}")
    glu = fusion is not None and fusion.glu
    if fusion is not None and (m != 1 or config.kind != "gemv" or config.split_k != 1):
        raise ValueError("a fused norm or SwiGLU needs one row and the one-row kernel without a split of K")
    if glu and n % 2:
        raise ValueError(f"SwiGLU needs an even number of weight rows, got {n}")
    x2d = x2d.contiguous()
    q = q.contiguous()
    scale = scale.contiguous()
    if zero is None and bits == 4:
        raise ValueError("an INT4 weight needs its zeros")
    z = zero.contiguous() if zero is not None else scale  # unused without zeros (symmetric INT8)
    if (bias is not None or residual is not None) and (config.kind != "gemv" or config.split_k > 1):
        y = triton_quant_matmul(x2d, q, scale, zero, bits, group_size, config, tiled=tiled)
        return _add_after(y, bias, residual)
    n_out = n // 2 if glu else n
    block_words = config.block_k * bits // 32
    if glu and not tiled and config.block_n > 1 and 2 * config.block_n * block_words > _MAX_GLU_WORDS:
        # Two weight rows an output: an INT4 tile of 16 rows stays fast, an INT8 one (twice the words) is
        # halved back to 8 rows (on an H100 the 16-row INT8 tile gave 293.0 tok/s against 317.8).
        config = replace(config, block_n=config.block_n // 2)
    if config.split_k > 1:
        y = torch.zeros(m, n, dtype=torch.float32, device=x2d.device)
    else:
        y = torch.empty(m, n_out, dtype=x2d.dtype, device=x2d.device)
    common: dict[str, Any] = dict(
        BITS=bits,
        HAS_ZERO=zero is not None,
        GROUP=group_size,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        SPLIT_K=config.split_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if config.kind == "gemv" and tiled:
        with launch_device(x2d):
            _q4tiled_gemv_kernel[(triton.cdiv(n_out, config.block_n), m)](
                x2d,
                q.view(torch.int32),
                scale,
                z,
                bias if bias is not None else scale,  # unused without a bias
                residual.contiguous() if residual is not None else scale,  # unused without a residual
                y,
                n_out,
                k,
                x2d.stride(0),
                q.stride(0) // 4,
                scale.stride(0),
                y.stride(0),
                k // group_size,
                NG=config.block_k // group_size,
                WORDS=group_size // 8,
                ASM=x2d.is_cuda and x2d.dtype == torch.float16,
                BLOCK_N=config.block_n,
                HAS_BIAS=bias is not None,
                HAS_RES=residual is not None,
                GLU_SPLIT=n_out,
                ROWS=config.block_n * (2 if glu else 1),
                num_warps=config.num_warps,
                num_stages=1,
                **fusion_args(fusion, scale, config.block_n),
                **dependent_launch(x2d),
            )
    elif config.kind == "gemv":
        groups_per_block = max(1, config.block_k // group_size) if group_size < k else 1
        grid = (triton.cdiv(n_out, config.block_n), m, config.split_k)
        words = q.view(torch.int32)  # [N, K / (32 // bits)]: the same bytes, read 4 at a time
        with launch_device(x2d):
            _qgemv_kernel[grid](
                x2d,
                words,
                scale,
                z,
                bias if bias is not None else scale,  # unused without a bias
                residual.contiguous() if residual is not None else scale,  # unused without a residual
                y,
                n_out,
                k,
                x2d.stride(0),
                words.stride(0),
                scale.stride(0),
                y.stride(0),
                GROUPS_PER_BLOCK=groups_per_block,
                EVEN_K=k % config.block_k == 0,
                HAS_BIAS=bias is not None,
                HAS_RES=residual is not None,
                HALF2=bits == 4 and x2d.is_cuda and x2d.dtype == torch.float16,
                GLU_SPLIT=n_out,
                ROWS=config.block_n * (2 if glu else 1),
                K_WORDS=k // (32 // bits),
                STAGES=config.num_stages,
                **fusion_args(fusion, scale, config.block_n),
                **common,
                **dependent_launch(x2d),
            )
    else:
        grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n), config.split_k)
        with launch_device(x2d):
            _qmm_kernel[grid](
                x2d,
                q,
                scale,
                z,
                y,
                m,
                n,
                k,
                x2d.stride(0),
                q.stride(0),
                scale.stride(0),
                y.stride(0),
                BLOCK_M=config.block_m,
                TILED=tiled,
                **common,
            )
    return y if config.split_k == 1 else y.to(x2d.dtype)


def quant_matmul(
    x2d: Tensor,
    q: Tensor,
    scale: Tensor,
    zero: Tensor | None,
    bits: int,
    group_size: int,
    bias: Tensor | None = None,
    residual: Tensor | None = None,
    *,
    tiled: bool = False,
) -> Tensor:
    """``x2d [M, K] @ W.T (+ bias) (+ residual) -> [M, N]`` in ``x2d.dtype``: the fused kernel where it applies
    (``tiled``: INT4 codes in tile_int4's order)."""
    if triton is not None and x2d.is_cuda and x2d.dtype in (torch.float16, torch.bfloat16):
        config = triton_config_for(x2d.shape[0], q.shape[0], x2d.shape[1], group_size, bits, tiled=tiled)
        if config is not None:
            return triton_quant_matmul(x2d, q, scale, zero, bits, group_size, config, bias, residual, tiled=tiled)
    return _add_after(dequant_matmul(x2d, q, scale, zero, bits, group_size, tiled=tiled), bias, residual)


def _add_after(y: Tensor, bias: Tensor | None, residual: Tensor | None) -> Tensor:
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y if residual is None else residual.to(y.dtype) + y


if triton is not None:
    from .row_kernels import await_previous, gemv_finish, gemv_rows

    # INT4 with float16 x: half2 arithmetic in inline PTX, one call per 32-bit word (8 codes). A lop3 puts
    # two codes (columns i and i + 4) into the mantissas of 1024.0 (the odd columns' as 16 c), one sub or
    # fma makes them c - 8 exactly, and fma.f16x2 multiplies two at a time by x / 16; the word's sum comes
    # back as one float32. Products are rounded to float16 (~2**-11 relative, far below INT4's own step)
    # and nothing overflows for |x| < 32768. Three instructions a code become two: on an H100 the INT4
    # GEMVs of a ChatGLM2-6B token fell from 2.26 to 1.79 ms (`results/h100/profile_int4.json`). The
    # same for INT8 (a prmt per two bytes) measured no faster in the model, so INT8 keeps float32.
    _INT4_HALF2: Any = tl.constexpr("""
    {
    .reg .b32 t0, t1, t2, t3, w8, acc, k1, k2, k3;
    .reg .b16 lo, hi;
    .reg .f32 f0, f1;
    mov.b32 k1, 0x64086408;
    mov.b32 k2, 0x2C002C00;
    mov.b32 k3, 0xD480D480;
    lop3.b32 t0, $1, 0x000F000F, 0x64006400, 0xEA;
    lop3.b32 t1, $1, 0x00F000F0, 0x64006400, 0xEA;
    shr.u32 w8, $1, 8;
    lop3.b32 t2, w8, 0x000F000F, 0x64006400, 0xEA;
    lop3.b32 t3, w8, 0x00F000F0, 0x64006400, 0xEA;
    sub.rn.f16x2 t0, t0, k1;
    fma.rn.f16x2 t1, t1, k2, k3;
    sub.rn.f16x2 t2, t2, k1;
    fma.rn.f16x2 t3, t3, k2, k3;
    mul.rn.f16x2 acc, t0, $2;
    fma.rn.f16x2 acc, t1, $3, acc;
    fma.rn.f16x2 acc, t2, $4, acc;
    fma.rn.f16x2 acc, t3, $5, acc;
    mov.b32 {lo, hi}, acc;
    cvt.f32.f16 f0, lo;
    cvt.f32.f16 f1, hi;
    add.f32 $0, f0, f1;
    }
    """)

    @triton.jit
    def _half2_of(x_row, offs_a, offs_b, mask, scale):
        """Words holding the half2 (x[offs_a], x[offs_b]) * scale, and x[offs_a] + x[offs_b] in float32."""
        xa = tl.load(x_row + offs_a, mask=mask, other=0.0).to(tl.float32)
        xb = tl.load(x_row + offs_b, mask=mask, other=0.0).to(tl.float32)
        lo = (xa * scale).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        hi = (xb * scale).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) << 16
        return lo | hi, xa + xb

    # Tiled INT4 (see tile_int4) with float16 x: one call a weight word ($2). Nibbles i (bits 4i..4i+3) and i + 4
    # (bits 16 + 4i..) of the word are the even and odd columns of pair P*i + j, whose x word is operand $3 + i.
    # A lop3 puts two codes into the mantissas of 1024.0 (the odd nibbles' as 16 c), one fma makes them
    # (c - 8) / 16 exactly, and fma.f16x2 multiplies two at a time by x. $0 = sum((c - 8) / 16 * x) over the word's
    # eight columns, $1 = their sum(x): float16 sums (no overflow for |x| < 8192) returned as float32.
    _INT4_TILED: Any = tl.constexpr("""
    {
    .reg .b32 t0, t1, t2, t3, w8, acc, xs, k2, k3;
    .reg .b16 lo, hi;
    mov.b32 k2, 0x2C002C00;
    mov.b32 k3, 0xD408D408;
    lop3.b32 t0, $2, 0x000F000F, 0x64006400, 0xEA;
    lop3.b32 t1, $2, 0x00F000F0, 0x64006400, 0xEA;
    shr.u32 w8, $2, 8;
    lop3.b32 t2, w8, 0x000F000F, 0x64006400, 0xEA;
    lop3.b32 t3, w8, 0x00F000F0, 0x64006400, 0xEA;
    fma.rn.f16x2 t0, t0, k2, k3;
    fma.rn.f16x2 t2, t2, k2, k3;
    mov.b32 k2, 0x1C001C00;
    mov.b32 k3, 0xC480C480;
    fma.rn.f16x2 t1, t1, k2, k3;
    fma.rn.f16x2 t3, t3, k2, k3;
    mul.rn.f16x2 acc, t0, $3;
    fma.rn.f16x2 acc, t1, $4, acc;
    fma.rn.f16x2 acc, t2, $5, acc;
    fma.rn.f16x2 acc, t3, $6, acc;
    mov.b32 {lo, hi}, acc;
    add.rn.f16 lo, lo, hi;
    cvt.f32.f16 $0, lo;
    add.rn.f16x2 xs, $3, $4;
    add.rn.f16x2 acc, $5, $6;
    add.rn.f16x2 xs, xs, acc;
    mov.b32 {lo, hi}, xs;
    add.rn.f16 lo, lo, hi;
    cvt.f32.f16 $1, lo;
    }
    """)

    @triton.jit
    def _half_of(pair, h: tl.constexpr):
        """Half ``h`` of 32-bit words holding two float16, as float32."""
        return ((pair >> (16 * h)) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _tiled_word(w, p0, p1, p2, p3, ASM: tl.constexpr):
        """Per tiled INT4 word: sum((c - 8) / 16 * x) and sum(x) over its 8 columns (p_i: plane i's x words)."""
        if ASM:
            prod, xs = tl.inline_asm_elementwise(
                _INT4_TILED,
                "=r,=r,r,r,r,r,r",
                [w, p0, p1, p2, p3],
                dtype=(tl.float32, tl.float32),
                is_pure=True,
                pack=1,
            )
        else:  # the same sums in float32 (Triton's interpreter; no PTX there)
            prod = tl.zeros(w.shape, tl.float32)
            xs = tl.zeros(w.shape, tl.float32)
            for h in tl.static_range(2):
                x0 = _half_of(p0, h)
                x1 = _half_of(p1, h)
                x2 = _half_of(p2, h)
                x3 = _half_of(p3, h)
                prod += (((w >> (16 * h)) & 15).to(tl.float32) - 8.0) * x0
                prod += (((w >> (16 * h + 4)) & 15).to(tl.float32) - 8.0) * x1
                prod += (((w >> (16 * h + 8)) & 15).to(tl.float32) - 8.0) * x2
                prod += (((w >> (16 * h + 12)) & 15).to(tl.float32) - 8.0) * x3
                xs += (x0 + x1) + (x2 + x3)
            prod = prod * 0.0625
        return prod, xs

    @triton.jit
    def _tiled_step(
        acc,
        g0,
        w_at,
        x_at,
        s_at,
        z_at,
        N_GROUPS,
        NG: tl.constexpr,
        WORDS: tl.constexpr,
        CUT: tl.constexpr,
        ASM: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """Groups g0 .. g0 + NG - 1 of _q4tiled_gemv_kernel (CUT: some are past the last, masked) added to acc."""
        gi = g0 + tl.arange(0, NG)
        if CUT:
            gi = tl.minimum(gi, N_GROUPS - 1)  # loaded again, multiplied by zero below
        w = tl.load(w_at + gi[None, :, None] * WORDS)  # [ROWS, NG, WORDS]
        if PDL:  # the first weights are on their way while the kernel before finishes
            if g0 == 0:
                await_previous(PDL)
        xp = x_at + gi[None, :, None] * (4 * WORDS)  # plane i of group gi: x words 4 * WORDS * gi + WORDS * i + j
        prod, xs = _tiled_word(
            w, tl.load(xp), tl.load(xp + WORDS), tl.load(xp + 2 * WORDS), tl.load(xp + 3 * WORDS), ASM
        )
        s = tl.load(s_at + gi[None, :]).to(tl.float32)  # [ROWS, NG]
        z = tl.load(z_at + gi[None, :]).to(tl.float32)
        if CUT:
            keep = (g0 + tl.arange(0, NG) < N_GROUPS)[None, :]
            s = tl.where(keep, s, 0.0)
            z = tl.where(keep, z, 0.0)
        acc += prod * (16.0 * s)[:, :, None]
        acc += xs * (8.0 * s + z)[:, :, None]
        return acc

    @triton.jit
    def _q4tiled_gemv_kernel(
        x_ptr,
        w_ptr,
        s_ptr,
        z_ptr,
        b_ptr,
        r_ptr,
        y_ptr,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_sn,
        stride_ym,
        N_GROUPS,
        NG: tl.constexpr,
        WORDS: tl.constexpr,
        ASM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_RES: tl.constexpr,
        sin_ptr,
        eps,
        g_ptr,
        hg_ptr,
        sout_ptr,
        GLU_SPLIT,
        ROWS: tl.constexpr,
        IN_NORM: tl.constexpr,
        GLU: tl.constexpr,
        OUT_NORM: tl.constexpr,
        q_ptr,
        k_ptr,
        v_ptr,
        cos_ptr,
        sin_tab_ptr,
        pos_ptr,
        rot_pairs,
        q_width,
        k_width,
        stride_kh,
        stride_kp,
        ROPE: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        PDL: tl.constexpr,
    ):
        # One row of x times ROWS weight rows in tiled INT4 (tile_int4: WORDS words a group), NG groups a step.
        # Every tensor of the loop is [ROWS, NG, WORDS] (weight words, the four planes of x words, the products)
        # or [ROWS, NG] (scales, zeros, broadcast along the words): the weight's layout throughout, so nothing
        # is redistributed between threads until the sum after the loop. Per group the output gains
        # s * sum(c * x) + z * sum(x) = 16 s * sum((c - 8) / 16 * x) + (8 s + z) * sum(x).
        pid = tl.program_id(0)
        row = tl.program_id(1)  # of x
        rows, row_mask = gemv_rows(pid, N, GLU_SPLIT, BLOCK_N, GLU)  # of the weight
        j = tl.arange(0, WORDS)
        safe = tl.where(row_mask, rows, 0)  # rows past N read row 0 (never stored): no masked loads
        w_at = w_ptr + safe[:, None, None] * stride_wn + j[None, None, :]  # [ROWS, 1, WORDS]
        x_words = (x_ptr + row * stride_xm).to(tl.pointer_type(tl.int32))
        x_at = x_words + j[None, None, :] + 0 * safe[:, None, None]  # the same x words for every weight row
        s_at = (s_ptr + safe * stride_sn)[:, None]  # [ROWS, 1]: the rows' scales and zeros
        z_at = (z_ptr + safe * stride_sn)[:, None]
        acc = tl.zeros([ROWS, NG, WORDS], dtype=tl.float32)
        whole = N_GROUPS - N_GROUPS % NG
        for g0 in range(0, whole, NG):
            acc = _tiled_step(acc, g0, w_at, x_at, s_at, z_at, N_GROUPS, NG, WORDS, False, ASM, PDL)
        if whole < N_GROUPS:  # a cut last step
            acc = _tiled_step(acc, whole, w_at, x_at, s_at, z_at, N_GROUPS, NG, WORDS, True, ASM, PDL)
        gemv_finish(
            tl.sum(tl.sum(acc, 2), 1),
            rows,
            row_mask,
            pid,
            N,
            K,
            y_ptr + row * stride_ym,
            b_ptr,
            r_ptr + row * N,
            sin_ptr,
            eps,
            g_ptr,
            hg_ptr,
            sout_ptr,
            q_ptr,
            k_ptr,
            v_ptr,
            cos_ptr,
            sin_tab_ptr,
            pos_ptr,
            rot_pairs,
            q_width,
            k_width,
            stride_kh,
            stride_kp,
            BLOCK_N,
            HAS_BIAS,
            HAS_RES,
            IN_NORM,
            GLU,
            OUT_NORM,
            ROPE,
            HEAD_DIM,
        )

    @triton.jit
    def _qgemv_kernel(
        x_ptr,
        w_ptr,
        s_ptr,
        z_ptr,
        b_ptr,
        r_ptr,
        y_ptr,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_sn,
        stride_ym,
        BITS: tl.constexpr,
        HAS_ZERO: tl.constexpr,
        GROUP: tl.constexpr,
        GROUPS_PER_BLOCK: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr,
        EVEN_K: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_RES: tl.constexpr,
        HALF2: tl.constexpr,
        sin_ptr,
        eps,
        g_ptr,
        hg_ptr,
        sout_ptr,
        GLU_SPLIT,
        ROWS: tl.constexpr,
        IN_NORM: tl.constexpr,
        GLU: tl.constexpr,
        OUT_NORM: tl.constexpr,
        q_ptr,
        k_ptr,
        v_ptr,
        cos_ptr,
        sin_tab_ptr,
        pos_ptr,
        rot_pairs,
        q_width,
        k_width,
        stride_kh,
        stride_kp,
        ROPE: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        K_WORDS,
        STAGES: tl.constexpr,
        PDL: tl.constexpr,
    ):
        # One input row (axis 1) x BLOCK_N output features (axis 0), K split SPLIT_K ways (axis 2).
        # The weight is read as int32 words (8 nibbles or 4 bytes, little-endian: lowest bits = lowest
        # column). A K-block covers GROUPS_PER_BLOCK whole groups or lies inside one; the last may be cut.
        # Per group, cx = sum(code * x) with code = q (INT4, 0..15) or q + 128 (INT8 with zeros, 0..255)
        # or q (symmetric INT8), and the output gains s * cx + z * sum(x).
        # HALF2 (INT4, float16 x on a GPU): the inline PTX above. Otherwise codes become floats without
        # int->float conversions: a code c of B bits placed in the top mantissa bits of 1.0 reads as
        # f = 1 + c / 2**B, and f * x is exact in float32 for a 16-bit x, so sum(c * x) = 2**B *
        # (sum(f * x) - sum(x)) per group (INT8 codes are biased by +128 first). STAGES > 1 software-pipelines
        # the K loop (the weight loads become asynchronous copies through shared memory).
        PER_WORD: tl.constexpr = 32 // BITS
        WORDS: tl.constexpr = BLOCK_K // PER_WORD
        PER_GROUP: tl.constexpr = WORDS // GROUPS_PER_BLOCK  # words of one group inside the block
        CODE_MASK: tl.constexpr = ((1 << BITS) - 1) << (23 - BITS)  # the top BITS mantissa bits
        pid_n = tl.program_id(0)
        row = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_n, n_mask = gemv_rows(pid_n, N, GLU_SPLIT, BLOCK_N, GLU)  # ROWS weight rows (GLU: two an output)
        offs_g = tl.arange(0, GROUPS_PER_BLOCK)
        x_row = x_ptr + row * stride_xm
        acc = tl.zeros([ROWS], dtype=tl.float32)
        for k0 in tl.range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K, num_stages=STAGES):
            g_idx = k0 // GROUP + offs_g
            s_offs = offs_n[:, None] * stride_sn + g_idx[None, :]  # [BN, NG]
            s_mask = n_mask[:, None] & (g_idx < tl.cdiv(K, GROUP))[None, :]
            s = tl.load(s_ptr + s_offs, mask=s_mask, other=0.0).to(tl.float32)
            kw = k0 // PER_WORD + tl.arange(0, WORDS)  # word index in the row
            k_mask = kw < K_WORDS  # (an argument, not K // PER_WORD: its divisibility by 16 gives 16-byte loads)
            w_ptrs = w_ptr + offs_n[:, None] * stride_wn + kw[None, :]
            if EVEN_K:
                w = tl.load(w_ptrs, mask=n_mask[:, None], other=0)  # [BN, WORDS] int32
            else:
                w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0)
            if PDL:  # the first block's weights are on their way while the kernel before finishes
                if k0 == pid_k * BLOCK_K:
                    await_previous(PDL)
            if HALF2:  # INT4: word j holds columns 8j..8j+7; the PTX pairs column i with column i + 4
                p0, a0 = _half2_of(x_row, kw * 8, kw * 8 + 4, k_mask, 0.0625)
                p1, a1 = _half2_of(x_row, kw * 8 + 1, kw * 8 + 5, k_mask, 0.0625)
                p2, a2 = _half2_of(x_row, kw * 8 + 2, kw * 8 + 6, k_mask, 0.0625)
                p3, a3 = _half2_of(x_row, kw * 8 + 3, kw * 8 + 7, k_mask, 0.0625)
                prod = tl.inline_asm_elementwise(
                    _INT4_HALF2,
                    "=r,r,r,r,r,r",
                    [w, p0[None, :], p1[None, :], p2[None, :], p3[None, :]],
                    dtype=tl.float32,
                    is_pure=True,
                    pack=1,
                )  # [ROWS, WORDS]: sum((c - 8) * x) / 16 over each word
                xsum = a0 + a1 + a2 + a3
            else:
                prod = tl.zeros([ROWS, WORDS], dtype=tl.float32)
                xsum = tl.zeros([WORDS], dtype=tl.float32)
                for i in tl.static_range(PER_WORD):
                    if EVEN_K:
                        xi = tl.load(x_row + kw * PER_WORD + i).to(tl.float32)
                    else:
                        xi = tl.load(x_row + kw * PER_WORD + i, mask=k_mask, other=0.0).to(tl.float32)
                    if 23 - BITS - BITS * i >= 0:  # move code i to the top mantissa bits
                        moved = w << (23 - BITS - BITS * i)
                    else:
                        moved = w >> (BITS * i + BITS - 23)
                    if BITS == 4:
                        fbits = (moved & CODE_MASK) | 0x3F800000
                    else:
                        fbits = (moved & CODE_MASK) ^ 0x3FC00000  # flips the sign bit: code + 128
                    prod += fbits.to(tl.float32, bitcast=True) * xi[None, :]
                    xsum += xi
            part = tl.sum(tl.reshape(prod, [ROWS, GROUPS_PER_BLOCK, PER_GROUP]), 2)  # [ROWS, NG]
            xs = tl.sum(tl.reshape(xsum, [GROUPS_PER_BLOCK, PER_GROUP]), 1)[None, :]  # [1, NG]
            if HALF2:  # part = sum((c - 8) * x) / 16
                cx = 16.0 * part + 8.0 * xs
            elif HAS_ZERO:  # part = sum((1 + c / 2**BITS) * x)
                cx = (16.0 if BITS == 4 else 256.0) * (part - xs)
            else:
                cx = 256.0 * (part - 1.5 * xs)
            if HAS_ZERO:
                z = tl.load(z_ptr + s_offs, mask=s_mask, other=0.0).to(tl.float32)
                acc += tl.sum(s * cx + z * xs, 1)
            else:
                acc += tl.sum(s * cx, 1)
        if SPLIT_K == 1:  # bias, residual [M, N] and the fusions of row_fusion (one row only)
            gemv_finish(
                acc,
                offs_n,
                n_mask,
                pid_n,
                N,
                K,
                y_ptr + row * stride_ym,
                b_ptr,
                r_ptr + row * N,
                sin_ptr,
                eps,
                g_ptr,
                hg_ptr,
                sout_ptr,
                q_ptr,
                k_ptr,
                v_ptr,
                cos_ptr,
                sin_tab_ptr,
                pos_ptr,
                rot_pairs,
                q_width,
                k_width,
                stride_kh,
                stride_kp,
                BLOCK_N,
                HAS_BIAS,
                HAS_RES,
                IN_NORM,
                GLU,
                OUT_NORM,
                ROPE,
                HEAD_DIM,
            )
        else:  # the caller adds bias and residual
            tl.atomic_add(y_ptr + row * stride_ym + offs_n, acc, mask=n_mask)

    @triton.jit
    def _qmm_kernel(
        x_ptr,
        q_ptr,
        s_ptr,
        z_ptr,
        y_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_qn,
        stride_sn,
        stride_ym,
        BITS: tl.constexpr,
        HAS_ZERO: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr,
        TILED: tl.constexpr,
    ):
        # A BLOCK_M x BLOCK_N tile of y; every K-block lies inside one group (BLOCK_K divides GROUP). TILED: INT4
        # codes in tile_int4's order (a block's bytes are still its group's, their columns permuted).
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
            s_offs = offs_n * stride_sn + k0 // GROUP
            s = tl.load(s_ptr + s_offs, mask=n_mask, other=0.0).to(tl.float32)
            if BITS == 4:
                offs_b = tl.arange(0, BLOCK_K // 2)
                b = tl.load(
                    q_ptr + offs_n[None, :] * stride_qn + (k0 // 2 + offs_b)[:, None], mask=n_mask[None, :], other=0
                )  # [BK/2, BN] uint8
                if TILED:  # byte 4j + b of a group holds nibbles 2b, 2b + 1; nibble i + 4h: column 2 (P i + j) + h
                    at = (k0 % GROUP) // 2 + offs_b
                    lo = 2 * (at % 4)
                    col_lo = (k0 // GROUP) * GROUP + 2 * ((GROUP // 8) * (lo % 4) + at // 4) + lo // 4
                    col_hi = (k0 // GROUP) * GROUP + 2 * ((GROUP // 8) * ((lo + 1) % 4) + at // 4) + (lo + 1) // 4
                else:
                    col_lo = k0 + 2 * offs_b
                    col_hi = col_lo + 1
                xe = tl.load(x_ptr + offs_m[:, None] * stride_xm + col_lo[None, :], mask=m_mask[:, None], other=0.0)
                xo = tl.load(x_ptr + offs_m[:, None] * stride_xm + col_hi[None, :], mask=m_mask[:, None], other=0.0)
                part = tl.dot(xe, (b & 15).to(xe.dtype))
                part = tl.dot(xo, (b >> 4).to(xo.dtype), part)
                z = tl.load(z_ptr + s_offs, mask=n_mask, other=0.0).to(tl.float32)
                xsum = tl.sum(xe.to(tl.float32), 1) + tl.sum(xo.to(tl.float32), 1)
                acc += part * s[None, :] + xsum[:, None] * z[None, :]
            else:
                offs_k = tl.arange(0, BLOCK_K)
                w = tl.load(
                    q_ptr + offs_n[None, :] * stride_qn + (k0 + offs_k)[:, None], mask=n_mask[None, :], other=0
                )  # [BK, BN] int8
                xt = tl.load(
                    x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :], mask=m_mask[:, None], other=0.0
                )
                part = tl.dot(xt, w.to(xt.dtype)) * s[None, :]
                if HAS_ZERO:  # (q + 128) * s + z = q * s + (z + 128 * s)
                    z = tl.load(z_ptr + s_offs, mask=n_mask, other=0.0).to(tl.float32)
                    xsum = tl.sum(xt.to(tl.float32), 1)
                    part += xsum[:, None] * (z + 128.0 * s)[None, :]
                acc += part
        y = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
        if SPLIT_K == 1:
            tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            tl.atomic_add(y, acc, mask=mask)
