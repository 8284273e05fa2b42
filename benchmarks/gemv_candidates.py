"""A candidate one-row GEMV kernel timed by quant_kernels_gpu.py --sweep that did not move into glmrun.

``q8_direct_gemv``: glmrun's INT8 format (codes - 128 as int8, float16 scale and zero per group) read as
int8 tiles and converted with plain casts. On an H100 it took 3.50 ms a token over ChatGLM2-6B's four layer
shapes against 2.67 ms for glmrun's word-unpacking kernel (`results/h100/kernel_sweep.json`). Each program
owns BLOCK_N output rows and walks K in BLOCK_K steps (a split of K over SPLIT_K programs adds atomically
into a float32 output). The float16 candidate of that sweep is glmrun's own ``layer_kernels.half_gemv``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


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
