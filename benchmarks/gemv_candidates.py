"""Candidate one-row GEMV kernels timed by quant_kernels_gpu.py before any moves into glmrun.

* ``half_gemv``: float16 ``y = x W^T`` for one row, against cuBLAS's own one-row kernels (which reached
  ~2.8 TB/s of the H100's 3.35 in `results/h100/profile_fp16.json`);
* ``q8_direct_gemv``: glmrun's INT8 format (codes - 128 as int8, float16 scale and zero per group) read as
  int8 tiles and converted with plain casts, against glmrun's word-unpacking kernel.

Each program owns BLOCK_N output rows and walks K in BLOCK_K steps (a split of K over SPLIT_K programs
adds atomically into a float32 output).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


def half_gemv(x: Tensor, w: Tensor, block_n: int, block_k: int, split_k: int, num_warps: int) -> Tensor:
    n, k = w.shape
    m = x.shape[0]
    y = (
        torch.zeros(m, n, dtype=torch.float32, device=x.device)
        if split_k > 1
        else torch.empty(m, n, dtype=x.dtype, device=x.device)
    )
    grid = (triton.cdiv(n, block_n), m, split_k)
    _half_gemv_kernel[grid](
        x,
        w,
        y,
        n,
        k,
        x.stride(0),
        w.stride(0),
        y.stride(0),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        SPLIT_K=split_k,
        num_warps=num_warps,
    )
    return y if split_k == 1 else y.to(x.dtype)


def q8_direct_gemv(
    x: Tensor,
    q: Tensor,
    scale: Tensor,
    zero: Tensor,
    group: int,
    block_n: int,
    block_k: int,
    split_k: int,
    num_warps: int,
) -> Tensor:
    n, k = q.shape
    m = x.shape[0]
    assert group % block_k == 0 or block_k % group == 0
    y = (
        torch.zeros(m, n, dtype=torch.float32, device=x.device)
        if split_k > 1
        else torch.empty(m, n, dtype=x.dtype, device=x.device)
    )
    grid = (triton.cdiv(n, block_n), m, split_k)
    _q8_direct_kernel[grid](
        x,
        q,
        scale,
        zero,
        y,
        n,
        k,
        x.stride(0),
        q.stride(0),
        scale.stride(0),
        y.stride(0),
        GROUP=group,
        GROUPS=max(1, block_k // group),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        SPLIT_K=split_k,
        num_warps=num_warps,
    )
    return y if split_k == 1 else y.to(x.dtype)


@triton.jit
def _half_gemv_kernel(
    x_ptr, w_ptr, y_ptr, N, K, sxm, swn, sym, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr
):
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        w = tl.load(w_ptr + offs_n[:, None] * swn + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        xv = tl.load(x_ptr + row * sxm + offs_k, mask=k_mask, other=0.0)
        acc += w.to(tl.float32) * xv.to(tl.float32)[None, :]
    y = tl.sum(acc, 1)
    if SPLIT_K == 1:
        tl.store(y_ptr + row * sym + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.atomic_add(y_ptr + row * sym + offs_n, y, mask=n_mask)


@triton.jit
def _q8_direct_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    z_ptr,
    y_ptr,
    N,
    K,
    sxm,
    sqn,
    ssn,
    sym,
    GROUP: tl.constexpr,
    GROUPS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    # w = (q + 128) * s + z per group: sum_k x w = s * sum(x q) + (z + 128 s) * sum(x) per group.
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_g = tl.arange(0, GROUPS)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(q_ptr + offs_n[:, None] * sqn + offs_k[None, :], mask=n_mask[:, None], other=0)
        xv = tl.load(x_ptr + row * sxm + offs_k).to(tl.float32)
        prod = w.to(tl.float32) * xv[None, :]
        part = tl.sum(tl.reshape(prod, [BLOCK_N, GROUPS, BLOCK_K // GROUPS]), 2)
        xs = tl.sum(tl.reshape(xv, [GROUPS, BLOCK_K // GROUPS]), 1)
        g_idx = k0 // GROUP + offs_g
        s_offs = offs_n[:, None] * ssn + g_idx[None, :]
        s = tl.load(s_ptr + s_offs, mask=n_mask[:, None], other=0.0).to(tl.float32)
        z = tl.load(z_ptr + s_offs, mask=n_mask[:, None], other=0.0).to(tl.float32)
        acc += tl.sum(s * part + (z + 128.0 * s) * xs[None, :], 1)
    if SPLIT_K == 1:
        tl.store(y_ptr + row * sym + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.atomic_add(y_ptr + row * sym + offs_n, acc, mask=n_mask)
