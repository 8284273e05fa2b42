"""Pick the CUDA kernel for glmrun's weight-only INT8 / INT4 linear layers (ChatGLM2-6B shapes).

For each layer shape ``[in, out]`` of ChatGLM2-6B and each batch size, every candidate below is checked
against a float32 matmul with its own dequantized weight (relative error) and timed with CUDA events
next to the fp16 ``nn.Linear`` of the same shape, in the same run:

* ``fp16_linear``                 the baseline (``F.linear`` on the float weight)
* ``int8_g{G}_triton``            glmrun's fused Triton kernel, INT8 with group-wise scales
* ``int8_g{G}_dequant``           glmrun's fallback: dequantize row chunks + cuBLAS
* ``int8_perchannel_triton``      the Triton kernel with one scale per output row
* ``int8_perchannel_int8pack``    ``torch._weight_int8pack_mm`` (per-channel scales only)
* ``int4_g{G}_triton``            glmrun's fused Triton kernel, INT4 asymmetric
* ``int4_g{G}_dequant``           dequantize + cuBLAS
* ``int4_g{G}_tinygemm``          ``torch._weight_int4pack_mm`` on ``_convert_weight_to_int4pack`` (x cast to
                                  bf16 around the call when the op refuses the run dtype; the note says so)

Times: ``graph_us`` is the GPU time per call measured by replaying a CUDA graph of many calls (what a
decode step captured in a graph pays); ``eager_us`` is the same loop launched from Python (adds the
launch overhead). Both are medians over ``--reps`` repetitions, warm-up excluded. Successive calls
rotate over enough copies of the weights to exceed the L2 cache ``--l2-multiple`` times, as a decode
step that streams through 28 layers does. A candidate whose op is missing or fails is skipped with the
reason. ``--sweep`` also times a grid of Triton launch settings (to retune ``triton_config_for``).

Run (on a CUDA machine, from the repository root):

    PYTHONPATH=src python benchmarks/quant_kernels_gpu.py --json benchmarks/results/quant_kernels_h100.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from glmrun.quant import dequantize, quantize_int4, quantize_int8
from glmrun.quant_kernels import (
    KernelConfig,
    dequant_matmul,
    triton_available,
    triton_config_for,
    triton_quant_matmul,
)

# ChatGLM2-6B linear layers as [in, out]: query_key_value, dense, dense_h_to_4h, dense_4h_to_h.
SHAPES = [(4096, 4608), (4096, 4096), (4096, 27392), (13696, 4096)]
NUM_LAYERS = 28

State = tuple[Tensor, ...]


@dataclass
class Candidate:
    name: str
    prepare: Callable[[Tensor], tuple[State, Tensor]]  # float weight [out, in] -> (state, dequantized weight)
    call: Callable[[State, Tensor], Tensor]
    note: str = ""
    info: dict[str, str] = field(default_factory=dict)  # filled by prepare, reported in the row's note


def _config_label(c: KernelConfig) -> str:
    label = f"{c.kind} bm={c.block_m} bn={c.block_n} bk={c.block_k} sk={c.split_k} w={c.num_warps}"
    return label + (f" st={c.num_stages}" if c.kind == "mm" else "")


def build_candidates(
    group: int, dtype: torch.dtype, batch: int, in_features: int, out_features: int, sweep: bool
) -> list[Candidate]:
    out: list[Candidate] = []
    out.append(
        Candidate(
            "fp16_linear" if dtype == torch.float16 else f"{dtype}_linear".replace("torch.", ""),
            lambda w: ((w.to(dtype),), w.float()),
            lambda s, x: F.linear(x, s[0]),
        )
    )

    def int8(g: int) -> Callable[[Tensor], tuple[State, Tensor]]:
        def prep(w: Tensor) -> tuple[State, Tensor]:
            qw = quantize_int8(w, g)
            assert qw.zero is not None
            return (qw.q, qw.scale, qw.zero), dequantize(qw)

        return prep

    def int4(g: int) -> Callable[[Tensor], tuple[State, Tensor]]:
        def prep(w: Tensor) -> tuple[State, Tensor]:
            qw = quantize_int4(w, g)
            assert qw.zero is not None
            return (qw.q, qw.scale, qw.zero), dequantize(qw)

        return prep

    def triton_call(bits: int, g: int, cfg: KernelConfig) -> Callable[[State, Tensor], Tensor]:
        def call(s: State, x: Tensor) -> Tensor:
            return triton_quant_matmul(x, s[0], s[1], s[2], bits, g, cfg)

        return call

    def dequant_call(bits: int, g: int) -> Callable[[State, Tensor], Tensor]:
        def call(s: State, x: Tensor) -> Tensor:
            return dequant_matmul(x, s[0], s[1], s[2], bits, g)

        return call

    for bits, g, tag in ((8, group, f"g{group}"), (4, group, f"g{group}")):
        prep = int8(g) if bits == 8 else int4(g)
        name = f"int{bits}_{tag}"
        if triton_available():
            cfg = triton_config_for(batch, out_features, in_features, g, bits)
            if cfg is not None:
                out.append(Candidate(f"{name}_triton", prep, triton_call(bits, g, cfg), _config_label(cfg)))
            if sweep:
                for c in sweep_configs(batch, in_features, g, bits):
                    out.append(Candidate(f"{name}_triton*", prep, triton_call(bits, g, c), _config_label(c)))
        out.append(Candidate(f"{name}_dequant", prep, dequant_call(bits, g)))
    if sweep and batch == 1 and triton_available():
        out.extend(_candidate_kernels(group, dtype, in_features))
    out.append(Candidate("int8_perchannel_int8pack", _int8pack_prepare(in_features, dtype), _int8pack_call))
    tiny = _tinygemm(group, dtype)
    if tiny is not None:
        out.append(tiny)
    return out


def _candidate_kernels(group: int, dtype: torch.dtype, k: int) -> list[Candidate]:
    """glmrun's float16 one-row GEMV at several settings, and an INT8 GEMV with plain casts (not in glmrun)."""
    from gemv_candidates import q8_direct_gemv  # benchmarks/ is on sys.path when run as a script

    from glmrun.layer_kernels import half_gemv

    out: list[Candidate] = []
    for bn, bk, nw in itertools.product((2, 4, 8), (512, 1024), (4, 8)):

        def hcall(s: State, x: Tensor, bn: int = bn, bk: int = bk, nw: int = nw) -> Tensor:
            return half_gemv(x, s[0], None, block_n=bn, block_k=bk, num_warps=nw)

        out.append(Candidate("fp16_tgemv*", lambda w: ((w.to(dtype),), w.float()), hcall, f"bn={bn} bk={bk} w={nw}"))
    for bn, bk, sk, nw in itertools.product((4, 8), (128, 256, 512), (1, 2), (4, 8)):
        if k % bk or not (group % bk == 0 or bk % group == 0):
            continue

        def qcall(s: State, x: Tensor, bn: int = bn, bk: int = bk, sk: int = sk, nw: int = nw) -> Tensor:
            return q8_direct_gemv(x, s[0], s[1], s[2], group, bn, bk, sk, nw)

        def prep(w: Tensor) -> tuple[State, Tensor]:
            qw = quantize_int8(w, group)
            assert qw.zero is not None
            return (qw.q, qw.scale, qw.zero), dequantize(qw)

        out.append(Candidate(f"int8_g{group}_direct*", prep, qcall, f"bn={bn} bk={bk} sk={sk} w={nw}"))
    return out


def sweep_configs(batch: int, k: int, group: int, bits: int) -> list[KernelConfig]:
    configs: list[KernelConfig] = []
    if batch == 1:
        for bn, bk, sk, nw in itertools.product((4, 8), (1024, 2048), (1, 2), (4, 8)):
            configs.append(KernelConfig("gemv", block_n=bn, block_k=bk, split_k=sk, num_warps=nw))
    else:
        for bm, bn, bk, sk in itertools.product((16, 32), (32, 64, 128), (64, 128), (1, 2, 4)):
            if bm == 16 or batch > 16:
                configs.append(KernelConfig("mm", bn, bk, sk, 4, bm, 3))
    from glmrun.quant_kernels import _block_k_fits  # the sweep only keeps settings the kernel accepts

    return [c for c in configs if _block_k_fits(c.block_k, group, k, c.kind, bits)]


def _int8pack_prepare(in_features: int, dtype: torch.dtype) -> Callable[[Tensor], tuple[State, Tensor]]:
    def prep(w: Tensor) -> tuple[State, Tensor]:
        if not hasattr(torch, "_weight_int8pack_mm"):
            raise RuntimeError("torch._weight_int8pack_mm is missing in this torch")
        qw = quantize_int8(w, in_features)
        return (qw.q, qw.scale[:, 0].to(dtype).contiguous()), dequantize(qw)

    return prep


def _int8pack_call(s: State, x: Tensor) -> Tensor:
    return torch._weight_int8pack_mm(x, s[0], s[1])


def _tinygemm(group: int, dtype: torch.dtype) -> Candidate | None:
    """tinygemm wants its own tiled layout and [K/g, N, 2] (scale, zero) with w = (q - 8) * scale + zero."""
    if not (hasattr(torch, "_convert_weight_to_int4pack") and hasattr(torch, "_weight_int4pack_mm")):
        return None
    run_dtype: dict[str, torch.dtype] = {}
    info: dict[str, str] = {}

    def prep(w: Tensor) -> tuple[State, Tensor]:
        qw = quantize_int4(w, group)
        assert qw.zero is not None
        codes = torch.stack((qw.q & 15, qw.q >> 4), dim=-1).view(w.shape[0], -1)  # [N, K] 0..15
        tiny_bytes = ((codes[:, 0::2] << 4) | codes[:, 1::2]).to(torch.uint8)  # its order: even column high
        packed = torch._convert_weight_to_int4pack(tiny_bytes.contiguous(), 8)
        s = qw.scale.float()
        z = qw.zero.float() + 8 * s
        for candidate_dtype in (dtype, torch.bfloat16):
            sz = torch.stack((s, z), dim=-1).transpose(0, 1).contiguous().to(candidate_dtype)  # [K/g, N, 2]
            try:
                x = torch.zeros(1, w.shape[1], dtype=candidate_dtype, device=w.device)
                torch._weight_int4pack_mm(x, packed, group, sz)
            except RuntimeError:
                continue
            run_dtype["dtype"] = candidate_dtype
            if candidate_dtype != dtype:
                info["note"] = f"op refuses {dtype}: x cast to {candidate_dtype} and back inside the timing"
            return (packed, sz), dequantize(qw)
        raise RuntimeError(f"_weight_int4pack_mm accepts neither {dtype} nor bfloat16 here")

    def call(st: State, x: Tensor) -> Tensor:
        inner = run_dtype["dtype"]
        if inner == x.dtype:
            return torch._weight_int4pack_mm(x, st[0], group, st[1])
        return torch._weight_int4pack_mm(x.to(inner), st[0], group, st[1]).to(x.dtype)

    return Candidate(f"int4_g{group}_tinygemm", prep, call, "", info)


# -- timing ------------------------------------------------------------------------------------


def _median_per_call(run_loop: Callable[[], None], calls: int, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        run_loop()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)  # microseconds
    return statistics.median(times)


def graph_time(loop: Callable[[], None], calls: int, reps: int) -> float:
    """Microseconds per call of ``loop`` (``calls`` calls) captured once in a CUDA graph and replayed."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        loop()
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        loop()
    graph.replay()
    torch.cuda.synchronize()
    return _median_per_call(graph.replay, calls, reps)


def time_candidate(cand: Candidate, state: State, x: Tensor, copies: int, reps: int) -> tuple[float | None, float, str]:
    states = [state] + [tuple(t.clone() for t in state) for _ in range(copies - 1)]
    calls = max(copies, 8)

    def loop() -> None:
        for i in range(calls):
            cand.call(states[i % copies], x)

    for _ in range(3):  # warm-up: compiles Triton kernels, settles clocks and allocator
        loop()
    torch.cuda.synchronize()
    eager = _median_per_call(loop, calls, reps)
    note = ""
    graph_us: float | None = None
    try:
        graph_us = graph_time(loop, calls, reps)
    except Exception as exc:  # noqa: BLE001 - report and keep the eager number
        note = f"graph capture failed: {str(exc).splitlines()[0][:120]}"
    return graph_us, eager, note


def rel_err(y: Tensor, ref: Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def selftest(device: torch.device) -> int:
    """Triton kernels vs float32 on small and odd shapes, many launch settings; returns the failure count."""
    torch.manual_seed(0)
    failures = checked = 0
    worst = 0.0
    for k, n in ((13696, 4096), (256, 100), (96, 40)):
        w = torch.randn(n, k, device=device) * 0.02 + 0.01
        for bits, g in itertools.product((8, 4), (32, 128, k)):
            if k % g:
                continue
            qw = quantize_int8(w, g) if bits == 8 else quantize_int4(w, g)
            w_deq = dequantize(qw)
            for dtype, m in itertools.product((torch.float16, torch.bfloat16), (1, 3, 32)):
                x = torch.randn(m, k, device=device, dtype=dtype) + 0.3
                ref = F.linear(x.float(), w_deq)
                configs = [
                    triton_config_for(m, n, k, g, bits),
                    KernelConfig("gemv", 8, 64, 3, 4),
                    KernelConfig("gemv", 4, 2048, 1, 8),
                    KernelConfig("mm", 64, 32, 2, 4, 32, 2),
                ]
                for cfg in configs:
                    if cfg is None:
                        continue
                    try:
                        y = triton_quant_matmul(x, qw.q, qw.scale, qw.zero, bits, g, cfg)
                    except ValueError:  # the setting does not fit this shape
                        continue
                    checked += 1
                    err = rel_err(y, ref)
                    worst = max(worst, err)
                    if err > 5e-3:
                        failures += 1
                        print(f"FAIL k={k} n={n} bits={bits} group={g} {dtype} m={m} {_config_label(cfg)}: {err:.2e}")
    print(f"selftest: {checked} kernel calls checked, {failures} failures, worst relative error {worst:.2e}")
    return failures


# -- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", default=None, help="where to write the results as JSON")
    parser.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes (rows of x)")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    parser.add_argument("--reps", type=int, default=30, help="timed repetitions per candidate (median kept)")
    parser.add_argument("--l2-multiple", type=float, default=4.0, help="weight copies rotated per run, x L2 size")
    parser.add_argument("--sweep", action="store_true", help="also time a grid of Triton launch settings")
    parser.add_argument("--only", default="", help="comma-separated substrings: run only candidates matching one")
    parser.add_argument("--selftest", action="store_true", help="check the Triton kernels on odd shapes, then exit")
    parser.add_argument("--shapes", default="", help="override layer shapes as in:out,in:out (default ChatGLM2-6B)")
    args = parser.parse_args(argv)

    if args.json is None and not args.selftest:
        parser.error("--json PATH is required")
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark times GPU kernels only", file=sys.stderr)
        return 2
    if args.selftest:
        if not triton_available():
            print("selftest: Triton is not installed", file=sys.stderr)
            return 2
        return 1 if selftest(torch.device("cuda")) else 0
    dtype = getattr(torch, args.dtype)
    only = [o for o in args.only.split(",") if o]
    batches = [int(b) for b in args.batches.split(",") if b]
    custom = [(int(s.split(":")[0]), int(s.split(":")[1])) for s in args.shapes.split(",") if s]
    shapes: list[tuple[int, int]] = custom or SHAPES
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    l2_bytes = int(getattr(props, "L2_cache_size", 50 * 2**20)) or 50 * 2**20
    torch.manual_seed(0)

    meta: dict[str, Any] = {
        "gpu": props.name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "dtype": args.dtype,
        "group_size": args.group_size,
        "batches": batches,
        "reps": args.reps,
        "l2_bytes": l2_bytes,
        "l2_multiple": args.l2_multiple,
        "timing": "CUDA events; median over reps of (loop time / calls); warm-up excluded; graph_us from a CUDA "
        "graph replay of the same loop",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    print(
        f"# {props.name}, torch {torch.__version__}, CUDA {torch.version.cuda}, triton {meta['triton']}, "
        f"{args.dtype}, group {args.group_size}"
    )
    rows: list[dict[str, Any]] = []
    header = (
        f"{'in x out':>13} {'M':>3}  {'candidate':<28} {'graph_us':>9} {'eager_us':>9} {'x fp16':>7} "
        f"{'GB/s':>6} {'rel_err':>8}  note"
    )
    print(header)
    for in_f, out_f in shapes:
        w = (torch.randn(out_f, in_f, device=device) * 0.02).to(dtype)  # [out, in]
        for batch in batches:
            x = torch.randn(batch, in_f, device=device, dtype=dtype)
            ref_float = F.linear(x.float(), w.float())
            base_us: float | None = None
            for cand in build_candidates(args.group_size, dtype, batch, in_f, out_f, args.sweep):
                if only and not cand.name.endswith("_linear") and not any(o in cand.name for o in only):
                    continue
                row: dict[str, Any] = {
                    "in": in_f,
                    "out": out_f,
                    "batch": batch,
                    "candidate": cand.name,
                    "config": cand.note,
                }
                try:
                    state, w_deq = cand.prepare(w)
                    y = cand.call(state, x)
                    ref = F.linear(x.float(), w_deq.float())
                    row["rel_err"] = rel_err(y, ref)
                    row["quant_rel_err"] = rel_err(ref, ref_float)  # what quantizing costs, kernel aside
                    del w_deq
                    nbytes = sum(t.numel() * t.element_size() for t in state)
                    copies = max(1, min(64, math.ceil(args.l2_multiple * l2_bytes / nbytes)))
                    graph_us, eager_us, note = time_candidate(cand, state, x, copies, args.reps)
                    del state
                    row.update(graph_us=graph_us, eager_us=eager_us, weight_bytes=nbytes, copies=copies)
                    note = "; ".join(p for p in (cand.info.get("note", ""), note) if p)
                    if note:
                        row["note"] = note
                    best = graph_us if graph_us is not None else eager_us
                    if cand.name.endswith("_linear"):
                        base_us = best
                    row["speedup_vs_fp16"] = base_us / best if base_us else None
                    row["gb_per_s"] = nbytes / best / 1e3
                except Exception as exc:  # noqa: BLE001 - a missing op or a refused dtype skips the candidate
                    row["skipped"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                torch.cuda.empty_cache()
                rows.append(row)
                print(_format_row(row), flush=True)
    summary = _summary(rows, shapes)
    print("\n# batch-1 decode, the 4 linear layers x 28 (graph time; excludes attention and the output layer)")
    for line in summary:
        print(f"  {line['candidate']:<28} {line['ms_per_token']:8.3f} ms/token  x fp16 {line['speedup_vs_fp16']:.2f}")
    with open(args.json, "w", encoding="utf-8") as fh:
        json.dump({"meta": meta, "results": rows, "decode_batch1_summary": summary}, fh, indent=1)
    print(f"wrote {args.json}")
    return 0


def _format_row(row: dict[str, Any]) -> str:
    shape = f"{row['in']}x{row['out']}"
    if "skipped" in row:
        return f"{shape:>13} {row['batch']:>3}  {row['candidate']:<28} skipped: {row['skipped']}"

    def num(v: float | None, fmt: str) -> str:
        return format(v, fmt) if v is not None else "-"

    note = " ".join(p for p in (row.get("config", ""), row.get("note", "")) if p)
    return (
        f"{shape:>13} {row['batch']:>3}  {row['candidate']:<28} {num(row['graph_us'], '9.1f')} "
        f"{num(row['eager_us'], '9.1f')} {num(row['speedup_vs_fp16'], '7.2f')} {row['gb_per_s']:6.0f} "
        f"{row['rel_err']:8.1e}  {note}"
    )


def _summary(rows: list[dict[str, Any]], shapes: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Best graph time of each candidate name at batch 1 summed over the shapes, x NUM_LAYERS."""
    per: dict[str, dict[tuple[int, int], float]] = {}
    for r in rows:
        if r["batch"] != 1 or "skipped" in r:
            continue
        t = r["graph_us"] if r["graph_us"] is not None else r["eager_us"]
        key = (r["in"], r["out"])
        slot = per.setdefault(r["candidate"], {})
        slot[key] = min(t, slot.get(key, math.inf))
    wanted = {(s[0], s[1]) for s in shapes}
    totals: dict[str, float] = {}
    for name, times in per.items():
        if set(times) == wanted:
            totals[name] = sum(times.values()) * NUM_LAYERS / 1e3
    base = next((ms for name, ms in totals.items() if name.endswith("_linear")), None)
    out = [
        {"candidate": name, "ms_per_token": ms, "speedup_vs_fp16": base / ms if base else float("nan")}
        for name, ms in totals.items()
    ]
    return sorted(out, key=lambda d: d["ms_per_token"])


def _triton_version() -> str | None:
    try:
        import triton  # noqa: PLC0415 - optional, reported only
    except ImportError:
        return None
    return str(triton.__version__)


if __name__ == "__main__":
    raise SystemExit(main())
