"""Tiled INT4 one-row kernel settings timed against the canonical one-row kernel on ChatGLM2-6B's four shapes.

For each shape (QKV, dense, the up projection with its SwiGLU, down) an INT4 weight (group 128) is multiplied by one
float16 row with ``quant_kernels._qgemv_kernel`` on the canonical codes ("current") and with
``_q4tiled_gemv_kernel`` on the same codes in ``tile_int4``'s order, for each (weight rows a program, groups of 128
a step, warps) in VARIANTS. Each is checked against a float32 product with the dequantized weight (``rel_err``) and
timed by replaying a CUDA graph of calls rotating over weight copies that exceed the L2 four times
(``quant_kernels_gpu.graph_time``). The fourteenth session chose ``_TILED_SETTINGS`` and ``tiling_pays`` from its
H100 run of this script (`results/h100/fourteenth/tiled_gemv_call1.json`).

    PYTHONPATH=src OUT=DIR python3 benchmarks/tiled_gemv.py   # writes DIR/proto_bench.json
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quant_kernels_gpu import graph_time  # noqa: E402

from glmrun.quant import dequantize, quantize_int4  # noqa: E402
from glmrun.quant_kernels import KernelConfig, tile_int4, triton_config_for, triton_quant_matmul  # noqa: E402
from glmrun.row_fusion import RowFusion  # noqa: E402

SHAPES = {"qkv": (4096, 4608), "dense": (4096, 4096), "up": (4096, 27392), "down": (13696, 4096)}  # (K, N)
# (weight rows a program, groups of 128 a step, warps); with SwiGLU a program's rows are half gate, half up
VARIANTS = [(8, 8, 4), (8, 16, 4), (8, 8, 8), (8, 16, 8), (8, 32, 8), (16, 8, 8), (16, 16, 8), (4, 8, 4), (4, 16, 4),
            (16, 8, 4), (8, 4, 4), (4, 8, 2), (8, 16, 2)]  # fmt: skip


def time_shape(name: str, k: int, n: int) -> dict[str, Any]:
    glu = name == "up"
    fusion = RowFusion(glu=True) if glu else None
    w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
    qw = quantize_int4(w, 128)
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    ref = x.float() @ dequantize(qw).float().T
    if glu:
        ref = torch.nn.functional.silu(ref[:, : n // 2]) * ref[:, n // 2 :]
    ref = ref[0]
    tiled = tile_int4(qw.q, 128)
    nbytes = qw.q.numel() + 2 * qw.scale.numel() * 2
    copies = max(2, int(4 * 50e6 // nbytes) + 1)
    first = (qw.q, qw.scale, qw.zero, tiled)
    states = [first] + [tuple(t.clone() for t in first) for _ in range(copies - 1)]
    res: dict[str, Any] = {}

    def timed(label: str, fn: Callable[[tuple[torch.Tensor, ...]], torch.Tensor]) -> None:
        try:
            y = fn(states[0])[0].float()
            err = ((y - ref).norm() / ref.norm()).item()
            us = graph_time(lambda: [fn(states[i]) for i in range(copies)], copies, 15)
            res[label] = {"us": us, "tbps": nbytes / us / 1e6, "rel_err": err}
        except Exception as e:  # a setting that does not compile or launch is reported, not fatal
            res[label] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}

    cfg = triton_config_for(1, n, k, 128, 4)
    assert cfg is not None
    timed("current", lambda st: triton_quant_matmul(x, st[0], st[1], st[2], 4, 128, cfg, fusion=fusion))
    for r, ng, wp in VARIANTS:
        c = KernelConfig("gemv", block_n=r // 2 if glu else r, block_k=ng * 128, num_warps=wp, num_stages=1)
        timed(
            f"r{r}_g{ng}_w{wp}",
            lambda st, c=c: triton_quant_matmul(x, st[3], st[1], st[2], 4, 128, c, fusion=fusion, tiled=True),
        )
    return res


def main() -> None:
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "command": "PYTHONPATH=src OUT=DIR python3 benchmarks/tiled_gemv.py",
        "shapes": {},
    }
    torch.manual_seed(0)
    for name, (k, n) in SHAPES.items():
        res = time_shape(name, k, n)
        out["shapes"][name] = res
        brief = {
            lb: (round(v["us"], 2), round(v["tbps"], 3), f"{v['rel_err']:.1e}") if "us" in v else v
            for lb, v in res.items()
        }
        print(name, json.dumps(brief), flush=True)
    total = {}
    for label in out["shapes"]["qkv"]:
        if all("us" in out["shapes"][s].get(label, {}) for s in SHAPES):
            total[label] = sum(out["shapes"][s][label]["us"] for s in SHAPES)
    out["sum_us"] = total
    print(
        "sum of 4 shapes (us):", json.dumps({lb: round(v, 1) for lb, v in sorted(total.items(), key=lambda kv: kv[1])})
    )
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "proto_bench.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
