"""Fused Triton kernels for a layer's float path on CUDA: one-row products, rotary + cache writes, attention.

A batch-1 decode step of ChatGLM2-6B on an H100 spent ~0.5 ms of its ~5.9 ms outside the weight
products on attention bookkeeping (`benchmarks/results/h100/profile_fp16.json`): rotary, two
advanced-index cache writes and an ``arange`` per layer, then three batched products, a softmax and
dtype casts over a key buffer padded to the CUDA graph's length bucket. Here a layer takes:

* :func:`half_gemv`: the one-row float16/bfloat16 product (faster than cuBLAS's one-row kernels on
  these shapes), with the bias and the block's residual added in its epilogue;
* :func:`rope_write`: one kernel that rotates the new query and key heads, writes the key and value
  into the cache at each token's position and returns the rotated queries (decode steps and prompts);
* :func:`decode_attention`: split-key ("flash-decoding") attention. With 2 KV heads one program per
  head would leave the GPU idle, so each (row, KV head) pair's keys are cut into slices, each slice
  gets one program (all the query heads sharing that KV head at once, a 16-row tensor-core product),
  and a second kernel merges the slices by their log-sum-exp. A row reads only its own keys
  (``position + 1`` of them, read from device memory), so a graph captured for a padded length
  bucket does no work past each row's end;
* :func:`swiglu`: the MLP's gate, for prompts (the compiled elementwise form reached ~1.4 TB/s there).

:func:`supported` / :func:`gemv_supported` say when they apply (CUDA, Triton, float16/bfloat16,
power-of-two head size); elsewhere the model's plain path runs. The reference they are tested against
(Triton's interpreter on the CPU, `tests/test_layer_kernels.py`) is that plain path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kernels import dependent_launch, launch_device
from .row_fusion import RowFusion, fusion_args
from .triton_import import tl, triton

__all__ = [
    "decode_attention",
    "elementwise_supported",
    "gemv_supported",
    "half_gemv",
    "rope_write",
    "split_plan",
    "supported",
    "swiglu",
]

_BLOCK_L = 64  # keys per inner iteration of the attention kernel
_TARGET_PROGRAMS = 256  # slices x rows x KV heads to aim for: ~2 programs per SM of an H100
_SWIGLU_BLOCK = 1024
_GEMV_BLOCK_N, _GEMV_BLOCK_K = 2, 1024  # the best single setting over ChatGLM2-6B's four shapes (sweep above)


def _half_on_gpu(t: Tensor, interpret_ok: bool) -> bool:
    """Triton present and ``t`` float16/bfloat16 on CUDA (or anywhere, under Triton's interpreter in tests)."""
    return triton is not None and t.dtype in (torch.float16, torch.bfloat16) and (t.is_cuda or interpret_ok)


def supported(q: Tensor, head_dim: int, interpret_ok: bool = False) -> bool:
    """Whether the rotary / cache-write and attention kernels serve this step (else the plain path does)."""
    return _half_on_gpu(q, interpret_ok) and head_dim >= 16 and not head_dim & (head_dim - 1)


def elementwise_supported(t: Tensor, interpret_ok: bool = False) -> bool:
    """Whether :func:`swiglu` serves ``t``: float16/bfloat16 on CUDA."""
    return _half_on_gpu(t, interpret_ok)


def gemv_supported(x: Tensor, weight: Tensor, interpret_ok: bool = False) -> bool:
    """Whether :func:`half_gemv` serves ``x @ weight.T``: one row, float16/bfloat16, on CUDA."""
    if not _half_on_gpu(x, interpret_ok) or weight.dtype != x.dtype or not (weight.is_cuda or interpret_ok):
        return False
    return x.numel() == x.shape[-1] and weight.dim() == 2 and weight.stride(1) == 1


def half_gemv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor | None = None,
    *,
    fusion: RowFusion | None = None,
    block_n: int = _GEMV_BLOCK_N,
    block_k: int = _GEMV_BLOCK_K,
    num_warps: int = 4,
) -> Tensor:
    """One row times a float16/bfloat16 matrix: ``x [..., K] @ weight[N, K].T (+ bias) (+ residual)`` -> ``[..., N]``.

    ``residual`` (``[..., N]``, one row) is added in the same kernel: a block's residual connection.
    ``fusion``: the norms and SwiGLU of :mod:`glmrun.row_fusion` in the same kernel (x is then
    ``fusion.row.scaled``; with ``glu`` the output is ``[..., N / 2]``).

    cuBLAS's one-row kernels read ChatGLM2-6B's matrices at 2.1-2.8 TB/s on an H100; this plain
    streaming kernel (2 output rows per program, 1,024-wide K steps, float32 sums, bias in the
    epilogue) reached 2.5-3.1 TB/s on the same shapes, 8% less time per token over the four
    layer matrices (`benchmarks/results/h100/kernel_sweep.json`).
    """
    if triton is None:
        raise RuntimeError("Triton is not installed")
    n, k = weight.shape
    glu = fusion is not None and fusion.glu
    if glu and n % 2:
        raise ValueError(f"SwiGLU needs an even number of weight rows, got {n}")
    n_out = n // 2 if glu else n
    if glu and block_n > 1:  # two weight rows an output: half the outputs a program keep its tile
        block_n //= 2
    x1 = x.reshape(k)
    if x1.stride(0) != 1:
        x1 = x1.contiguous()
    y = torch.empty(n_out, dtype=x.dtype, device=x.device)
    res = residual.reshape(n_out) if residual is not None else None
    if res is not None and res.stride(0) != 1:
        res = res.contiguous()
    with launch_device(x1):
        _half_gemv_kernel[(triton.cdiv(n_out, block_n),)](
            x1,
            weight,
            bias if bias is not None else weight,  # unused without a bias
            res if res is not None else weight,  # unused without a residual
            y,
            n_out,
            k,
            weight.stride(0),
            HAS_BIAS=bias is not None,
            HAS_RES=res is not None,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            ROWS=block_n * (2 if glu else 1),
            **fusion_args(fusion, weight, block_n),
            **dependent_launch(x1),
            num_warps=num_warps,
        )
    return y.view(*x.shape[:-1], n_out)


def swiglu(h: Tensor) -> Tensor:
    """``silu(gate) * up`` of ``h [..., 2F]`` (gate half first) -> ``[..., F]``, rounded as the eager form rounds."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    f = h.shape[-1] // 2
    h2 = h.reshape(-1, 2 * f)
    if h2.stride(1) != 1 or h2.stride(0) != 2 * f:
        h2 = h2.contiguous()
    rows = h2.shape[0]
    out = torch.empty((rows, f), dtype=h.dtype, device=h.device)
    with launch_device(h2):
        _swiglu_kernel[(rows, triton.cdiv(f, _SWIGLU_BLOCK))](h2, out, f, BLOCK=_SWIGLU_BLOCK, num_warps=4)
    return out.view(*h.shape[:-1], f)


def split_plan(length: int, programs_per_slice: int) -> tuple[int, int]:
    """``(slices, keys per slice)`` for attending ``length`` keys with ``programs_per_slice`` (rows x KV heads).

    Enough slices to give ~``_TARGET_PROGRAMS`` programs, each a whole number of ``_BLOCK_L`` blocks.
    """
    blocks = -(-length // _BLOCK_L)
    want = max(1, -(-_TARGET_PROGRAMS // max(1, programs_per_slice)))
    per_slice = max(1, -(-blocks // want))  # blocks per slice
    slices = -(-blocks // per_slice)
    return slices, per_slice * _BLOCK_L


def rope_write(
    qkv: Tensor,  # [N, (H + 2K) * D]: the projections of N = B * T tokens, row by row
    cos: Tensor,  # [N, R] float32, R = rotary_dim / 2
    sin: Tensor,
    positions: Tensor,  # [N] long
    k_cache: Tensor,  # [rows, K, max_len, D]
    v_cache: Tensor,
    first_row: int,
    heads: int,
    kv_heads: int,
    tokens_per_row: int = 1,
) -> Tensor:
    """Rotate q and k, store k and v at each token's position; returns the rotated queries ``[N, H, D]``.

    Token ``i`` belongs to cache row ``first_row + i // tokens_per_row`` (1 for decode steps; a prompt
    chunk of one row passes its length).
    """
    if triton is None:
        raise RuntimeError("Triton is not installed")
    B = qkv.shape[0]
    D = k_cache.shape[-1]
    R = cos.shape[-1]
    qkv = qkv.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    positions = positions.contiguous()
    q = torch.empty((B, heads, D), dtype=qkv.dtype, device=qkv.device)
    with launch_device(qkv):
        _rope_write_kernel[(B, heads + 2 * kv_heads)](
            qkv,
            cos,
            sin,
            positions,
            q,
            k_cache,
            v_cache,
            qkv.stride(0),
            cos.stride(0),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            first_row,
            tokens_per_row,
            heads,
            kv_heads,
            D=D,
            R=R,
        )
    return q


def decode_attention(
    q: Tensor,  # [B, H, D]
    k_cache: Tensor,  # [rows, K, max_len, D]
    v_cache: Tensor,
    positions: Tensor,  # [B] long: row b attends keys 0..positions[b]
    first_row: int,
    length: int,  # a bound on positions + 1 (the graph's length bucket): sizes the launch
) -> Tensor:
    """``softmax(q k^T / sqrt(D)) v`` per row over its own keys; returns ``[B, H, D]`` in q's dtype."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    B, H, D = q.shape
    K = k_cache.shape[1]
    G = H // K
    GP = max(16, triton.next_power_of_2(G))  # tensor-core products need 16 rows
    slices, per_slice = split_plan(length, B * K)
    q = q.contiguous()
    positions = positions.contiguous()
    m = torch.empty((B * K, slices, GP), dtype=torch.float32, device=q.device)
    s = torch.empty_like(m)
    acc = torch.empty((B * K, slices, GP, D), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    dependent = dependent_launch(q)
    with launch_device(q):
        _attention_slices_kernel[(B * K, slices)](
            q,
            k_cache,
            v_cache,
            positions,
            m,
            s,
            acc,
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            first_row,
            D**-0.5,
            K=K,
            G=G,
            GP=GP,
            D=D,
            PER_SLICE=per_slice,
            BLOCK_L=_BLOCK_L,
            SLICES=slices,
            **dependent,
        )
        block_s = min(64, triton.next_power_of_2(slices))
        _merge_slices_kernel[(B * K, G)](m, s, acc, out, slices, G=G, GP=GP, D=D, BLOCK_S=block_s, **dependent)
    return out


if triton is not None:
    from .row_kernels import await_previous, gemv_finish, gemv_rows

    @triton.jit
    def _half_gemv_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        r_ptr,
        y_ptr,
        N,
        K,
        stride_wn,
        sin_ptr,
        eps,
        g_ptr,
        hg_ptr,
        sout_ptr,
        HAS_BIAS: tl.constexpr,
        HAS_RES: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
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
        # BLOCK_N outputs per program (ROWS weight rows: two an output with GLU); products summed elementwise
        # in float32 and reduced once at the end. PDL: the first block's weights load before the wait.
        pid = tl.program_id(0)
        offs_n, n_mask = gemv_rows(pid, N, N, BLOCK_N, GLU)
        acc = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            w = tl.load(
                w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0
            )
            if PDL:
                if k0 == 0:
                    await_previous(PDL)
            xv = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0)
            acc += w.to(tl.float32) * xv.to(tl.float32)[None, :]
        gemv_finish(
            tl.sum(acc, 1),
            offs_n,
            n_mask,
            pid,
            N,
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
    def _swiglu_kernel(h_ptr, out_ptr, F, BLOCK: tl.constexpr):
        # Program (row, block of BLOCK columns): contiguous loads of the gate and up halves of one row.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < F
        gate = tl.load(h_ptr + row * 2 * F + cols, mask=inside, other=0.0)
        up = tl.load(h_ptr + row * 2 * F + F + cols, mask=inside, other=0.0)
        g32 = gate.to(tl.float32)
        act = (g32 / (1.0 + tl.exp(-g32))).to(gate.dtype)  # F.silu rounds to the input dtype
        tl.store(out_ptr + row * F + cols, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=inside)

    @triton.jit
    def _rope_write_kernel(
        qkv_ptr,
        cos_ptr,
        sin_ptr,
        pos_ptr,
        q_ptr,
        k_ptr,
        v_ptr,
        stride_b,
        stride_cb,
        stride_row,
        stride_head,
        stride_pos,
        first_row,
        tokens_per_row,
        H,
        K,
        D: tl.constexpr,
        R: tl.constexpr,
    ):
        # One program per (token, head) of q, k and v heads in qkv order. Pairs (2i, 2i+1) with i < R rotate
        # as the model's kernels.rotary does (float32 math, rounded to the input dtype); the rest pass.
        b = tl.program_id(0)
        h = tl.program_id(1)
        half = tl.arange(0, D // 2)
        src = qkv_ptr + b.to(tl.int64) * stride_b + h * D
        even = tl.load(src + 2 * half)
        odd = tl.load(src + 2 * half + 1)
        pos = tl.load(pos_ptr + b)
        row = (first_row + b // tokens_per_row).to(tl.int64)
        if h < H + K:
            rot = half < R
            c = tl.load(cos_ptr + b * stride_cb + half, mask=rot, other=1.0)
            s = tl.load(sin_ptr + b * stride_cb + half, mask=rot, other=0.0)
            e32, o32 = even.to(tl.float32), odd.to(tl.float32)
            even = (e32 * c - o32 * s).to(even.dtype)
            odd = (o32 * c + e32 * s).to(even.dtype)
        if h < H:
            dst = q_ptr + (b.to(tl.int64) * H + h) * D
            tl.store(dst + 2 * half, even)
            tl.store(dst + 2 * half + 1, odd)
        else:
            if h < H + K:
                dst = k_ptr + row * stride_row + (h - H) * stride_head + pos * stride_pos
            else:
                dst = v_ptr + row * stride_row + (h - H - K) * stride_head + pos * stride_pos
            tl.store(dst + 2 * half, even.to(dst.dtype.element_ty))
            tl.store(dst + 2 * half + 1, odd.to(dst.dtype.element_ty))

    @triton.jit
    def _attention_slices_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        pos_ptr,
        m_ptr,
        s_ptr,
        acc_ptr,
        stride_row,
        stride_head,
        stride_pos,
        first_row,
        scale,
        K: tl.constexpr,
        G: tl.constexpr,
        GP: tl.constexpr,
        D: tl.constexpr,
        PER_SLICE: tl.constexpr,
        BLOCK_L: tl.constexpr,
        SLICES: tl.constexpr,
        PDL: tl.constexpr,
    ):
        # Program (b * K + kh, slice): the G query heads of KV head kh over keys [start, start + PER_SLICE)
        # of row b, cut at the row's length. Writes the slice's running max, sum of exponentials and
        # unnormalised output (an empty slice writes -inf, 0, 0, which the merge weighs by 0).
        await_previous(PDL)
        bk = tl.program_id(0)
        sl = tl.program_id(1)
        b = bk // K
        kh = bk % K
        length = tl.load(pos_ptr + b) + 1
        offs_g = tl.arange(0, GP)
        offs_d = tl.arange(0, D)
        q = tl.load(q_ptr + (b * K * G + kh * G + offs_g)[:, None] * D + offs_d[None, :], mask=(offs_g < G)[:, None])
        base = (first_row + b).to(tl.int64) * stride_row + kh * stride_head
        m_i = tl.full([GP], float("-inf"), tl.float32)
        s_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        start = sl * PER_SLICE
        stop = tl.minimum(start + PER_SLICE, length)
        for l0 in range(start, stop, BLOCK_L):
            offs_l = l0 + tl.arange(0, BLOCK_L)
            valid = offs_l < stop
            kv_offs = base + offs_l[:, None] * stride_pos + offs_d[None, :]
            k = tl.load(k_ptr + kv_offs, mask=valid[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k)) * scale  # [GP, BLOCK_L] float32
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            p = tl.exp(scores - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            v = tl.load(v_ptr + kv_offs, mask=valid[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            s_i = s_i * alpha + tl.sum(p, 1)
            m_i = m_new
        out = bk * SLICES + sl
        tl.store(m_ptr + out * GP + offs_g, m_i)
        tl.store(s_ptr + out * GP + offs_g, s_i)
        tl.store(acc_ptr + (out * GP + offs_g)[:, None] * D + offs_d[None, :], acc)

    @triton.jit
    def _merge_slices_kernel(
        m_ptr,
        s_ptr,
        acc_ptr,
        out_ptr,
        slices,
        G: tl.constexpr,
        GP: tl.constexpr,
        D: tl.constexpr,
        BLOCK_S: tl.constexpr,
        PDL: tl.constexpr,
    ):
        # Program (b * K + kh, j): query head kh * G + j of row b. One pass over the slices, BLOCK_S at a time (the
        # launch makes that all of them up to 64 slices, so the max, the sums and the outputs are loaded together):
        # what came before is rescaled to the running max. Slice 0 is never empty (every row has at least its own
        # key), so the running max is finite from the first block on and empty slices weigh exp(-inf) = 0.
        await_previous(PDL)
        bk = tl.program_id(0)
        j = tl.program_id(1)
        offs_d = tl.arange(0, D)
        big = tl.full([], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_S], tl.float32)
        acc = tl.zeros([D], tl.float32)
        for s0 in range(0, slices, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            inside = offs_s < slices
            rows = (bk * slices + offs_s) * GP + j
            mv = tl.load(m_ptr + rows, mask=inside, other=float("-inf"))
            sv = tl.load(s_ptr + rows, mask=inside, other=0.0)
            part = tl.load(acc_ptr + rows[:, None] * D + offs_d[None, :], mask=inside[:, None], other=0.0)
            top = tl.maximum(big, tl.max(mv, 0))
            old = tl.exp(big - top)  # 0 before the first block (big = -inf, top finite)
            w = tl.exp(mv - top)
            total = total * old + w * sv
            acc = acc * old + tl.sum(part * w[:, None], 0)
            big = top
        out = acc / tl.sum(total, 0)
        tl.store(out_ptr + (bk * G + j) * D + offs_d, out.to(out_ptr.dtype.element_ty))
