"""Compile glmrun's one-row quantized kernel for sm_90 on any machine (no GPU needed) and summarise its SASS.

    PYTHONPATH=src python benchmarks/read_gemv_build.py [--src DIR] [--bits 4] [--shape down] [--dump FILE]

Prints the registers and shared memory a program takes, and for the K loop (the backward branch's body) its
instruction count, CTA barriers, loads and shuffles: what the thirteenth session read to find the INT4 loop's
16 barriers an iteration (`results/README.md`). ``--shape`` picks ChatGLM2-6B's product and the fusions the
model gives it (qkv: input norm + rotary; dense, down: residual + output norm; up: input norm + SwiGLU).
Triton's own cuobjdump (shipped in its NVIDIA backend) disassembles the cubin. ``--dump`` also writes the
PTX and TTGIR next to the SASS. ``--tiled`` reads the tiled INT4 kernel instead (``_q4tiled_gemv_kernel``, ``--groups``
groups of 128 a step; the model's settings: ``--block-n 4 --warps 4``, ``--groups 8``, 16 for down): the fourteenth
session's 0 barriers an iteration.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

SHAPES = {"qkv": (4096, 2048), "dense": (4096, 2048), "up": (4096, 1024), "down": (13696, 2048)}  # K, block_k
POINTERS = {
    "x_ptr": "*fp16", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "b_ptr": "*fp16", "r_ptr": "*fp16",
    "y_ptr": "*fp16", "sin_ptr": "*i64", "g_ptr": "*fp16", "hg_ptr": "*fp16", "sout_ptr": "*i64", "q_ptr": "*fp16",
    "k_ptr": "*fp16", "v_ptr": "*fp16", "cos_ptr": "*fp32", "sin_tab_ptr": "*fp32", "pos_ptr": "*i64",
}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--src", default="src", help="the src/ folder whose glmrun to compile")
    p.add_argument("--bits", type=int, choices=[4, 8], default=4)
    p.add_argument("--shape", choices=sorted(SHAPES), default="down")
    p.add_argument("--block-n", type=int, default=8)
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--pdl", action="store_true", help="the build launched as a programmatic dependent")
    p.add_argument("--tiled", action="store_true", help="the tiled INT4 kernel (quant_kernels.tile_int4's order)")
    p.add_argument("--groups", type=int, default=8, help="--tiled: groups of 128 a step")
    p.add_argument("--dump", default="", help="write the SASS here (and .ptx, .ttgir beside it)")
    args = p.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.path.insert(0, args.src)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import glmrun.quant_kernels as qk

    fn = qk._q4tiled_gemv_kernel if args.tiled else qk._qgemv_kernel
    k, block_k = SHAPES[args.shape]
    if args.tiled:
        block_k = 128 * args.groups
    glu, rope = args.shape == "up", args.shape == "qkv"
    out_norm = args.shape in ("dense", "down")
    const = dict(
        BITS=args.bits, HAS_ZERO=True, GROUP=128, GROUPS_PER_BLOCK=block_k // 128, BLOCK_N=args.block_n,
        BLOCK_K=block_k, SPLIT_K=1, EVEN_K=k % block_k == 0, HAS_BIAS=rope, HAS_RES=out_norm, HALF2=args.bits == 4,
        ROWS=args.block_n * (2 if glu else 1), IN_NORM=glu or rope, GLU=glu, OUT_NORM=out_norm, ROPE=rope,
        HEAD_DIM=128 if rope else 1, STAGES=1, PDL=args.pdl, NG=block_k // 128, WORDS=16, ASM=True,
    )  # fmt: skip
    names = fn.arg_names
    const = {n: v for n, v in const.items() if n in names}
    sig = {n: "constexpr" if n in const else POINTERS.get(n, "fp32" if n == "eps" else "i32") for n in names}
    aligned = [i for i, n in enumerate(names) if sig[n].startswith("*") or n in ("stride_wn", "K_WORDS", "stride_xm")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    src = ASTSource(fn, sig, {(names.index(n),): v for n, v in const.items()}, attrs)
    built = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": args.warps, "num_stages": 1})
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    cubin = Path(args.dump or "/tmp/glmrun_gemv").with_suffix(".cubin")
    cubin.write_bytes(built.asm["cubin"])
    sass = subprocess.run([str(tool), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    usage = subprocess.run([str(tool), "--dump-resource-usage", str(cubin)], capture_output=True, text=True).stdout
    if args.dump:
        Path(args.dump).write_text(sass)
        Path(args.dump + ".ptx").write_text(built.asm["ptx"])
        Path(args.dump + ".ttgir").write_text(built.asm["ttgir"])
    lines = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    back = ((a, int(t, 16)) for a, op in lines for t in re.findall(r"BRA (0x[0-9a-f]+)", op) if int(t, 16) < a)
    loop = next(back, None)  # the first backward branch: the K loop (its body from the target to the branch)
    body = [op for a, op in lines if loop is not None and loop[1] <= a <= loop[0]]

    def count(pattern: str) -> int:
        return sum(1 for op in body if re.search(pattern, op))

    report = {
        "shape": args.shape,
        "bits": args.bits,
        "resources": re.findall(r"(REG:\d+|SHARED:\d+)", usage),
        "loop_instructions": len(body),
        "loop_barriers": count(r"\bBAR\.SYNC"),
        "loop_weight_loads_128": count(r"\bLDG\.E\.128\b"),
        "loop_other_global_loads": count(r"\bLDG\.E(?!\.128\b)"),
        "loop_shuffles": count(r"\bSHFL\b"),
        "loop_shared_loads_stores": count(r"\b(LDS|STS|LDSM|STSM)\b"),
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
