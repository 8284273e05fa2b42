"""One-row INT8 / INT4 GEMV variants timed against glmrun's kernel on ChatGLM2-6B's four layer shapes.

glmrun's one-row kernel (``quant_kernels._qgemv_kernel``) turns each code into a float with a shift, a
mask-and-or and a multiply-add: three instructions a code, so INT4 (two codes a byte) runs at ~1.5 TB/s
where INT8 runs at ~2.3. The variants here change how codes become numbers, and whether the next K-block
is loaded before the current one is used:

* ``MODE 0``: glmrun's scheme (code shifted to the top mantissa bits of 1.0), as a control;
* ``MODE 1``: codes masked where they already lie (bits 8..19 of a word, three shifts a word instead of
  one a code): ``(w & mask) | 1.0f`` reads as ``1 + c * 2**(p - 23)``, and ``x`` is pre-scaled by
  ``2**(23 - p)`` once per program (shared by its BLOCK_N rows);
* ``MODE 2``: half2 arithmetic in inline PTX: two codes a ``lop3`` into the mantissas of ``1024.0``
  (INT8: a ``prmt``), one ``fma`` removes the offset, two products a ``fma.f16x2``, one float32 sum a word
  (x pre-scaled so no half overflows for ``|x| < 32768``; float16 x only);
* ``PDL`` (programmatic dependent launch, Hopper): the first K-block of weights is loaded before waiting
  for the previous kernel, so consecutive kernels overlap their start and end. Loading the next K-block
  before the current block's arithmetic (software prefetch) was measured in a first run and was slower
  for every shape.

Every variant is checked against a float32 product with the dequantized weight, and timed by replaying a
CUDA graph of calls rotating over enough weight copies to exceed the L2 cache 4 times.

    cd benchmarks && PYTHONPATH=../src python gemv_variants.py --json OUT.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import time
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from quant_kernels_gpu import graph_time
from torch import Tensor

from glmrun.quant import dequantize, quantize_int4, quantize_int8
from glmrun.quant_kernels import _INT4_HALF2, triton_config_for, triton_quant_matmul  # INT4's PTX: glmrun's own

SHAPES = [(4096, 4608), (4096, 4096), (4096, 27392), (13696, 4096)]  # [in, out] of ChatGLM2-6B's linears
NUM_LAYERS = 28
GROUP = 128

_INT8_HALF2 = """
{
.reg .b32 u, t0, t1, acc, m, k1, k2;
.reg .b16 lo, hi;
.reg .f32 f0, f1;
mov.b32 m, 0x64646464;
mov.b32 k1, 0x20002000;
mov.b32 k2, 0xC880C880;
xor.b32 u, $1, 0x80808080;
prmt.b32 t0, u, m, 0x4140;
prmt.b32 t1, u, m, 0x4342;
fma.rn.f16x2 t0, t0, k1, k2;
fma.rn.f16x2 t1, t1, k1, k2;
mul.rn.f16x2 acc, t0, $2;
fma.rn.f16x2 acc, t1, $3, acc;
mov.b32 {lo, hi}, acc;
cvt.f32.f16 f0, lo;
cvt.f32.f16 f1, hi;
add.f32 $0, f0, f1;
}
"""

_INT8_HALF2_ASM = tl.constexpr(_INT8_HALF2)


@triton.jit
def _pack_half2(a, b):
    """Two float16 tensors -> int32 words holding (a, b) as a half2 (a in the low half)."""
    lo = a.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi = b.to(tl.int16, bitcast=True).to(tl.int32) << 16
    return lo | hi


@triton.jit
def _x_pair(x_ptr, kw, k_mask, i: tl.constexpr):
    """Half2 words (x[8j + i], x[8j + i + 4]) / 16 for words j = kw, and x[8j + i] + x[8j + i + 4]."""
    xa = tl.load(x_ptr + kw * 8 + i, mask=k_mask, other=0.0).to(tl.float32)
    xb = tl.load(x_ptr + kw * 8 + i + 4, mask=k_mask, other=0.0).to(tl.float32)
    return _pack_half2((xa * 0.0625).to(tl.float16), (xb * 0.0625).to(tl.float16)), xa + xb


@triton.jit
def _fixed_code(w, xi, BITS: tl.constexpr, i: tl.constexpr):
    """Code i of the words ``w`` masked at a bit p in 8..19 (three shifts a word for INT4, INT8: p = 8):
    float bits of ``1 + c * 2**(p - 23)`` and ``x * 2**(23 - p)`` (INT8: c = q + 128)."""
    one = 0x3F800000
    if BITS == 8:
        if i == 0:
            src = w << 8
        elif i == 1:
            src = w
        elif i == 2:
            src = w >> 8
        else:
            src = w >> 16
        return (src & 0xFF00) ^ 0x3F808000, xi * 32768.0
    if i == 0:
        return ((w << 8) & 0xF00) | one, xi * 32768.0
    elif i == 1:
        return ((w << 8) & 0xF000) | one, xi * 2048.0
    elif i == 2:
        return (w & 0xF00) | one, xi * 32768.0
    elif i == 3:
        return (w & 0xF000) | one, xi * 2048.0
    elif i == 4:
        return (w & 0xF0000) | one, xi * 128.0
    elif i == 5:
        return ((w >> 8) & 0xF000) | one, xi * 2048.0
    elif i == 6:
        return ((w >> 8) & 0xF0000) | one, xi * 128.0
    else:
        return ((w >> 16) & 0xF000) | one, xi * 2048.0


@triton.jit
def _block_dot(
    w,
    kw,
    k0,
    x_ptr,
    s_ptr,
    z_ptr,
    offs_n,
    n_mask,
    K,
    stride_sn,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    NG: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WORDS: tl.constexpr,
    MODE: tl.constexpr,
):
    """The K-block's contribution to BLOCK_N outputs: words ``w`` [BLOCK_N, WORDS] at word offsets ``kw``."""
    PER_WORD: tl.constexpr = 32 // BITS
    PER_GROUP: tl.constexpr = WORDS // NG
    TOP: tl.constexpr = ((1 << BITS) - 1) << (23 - BITS)  # MODE 0: the top BITS mantissa bits
    offs_g = tl.arange(0, NG)
    k_mask = kw < K // PER_WORD
    xs_w = tl.zeros([WORDS], dtype=tl.float32)  # sum of x over each word's codes
    if MODE == 2:
        if BITS == 4:
            xp0, xa0 = _x_pair(x_ptr, kw, k_mask, 0)
            xp1, xa1 = _x_pair(x_ptr, kw, k_mask, 1)
            xp2, xa2 = _x_pair(x_ptr, kw, k_mask, 2)
            xp3, xa3 = _x_pair(x_ptr, kw, k_mask, 3)
            xs_w = xa0 + xa1 + xa2 + xa3
            prod = tl.inline_asm_elementwise(
                _INT4_HALF2,
                "=r,r,r,r,r,r",
                [w, xp0[None, :], xp1[None, :], xp2[None, :], xp3[None, :]],
                dtype=tl.float32,
                is_pure=True,
                pack=1,
            )  # sum (c - 8) * x / 16 per word
            part = tl.sum(tl.reshape(prod, [BLOCK_N, NG, PER_GROUP]), 2)
            xs = tl.sum(tl.reshape(xs_w, [NG, PER_GROUP]), 1)
            cx = 16.0 * part + 8.0 * xs[None, :]
        else:
            x32 = x_ptr.to(tl.pointer_type(tl.int32))
            x01 = tl.load(x32 + kw * 2, mask=k_mask, other=0)
            x23 = tl.load(x32 + kw * 2 + 1, mask=k_mask, other=0)
            for i in tl.static_range(4):
                xs_w += tl.load(x_ptr + kw * 4 + i, mask=k_mask, other=0.0).to(tl.float32)
            prod = tl.inline_asm_elementwise(
                _INT8_HALF2_ASM, "=r,r,r,r", [w, x01[None, :], x23[None, :]], dtype=tl.float32, is_pure=True, pack=1
            )  # sum q * x / 128 per word
            part = tl.sum(tl.reshape(prod, [BLOCK_N, NG, PER_GROUP]), 2)
            xs = tl.sum(tl.reshape(xs_w, [NG, PER_GROUP]), 1)
            cx = 128.0 * part + 128.0 * xs[None, :]
    else:
        prod = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
        xsc = tl.zeros([WORDS], dtype=tl.float32)  # sum of the (scaled) x the codes multiply
        for i in tl.static_range(PER_WORD):
            xi = tl.load(x_ptr + kw * PER_WORD + i, mask=k_mask, other=0.0).to(tl.float32)
            xs_w += xi
            if MODE == 0:  # glmrun's: code to the top mantissa bits, f = 1 + c / 2**BITS
                if 23 - BITS - BITS * i >= 0:
                    moved = w << (23 - BITS - BITS * i)
                else:
                    moved = w >> (BITS * i + BITS - 23)
                if BITS == 4:
                    fbits = (moved & TOP) | 0x3F800000
                else:
                    fbits = (moved & TOP) ^ 0x3FC00000
                xq = xi
            else:  # MODE 1: code masked at bit p (8 <= p, p + BITS <= 23), f = 1 + c * 2**(p - 23)
                fbits, xq = _fixed_code(w, xi, BITS, i)
            prod += fbits.to(tl.float32, bitcast=True) * xq[None, :]
            xsc += xq
        part = tl.sum(tl.reshape(prod, [BLOCK_N, NG, PER_GROUP]), 2)
        xs = tl.sum(tl.reshape(xs_w, [NG, PER_GROUP]), 1)
        xsc_g = tl.sum(tl.reshape(xsc, [NG, PER_GROUP]), 1)
        if MODE == 0:
            cx = (16.0 if BITS == 4 else 256.0) * (part - xsc_g[None, :])
        else:
            cx = part - xsc_g[None, :]
    # cx = sum(code * x) per group, code in 0..2**BITS - 1: w = code * s + z
    g_idx = k0 // GROUP + offs_g
    s_offs = offs_n[:, None] * stride_sn + g_idx[None, :]
    s_mask = n_mask[:, None] & (g_idx * GROUP < K)[None, :]
    s = tl.load(s_ptr + s_offs, mask=s_mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + s_offs, mask=s_mask, other=0.0).to(tl.float32)
    return tl.sum(s * cx + z * xs[None, :], 1)


@triton.jit
def _vgemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    y_ptr,
    N,
    K,
    stride_wn,
    stride_sn,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    NG: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    MODE: tl.constexpr,
    PDL: tl.constexpr,
):
    # PDL: the first K-block of weights is loaded before waiting for the previous kernel (weights never
    # change), then the next kernel may start its own loads.
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_w = tl.arange(0, WORDS)
    KW = K // PER_WORD
    rows = w_ptr + offs_n[:, None] * stride_wn
    w = tl.load(rows + offs_w[None, :], mask=n_mask[:, None] & (offs_w < KW)[None, :], other=0)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    acc = _block_dot(
        w, offs_w, 0, x_ptr, s_ptr, z_ptr, offs_n, n_mask, K, stride_sn, BITS, GROUP, NG, BLOCK_N, WORDS, MODE
    )
    for k0 in range(BLOCK_K, K, BLOCK_K):
        kw = k0 // PER_WORD + offs_w
        w = tl.load(rows + kw[None, :], mask=n_mask[:, None] & (kw < KW)[None, :], other=0)
        acc += _block_dot(
            w, kw, k0, x_ptr, s_ptr, z_ptr, offs_n, n_mask, K, stride_sn, BITS, GROUP, NG, BLOCK_N, WORDS, MODE
        )
    tl.store(y_ptr + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_mask)


def vgemv(x: Tensor, q: Tensor, s: Tensor, z: Tensor, bits: int, cfg: dict[str, int]) -> Tensor:
    n = q.shape[0]
    k = x.shape[-1]
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    words = q.view(torch.int32)
    bk = cfg["bk"]
    _vgemv_kernel[(triton.cdiv(n, cfg["bn"]),)](
        x,
        words,
        s,
        z,
        y,
        n,
        k,
        words.stride(0),
        s.stride(0),
        BITS=bits,
        GROUP=GROUP,
        NG=bk // GROUP,
        BLOCK_N=cfg["bn"],
        BLOCK_K=bk,
        MODE=cfg["mode"],
        PDL=cfg["pdl"],
        num_warps=cfg["warps"],
        launch_pdl=bool(cfg["pdl"]),
    )
    return y


def graph_us(call: Any, states: list[tuple[Tensor, ...]], reps: int = 15) -> float:
    calls = max(len(states), 8)

    def loop() -> None:
        for i in range(calls):
            call(states[i % len(states)])

    loop()
    torch.cuda.synchronize()
    return graph_time(loop, calls, reps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--bits", default="4,8")
    parser.add_argument("--quick", action="store_true", help="fewer launch settings")
    parser.add_argument("--modes", default="0,1,2", help="MODE values to time")
    parser.add_argument("--pdl", action="store_true", help="also time PDL launches")
    parser.add_argument("--block-k", default="", help="K-block widths (default: 2048 for INT4, 1024,2048 for INT8)")
    parser.add_argument("--warps", default="4")
    args = parser.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    l2 = 50 * 2**20
    rows: list[dict[str, Any]] = []
    for bits in (int(b) for b in args.bits.split(",")):
        for k, n in SHAPES:
            w = torch.randn(n, k, device=dev) * 0.02
            qw = quantize_int8(w, GROUP) if bits == 8 else quantize_int4(w, GROUP)
            state = (qw.q, qw.scale, qw.zero)
            x = torch.randn(1, k, device=dev, dtype=torch.float16)
            ref = F.linear(x.float(), dequantize(qw))
            nbytes = sum(t.numel() * t.element_size() for t in state)
            copies = max(1, min(64, math.ceil(4 * l2 / nbytes)))
            states = [state] + [tuple(t.clone() for t in state) for _ in range(copies - 1)]
            base_cfg = triton_config_for(1, n, k, GROUP, bits)
            assert base_cfg is not None

            def base(st: tuple[Tensor, ...], cfg: Any = base_cfg, x: Tensor = x, bits: int = bits) -> Tensor:
                return triton_quant_matmul(x, st[0], st[1], st[2], bits, GROUP, cfg)

            err = ((base(state).float() - ref).norm() / ref.norm()).item()
            us = graph_us(base, states)
            rows.append(
                dict(
                    bits=bits,
                    k=k,
                    n=n,
                    variant="glmrun",
                    config=str(base_cfg),
                    us=us,
                    rel_err=err,
                    tb_s=nbytes / us / 1e6,
                )
            )
            print(f"int{bits} {k}x{n} glmrun {us:7.2f} us {nbytes / us / 1e6:5.2f} TB/s err {err:.2e}", flush=True)
            bks = (
                [int(b) for b in args.block_k.split(",")] if args.block_k else ((2048,) if bits == 4 else (1024, 2048))
            )
            bks = [b for b in bks if b <= 2 * k]
            bns = (8,) if args.quick else (4, 8, 16)
            modes = [int(m) for m in args.modes.split(",") if m]
            pdls = (0, 1) if args.pdl else (0,)
            warps_list = [int(w) for w in args.warps.split(",")]
            for mode, pdl, bn, warps, bk in itertools.product(modes, pdls, bns, warps_list, bks):
                if bn * bk // (32 // bits) > 8192:  # more words than registers hold
                    continue
                cfg = dict(mode=mode, pdl=pdl, bn=bn, warps=warps, bk=bk)
                label = f"m{mode}" + ("_pdl" if pdl else "")

                def call(st: tuple[Tensor, ...], cfg: dict[str, int] = cfg, x: Tensor = x, bits: int = bits) -> Tensor:
                    return vgemv(x, st[0], st[1], st[2], bits, cfg)

                try:
                    err = ((call(state).float() - ref).norm() / ref.norm()).item()
                    us = graph_us(call, states)
                except Exception as exc:  # noqa: BLE001 - a variant that fails to compile is reported
                    rows.append(dict(bits=bits, k=k, n=n, variant=label, config=cfg, error=str(exc)[:300]))
                    print(f"int{bits} {k}x{n} {label} {cfg} FAILED {str(exc)[:200]}", flush=True)
                    continue
                rows.append(
                    dict(bits=bits, k=k, n=n, variant=label, config=cfg, us=us, rel_err=err, tb_s=nbytes / us / 1e6)
                )
                print(
                    f"int{bits} {k}x{n} {label} bn={bn} w={warps} bk={bk} {us:7.2f} us "
                    f"{nbytes / us / 1e6:5.2f} TB/s err {err:.2e}",
                    flush=True,
                )
    summary = []
    for bits in sorted({r["bits"] for r in rows}):
        for variant in sorted({r["variant"] for r in rows if r["bits"] == bits}):
            best = []
            for k, n in SHAPES:
                got = [
                    r
                    for r in rows
                    if r["bits"] == bits
                    and r["variant"] == variant
                    and r["k"] == k
                    and r["n"] == n
                    and "us" in r
                    and r["rel_err"] < 0.02
                ]
                if got:
                    best.append(min(got, key=lambda r: r["us"]))
            if len(best) == len(SHAPES):
                ms = sum(r["us"] for r in best) * NUM_LAYERS / 1e3
                summary.append(
                    dict(
                        bits=bits,
                        variant=variant,
                        ms_per_token_4_linears_x28=ms,
                        best_configs=[r["config"] for r in best],
                        us=[r["us"] for r in best],
                    )
                )
                print(f"int{bits} {variant:8s} {ms:6.3f} ms/token  {[round(r['us'], 1) for r in best]}")
    meta = dict(
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        triton=triton.__version__,
        python=platform.python_version(),
        group=GROUP,
        time=time.strftime("%Y-%m-%dT%H:%M:%S"),
        command="cd benchmarks && PYTHONPATH=../src python gemv_variants.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}" if not isinstance(v, bool) else f"--{k}"
            for k, v in vars(args).items()
            if v not in (False, None)
        ),
        timing="CUDA graph replay of calls rotating over weight copies (4x the 50 MB L2); median of 15",
    )
    with open(args.json, "w") as f:
        json.dump(dict(meta=meta, summary=summary, results=rows), f, indent=1)


if __name__ == "__main__":
    main()
