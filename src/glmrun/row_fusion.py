"""A one-row decode step's norms and SwiGLU carried inside its products (CUDA, Triton, batch 1).

A batch-1 decode step of ChatGLM2-6B on an H100 launched 57 RMSNorm kernels and 28 SwiGLU kernels
between its weight products: ~0.17 ms of kernels and ~0.08 ms of gaps in a ~2.46 ms INT4 step
(`benchmarks/results/h100/profile_int4.json`). Both fold into the products around them:

* An RMSNorm before a product is linear but for one number: ``W (g * h * r) = r * W (g * h)`` with
  ``r = 1 / sqrt(mean(h**2) + eps)``. The product that makes ``h`` (one that adds the residual) also
  writes ``g * h`` (times 2**-8, so float16 cannot overflow) and adds its outputs' share of ``sum(h**2)``
  to a cell (:func:`norm_cells`: exact integers for float16); the next product reads that as its input and
  multiplies its sums by ``r * 2**8`` before the bias. (Re-reading x and the norm weight in every program of the
  consuming kernel instead cost more than the norm kernel saved: `benchmarks/results/README.md`.)
* SwiGLU: a program of the up-projection computes gate row ``n`` and up row ``n + F`` side by side and
  stores ``silu(gate) * up``, rounded as the separate kernel rounds.

:class:`RowFusion` says what one kernel does; :class:`NormedRow` is the residual stream between two
products. The kernels (``quant_kernels._qgemv_kernel``, ``layer_kernels._half_gemv_kernel``) share the
Triton helpers of :mod:`glmrun.row_kernels`, whose ``norm_prep`` starts a chain where no product made ``h``
(after the embedding). This module imports no Triton: the model names these types on the CPU too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CELL_HI_BITS",
    "CELL_SPLIT_BITS",
    "NormedRow",
    "RopeWrite",
    "RowFusion",
    "check_cell",
    "cell_value",
    "fusion_args",
    "norm_cells",
]


@dataclass(frozen=True)
class NormedRow:
    """One row of the residual stream with what the next product needs to take its RMSNorm."""

    h: Tensor  # [..., hidden]: the residual stream
    scaled: Tensor  # weight * h * row_kernels.ROW_SCALE (2**-8), same shape and dtype (rounded to it)
    sumsq: Tensor  # sum(h**2): a cell of norm_cells (or float32 [1])
    eps: float


@dataclass(frozen=True)
class RopeWrite:
    """The QKV product's outputs go where ``layer_kernels.rope_write`` puts them: q and k rotated (interleaved
    pairs of the first ``2 * cos.numel()`` dims of each head), q into ``q`` and k, v into the caches at
    ``position``, rounded as that kernel rounds."""

    q: Tensor  # [heads * head_dim]
    k_row: Tensor  # [kv_heads, max_len, head_dim]: the row's key buffer (a view of the cache)
    v_row: Tensor
    cos: Tensor  # float32 [R]
    sin: Tensor
    position: Tensor  # long [1]
    heads: int
    kv_heads: int


@dataclass(frozen=True)
class RowFusion:
    """What a one-row product does besides ``x @ W.T (+ bias) (+ residual)``.

    ``row``: x is ``row.scaled``; the sums are multiplied by ``1 / sqrt(row.sumsq / K + row.eps) / ROW_SCALE``
    before the bias (the norm of ``row.h``). ``glu``: the weight's rows are gate rows then up rows; the output is
    ``silu(gate) * up`` (half as wide). ``out_weight``: the output (with the residual) is the next norm's
    input: ``out_weight * y * ROW_SCALE`` goes to ``out_scaled`` and ``sum(y**2)`` is added to ``out_sumsq`` (a cell
    of norm_cells, zeroed by the caller). ``rope``: the QKV product's outputs are rotated and stored in the cache
    (see RopeWrite); its plain output is not written.
    """

    row: NormedRow | None = None
    glu: bool = False
    out_weight: Tensor | None = None
    out_scaled: Tensor | None = None
    out_sumsq: Tensor | None = None
    rope: RopeWrite | None = None


CELL_HI_BITS = 16
"""An exact cell's first int64 counts units of 2**-CELL_HI_BITS of the sum of squares (row_kernels has the bounds)."""
CELL_SPLIT_BITS = 40
"""Its second counts units CELL_SPLIT_BITS bits finer (2**-56): each program's share below the first's unit."""


def norm_cells(count: int, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """Zeroed cells ``[count, 2]`` for the sums of squares of ``count`` norms of one ``dtype`` row each.

    float16 rows get exact cells (int64): each program of a product adds its share as a fixed-point pair (units of
    2**-16 and 2**-56, see row_kernels), and integer sums come out the same whatever order the programs finish in,
    so a decode step repeats bit for bit. (With float32 atomics the order of the additions followed the timing:
    greedy decoding on random weights gave different tokens from run to run.) A bfloat16 row's squares can pass
    the fixed point's range, so its cells are float32 (element 0 used, the sums as fast, not repeatable).
    """
    exact = dtype == torch.float16
    return torch.zeros((count, 2), dtype=torch.int64 if exact else torch.float32, device=device)


def check_cell(cell: Tensor, dtype: torch.dtype) -> None:
    """Refuse a cell that cannot hold the sum of squares of a ``dtype`` row (see norm_cells)."""
    if cell.dtype == torch.int64:
        if dtype != torch.float16:
            raise ValueError(f"an exact (int64) cell holds the sums of float16 rows only, not {dtype}")
        if cell.numel() < 2 or not cell.is_contiguous():
            raise ValueError(f"an exact (int64) cell is 2 contiguous numbers, got shape {tuple(cell.shape)}")
    elif cell.dtype != torch.float32 or cell.numel() < 1:
        raise ValueError(f"a sum-of-squares cell is int64 [2] or float32 [1], got {cell.dtype} {tuple(cell.shape)}")


def cell_value(cell: Tensor) -> float:
    """The sum of squares a cell holds (as the kernels read it, before their float32 rounding)."""
    if cell.dtype == torch.int64:
        hi, lo = (int(v) for v in cell.reshape(-1)[:2].tolist())
        return hi * 2.0**-CELL_HI_BITS + lo * 2.0 ** -(CELL_HI_BITS + CELL_SPLIT_BITS)
    return float(cell.reshape(-1)[0].item())


def fusion_args(fusion: RowFusion | None, like: Tensor, block_n: int) -> dict[str, Any]:
    """The fusion's pointer arguments and flags for a kernel built on row_kernels' ``gemv_rows`` / ``gemv_finish``
    with ``block_n`` outputs a program (``like`` stands in for unused pointers)."""
    f = fusion or RowFusion()
    if f.rope is not None and block_n % 2:
        raise ValueError(f"a fused rotary needs an even number of outputs a program, got {block_n}")
    if f.out_weight is not None and (f.out_scaled is None or f.out_sumsq is None):
        raise ValueError("an output norm needs out_scaled and out_sumsq")
    row, rope = f.row, f.rope
    if row is not None:
        check_cell(row.sumsq, row.h.dtype)
    if f.out_sumsq is not None and f.out_scaled is not None:
        check_cell(f.out_sumsq, f.out_scaled.dtype)
    if rope is not None and (rope.k_row.stride(-1) != 1 or rope.v_row.stride() != rope.k_row.stride()):
        raise ValueError("the cache rows must hold each head's dims contiguously, keys and values alike")
    head_dim = rope.k_row.shape[-1] if rope is not None else 1
    return dict(
        q_ptr=rope.q if rope is not None else like,
        k_ptr=rope.k_row if rope is not None else like,
        v_ptr=rope.v_row if rope is not None else like,
        cos_ptr=rope.cos if rope is not None else like,
        sin_tab_ptr=rope.sin if rope is not None else like,
        pos_ptr=rope.position if rope is not None else like,
        rot_pairs=rope.cos.numel() if rope is not None else 0,
        q_width=rope.heads * head_dim if rope is not None else 0,
        k_width=rope.kv_heads * head_dim if rope is not None else 0,
        stride_kh=rope.k_row.stride(0) if rope is not None else 0,
        stride_kp=rope.k_row.stride(1) if rope is not None else 0,
        HEAD_DIM=head_dim,
        ROPE=rope is not None,
        sin_ptr=row.sumsq if row is not None else like,
        eps=row.eps if row is not None else 0.0,
        g_ptr=f.out_weight if f.out_weight is not None else like,
        hg_ptr=f.out_scaled if f.out_scaled is not None else like,
        sout_ptr=f.out_sumsq if f.out_sumsq is not None else like,
        IN_NORM=row is not None,
        GLU=f.glu,
        OUT_NORM=f.out_weight is not None,
    )
