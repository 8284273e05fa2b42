"""Triton helpers of :mod:`glmrun.row_fusion`: the rows and epilogue of a fused one-row product, and ``norm_prep``.

``gemv_rows`` / ``gemv_finish`` are called from the one-row kernels of :mod:`glmrun.quant_kernels` and
:mod:`glmrun.layer_kernels`, so both weight formats fuse the same norms and SwiGLU with the same rounding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .kernels import dependent_launch, launch_device
from .row_fusion import CELL_HI_BITS, CELL_SPLIT_BITS, NormedRow, check_cell
from .triton_import import tl, triton

__all__ = ["ROW_SCALE", "norm_prep"]

# The fixed point of an exact cell (row_fusion.norm_cells, CELL_HI_BITS = 16, CELL_SPLIT_BITS = 40): a program's
# sum of squares p >= 0 splits into hi = floor(p * 2**16) and lo = the rest in units of 2**-56 (< 2**40), each
# added with an int64 atomic. Integer sums do not depend on the order the programs arrive in, so the cell (and
# every bit after it) repeats. Bounds for float16 rows: a program of 8 outputs adds hi <= 8 * 65504**2 * 2**16
# < 2**52, and a row of N <= 16384 outputs at most 2**62 in all; lo stays below 2**62 for up to 2**22 programs.
_HI_BITS: Any = tl.constexpr(CELL_HI_BITS) if tl is not None else CELL_HI_BITS
_SPLIT_BITS: Any = tl.constexpr(CELL_SPLIT_BITS) if tl is not None else CELL_SPLIT_BITS

ROW_SCALE = 2.0**-8
"""A NormedRow holds ``weight * h * ROW_SCALE``: the residual stream times the norm weight could pass float16's
65504 where the normalized row never does; scaled down it cannot for ``|weight| < 256``, and the exponent is
given back in the consumer's epilogue (exact: a power of two)."""
_SCALE: Any = tl.constexpr(ROW_SCALE) if tl is not None else ROW_SCALE


def norm_prep(h: Tensor, weight: Tensor, eps: float, sumsq: Tensor) -> NormedRow:
    """The :class:`NormedRow` of one row ``h [..., hidden]`` with no product before it (one small kernel)."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    k = h.shape[-1]
    if h.numel() != k:
        raise ValueError(f"norm_prep takes one row, got {tuple(h.shape)}")
    check_cell(sumsq, h.dtype)
    h1 = h.reshape(k).contiguous()
    scaled = torch.empty_like(h1)
    with launch_device(h1):
        _norm_prep_kernel[(1,)](h1, weight, scaled, sumsq, k, BLOCK=1024, num_warps=4, **dependent_launch(h1))
    return NormedRow(h, scaled.view(h.shape), sumsq, eps)


if triton is not None:

    @triton.jit
    def gemv_rows(pid, N_OUT, GLU_SPLIT, BLOCK_N: tl.constexpr, GLU: tl.constexpr):
        """The weight rows of program ``pid`` and their mask: outputs ``pid * BLOCK_N ...``; with GLU, gate row
        ``n`` and up row ``n + GLU_SPLIT`` interleaved (2 * BLOCK_N rows)."""
        if GLU:
            r = tl.arange(0, 2 * BLOCK_N)
            out = pid * BLOCK_N + r // 2
            rows = out + (r % 2) * GLU_SPLIT
        else:
            out = pid * BLOCK_N + tl.arange(0, BLOCK_N)
            rows = out
        return rows, out < N_OUT

    @triton.jit
    def gemv_finish(
        acc,  # [BLOCK_N] (or [2 * BLOCK_N] with GLU) float32 sums of the rows from gemv_rows
        rows,
        row_mask,
        pid,
        N_OUT,
        K,
        y_ptr,
        b_ptr,
        r_ptr,
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
        BLOCK_N: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_RES: tl.constexpr,
        IN_NORM: tl.constexpr,
        GLU: tl.constexpr,
        OUT_NORM: tl.constexpr,
        ROPE: tl.constexpr,
        HEAD_DIM: tl.constexpr,
    ):
        """Input norm, bias, SwiGLU, residual and output norm of a one-row product; stores y (row 0 of y_ptr), or
        with ROPE the rotated q and the new k, v in the cache (BLOCK_N even: a program holds whole pairs)."""
        if IN_NORM:
            acc = acc * (tl.rsqrt(load_sumsq(sin_ptr) / K + eps) / _SCALE)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = offs < N_OUT
        if GLU:  # as the separate kernel: h rounded, silu rounded, product rounded
            h = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
            gate, up = tl.split(tl.reshape(h, [BLOCK_N, 2]))
            act = (gate / (1.0 + tl.exp(-gate))).to(y_ptr.dtype.element_ty).to(tl.float32)
            y = act * up
        else:
            y = acc
        if HAS_RES:  # residual [N_OUT], one row
            y += tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        out = y.to(y_ptr.dtype.element_ty)
        if ROPE:  # as layer_kernels' rope_write: float32 rotation of the rounded outputs, rounded again
            even, odd = tl.split(tl.reshape(out.to(tl.float32), [BLOCK_N // 2, 2]))
            n_even = pid * BLOCK_N + 2 * tl.arange(0, BLOCK_N // 2)
            pair = (n_even % HEAD_DIM) // 2
            rot = (pair < rot_pairs) & (n_even < q_width + k_width)
            c = tl.load(cos_ptr + pair, mask=rot, other=1.0)
            s = tl.load(sin_tab_ptr + pair, mask=rot, other=0.0)
            e2 = (even * c - odd * s).to(y_ptr.dtype.element_ty)
            o2 = (odd * c + even * s).to(y_ptr.dtype.element_ty)
            out = tl.reshape(tl.join(e2, o2), [BLOCK_N])
            pos = tl.load(pos_ptr)
            tl.store(q_ptr + offs, out, mask=mask & (offs < q_width))
            kn = offs - q_width  # k dims, then v dims
            in_k = mask & (kn >= 0) & (kn < k_width)
            k_at = (kn // HEAD_DIM) * stride_kh + pos * stride_kp + kn % HEAD_DIM
            tl.store(k_ptr + k_at, out.to(k_ptr.dtype.element_ty), mask=in_k)
            vn = kn - k_width
            in_v = mask & (vn >= 0)
            v_at = (vn // HEAD_DIM) * stride_kh + pos * stride_kp + vn % HEAD_DIM
            tl.store(v_ptr + v_at, out.to(v_ptr.dtype.element_ty), mask=in_v)
        else:
            tl.store(y_ptr + offs, out, mask=mask)
        if OUT_NORM:
            o32 = tl.where(mask, out.to(tl.float32), 0.0)
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(hg_ptr + offs, (o32 * g * _SCALE).to(hg_ptr.dtype.element_ty), mask=mask)
            add_sumsq(sout_ptr, tl.sum(o32 * o32, 0))

    @triton.jit
    def _fixed_point(part):
        """``part`` (float32 >= 0) as the (hi, lo) int64 pair of an exact cell."""
        u = part.to(tl.float64) * (2.0 ** (_HI_BITS + _SPLIT_BITS))  # exact: a power of two
        hi = (u * 2.0**-_SPLIT_BITS).to(tl.int64)  # truncation = floor (u >= 0)
        lo = (u - hi.to(tl.float64) * 2.0**_SPLIT_BITS).to(tl.int64)  # exact: below 2**40, whole
        return hi, lo

    @triton.jit
    def add_sumsq(cell_ptr, part):
        """Add one program's ``part`` (float32 >= 0) of a row's sum of squares to its cell (see norm_cells)."""
        if cell_ptr.dtype.element_ty == tl.int64:
            hi, lo = _fixed_point(part)
            tl.atomic_add(cell_ptr, hi)
            tl.atomic_add(cell_ptr + 1, lo)
        else:
            tl.atomic_add(cell_ptr, part)

    @triton.jit
    def store_sumsq(cell_ptr, part):
        """Store a whole row's sum of squares ``part`` (float32 >= 0) in its cell (one program: no zeroing needed)."""
        if cell_ptr.dtype.element_ty == tl.int64:
            hi, lo = _fixed_point(part)
            tl.store(cell_ptr, hi)
            tl.store(cell_ptr + 1, lo)
        else:
            tl.store(cell_ptr, part)

    @triton.jit
    def load_sumsq(cell_ptr):
        """A row's sum of squares from its cell, float32."""
        if cell_ptr.dtype.element_ty == tl.int64:
            hi = tl.load(cell_ptr).to(tl.float64) * 2.0**-_HI_BITS
            lo = tl.load(cell_ptr + 1).to(tl.float64) * 2.0 ** -(_HI_BITS + _SPLIT_BITS)
            return (hi + lo).to(tl.float32)
        else:
            return tl.load(cell_ptr)

    @triton.jit
    def await_previous(PDL: tl.constexpr):
        """Launched as a programmatic dependent (kernels.overlapped_launch): wait until the kernel before has
        completed and its writes are visible, then let the next kernel's programs launch. Before this a
        program may only read what no kernel writes (weights)."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _norm_prep_kernel(h_ptr, g_ptr, hg_ptr, ss_ptr, K, BLOCK: tl.constexpr, PDL: tl.constexpr):
        await_previous(PDL)
        total = tl.zeros([BLOCK], tl.float32)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            mask = offs < K
            h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(hg_ptr + offs, (h * g * _SCALE).to(hg_ptr.dtype.element_ty), mask=mask)
            total += h * h
        store_sumsq(ss_ptr, tl.sum(total, 0))
