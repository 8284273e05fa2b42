"""Software pipelining of glmrun's one-row INT8 / INT4 kernel: launch settings timed on ChatGLM2-6B's four layer shapes.

``quant_kernels._qgemv_kernel`` walks K in blocks; with ``num_stages`` 1 (what it did up to this script) each
program loads a block of weight words into registers and waits for them before its arithmetic, so an SM has
only the blocks of its resident programs in flight. With ``num_stages`` s > 1 the loop is software-pipelined
(``tl.range(..., num_stages=s)``): the weight loads become asynchronous copies into shared memory
(``LDGSTS`` in the sm_90 build), s - 1 blocks ahead of the arithmetic. This script times every setting of
``--block-n`` x ``--block-k`` x ``--stages`` for each shape and bit width, through ``triton_quant_matmul`` with
the fusion the model uses on that shape (QKV: input norm; dense and down: residual and output norm; the
up projection: input norm and SwiGLU; the norms' cells exact, as ``norm_cells`` makes them for float16 since
4453719: the ninth session's two sweeps ran before, with float32 cells), and checks each against the current
settings' output and the current settings' unfused output against a float32 product with the dequantized weight.

Timing as ``gemv_variants.py``: a CUDA graph of calls rotating over weight copies that exceed the L2 four
times, replayed; median of ``--reps``.

    cd benchmarks && PYTHONPATH=../src python gemv_stages.py --json OUT.json
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
from quant_kernels_gpu import graph_time
from torch import Tensor

from glmrun.quant import dequantize, quantize_int4, quantize_int8
from glmrun.quant_kernels import KernelConfig, triton_config_for, triton_quant_matmul
from glmrun.row_fusion import RowFusion, norm_cells
from glmrun.row_kernels import norm_prep

SHAPES = {"qkv": (4096, 4608), "dense": (4096, 4096), "h_to_4h": (4096, 27392), "4h_to_h": (13696, 4096)}
NUM_LAYERS = 28
DEVICE = "cuda"  # (the CPU with TRITON_INTERPRET=1 runs a dry run of the script on small shapes)
GROUP = 128


def _fusion(name: str, k: int, n: int, dev: torch.device) -> tuple[RowFusion, Tensor | None]:
    """The RowFusion the model passes on this shape (its cells as the model makes them), and the residual it adds
    (None if none)."""
    h = torch.randn(k, device=dev, dtype=torch.float16)
    g = torch.rand(k, device=dev, dtype=torch.float16) + 0.5
    cells = norm_cells(2, torch.float16, dev)
    row = norm_prep(h, g, 1e-5, cells[0])
    if name == "qkv":
        return RowFusion(row=row), None
    if name == "h_to_4h":
        return RowFusion(row=row, glu=True), None
    out_w = torch.rand(n, device=dev, dtype=torch.float16) + 0.5
    scaled = torch.empty(n, device=dev, dtype=torch.float16)
    res = torch.randn(1, n, device=dev, dtype=torch.float16)
    return RowFusion(out_weight=out_w, out_scaled=scaled, out_sumsq=cells[1]), res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--bits", default="4,8")
    ap.add_argument("--block-n", default="8,16")
    ap.add_argument("--block-k", default="512,1024,2048")
    ap.add_argument("--stages", default="1,2,3,4")
    ap.add_argument("--skip", default="", help="settings bn:bk:stages to leave out, comma-separated")
    ap.add_argument("--warps", default="4")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    torch.manual_seed(0)
    results: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    t_start = time.time()
    for bits in _ints(args.bits):
        for name in args.shapes.split(","):
            rows, entry = _sweep_shape(args, bits, name)
            results += rows
            summary.append(entry)
            print("BEST", json.dumps(entry), flush=True)
            _write(args, summary, results, t_start)
            torch.cuda.empty_cache()
    return 0


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _sweep_shape(args: argparse.Namespace, bits: int, name: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every setting timed on one shape; returns the rows and the shape's summary (current and best)."""
    dev = torch.device(DEVICE)
    k, n = SHAPES[name]
    w = torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02
    qw = quantize_int4(w, GROUP) if bits == 4 else quantize_int8(w, GROUP)
    del w
    x = torch.randn(1, k, device=dev, dtype=torch.float16)
    ref = x.float() @ dequantize(qw).float().T
    base = triton_config_for(1, n, k, GROUP, bits)
    assert base is not None and base.kind == "gemv"
    plain = triton_quant_matmul(x, qw.q, qw.scale, qw.zero, bits, GROUP, base).float()
    plain_err = ((plain - ref).norm() / ref.norm()).item()
    fusion, res = _fusion(name, k, n, dev)
    xin = fusion.row.scaled.view(1, k) if fusion.row is not None else x
    nbytes = qw.q.numel() * qw.q.element_size() + 2 * qw.scale.numel() * 2
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size if dev.type == "cuda" else nbytes
    copies = max(2, math.ceil(4 * l2 / nbytes))
    weights = [(qw.q, qw.scale, qw.zero)] + [
        (qw.q.clone(), qw.scale.clone(), qw.zero.clone() if qw.zero is not None else None) for _ in range(copies - 1)
    ]

    def run_all(cfg: KernelConfig) -> list[Tensor]:
        return [triton_quant_matmul(xin, *wt, bits, GROUP, cfg, None, res, fusion) for wt in weights]

    want = run_all(base)[0].float()
    rows: list[dict[str, Any]] = []
    grid = itertools.product(_ints(args.block_n), _ints(args.block_k), _ints(args.stages), _ints(args.warps))
    for bn, bk, st, nw in grid:
        if f"{bn}:{bk}:{st}" in args.skip.split(","):
            continue
        cfg = KernelConfig("gemv", block_n=bn, block_k=bk, split_k=1, num_warps=nw, num_stages=st)
        entry: dict[str, Any] = {"bits": bits, "shape": name, "k": k, "n": n, "bn": bn, "bk": bk, "stages": st}
        entry["warps"] = nw
        try:
            got = run_all(cfg)[0].float()
            entry["rel_err_vs_current"] = ((got - want).norm() / want.norm()).item()
            entry["us"] = graph_time(lambda cfg=cfg: run_all(cfg), copies, args.reps)
            entry["tb_s"] = nbytes / entry["us"] / 1e6
        except Exception as e:  # noqa: BLE001 - a setting that does not compile or run is reported
            entry["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(entry)
        print(json.dumps(entry), flush=True)
    ok = [r for r in rows if "us" in r and r["rel_err_vs_current"] < 1e-2]
    best = min(ok, key=lambda r: r["us"])
    mine = (base.block_n, base.block_k, base.num_stages, base.num_warps)
    cur = next((r for r in ok if (r["bn"], r["bk"], r["stages"], r["warps"]) == mine), None)
    summary = {"bits": bits, "shape": name, "bytes": nbytes, "plain_rel_err_vs_float32": plain_err}
    return rows, {**summary, "current": cur, "best": best}


def _write(args: argparse.Namespace, summary: list[dict[str, Any]], results: list[dict[str, Any]], t0: float) -> None:
    """The JSON so far (written after every shape, so a run cut short keeps what it timed)."""
    per_token = {}
    for bits in sorted({s["bits"] for s in summary}):
        mine = [s for s in summary if s["bits"] == bits]
        per_token[str(bits)] = {
            "shapes": [s["shape"] for s in mine],
            "current_ms_x28": sum(s["current"]["us"] for s in mine if s["current"]) * NUM_LAYERS / 1e3,
            "best_ms_x28": sum(s["best"]["us"] for s in mine) * NUM_LAYERS / 1e3,
        }
    meta = {
        "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": __import__("triton").__version__,
        "python": platform.python_version(),
        "group": GROUP,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "seconds": round(time.time() - t0, 1),
        "command": "cd benchmarks && PYTHONPATH=../src python gemv_stages.py "
        + " ".join(f"--{a.replace('_', '-')} {v}" for a, v in vars(args).items()),
        "timing": "CUDA graph replay of calls rotating over weight copies (4x the L2); median of --reps",
    }
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "per_token": per_token, "summary": summary, "results": results}, f, indent=1)
    print(json.dumps(per_token), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
