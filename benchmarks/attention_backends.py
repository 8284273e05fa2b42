"""Time torch's SDPA backends on ChatGLM2-6B's prefill attention shapes (32 query heads, 2 KV heads, d 128).

    PYTHONPATH=src python3 benchmarks/attention_backends.py OUT.json [--len 32768] [--chunk 4096]

Cases: a fresh causal prompt of ``--len`` tokens (KV heads shared with ``enable_gqa``, or expanded to 32
heads for backends without GQA), and the last ``--chunk`` queries of it against all its keys
(lower-right causal), as a chunked prefill's last chunk sees. Median of 5 timed calls after 2 warm-ups;
a backend that refuses a case is reported with its error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _cases(n: int, c: int, H: int, K: int, D: int, dev: torch.device) -> dict:  # type: ignore[type-arg]
    gen = torch.Generator(device=dev).manual_seed(n)
    q = torch.randn(1, H, n, D, device=dev, dtype=torch.float16, generator=gen)
    k = torch.randn(1, K, n, D, device=dev, dtype=torch.float16, generator=gen)
    v = torch.randn(1, K, n, D, device=dev, dtype=torch.float16, generator=gen)
    k32, v32 = k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1)
    qc = q[:, :, n - c :]
    causal_flops = 4 * H * D * n * n / 2
    chunk_flops = 4 * H * D * c * (n - c / 2)

    def reference() -> torch.Tensor:  # float32 math, lower-right causal: query i of the chunk sees keys <= n - c + i
        scores = qc.float() @ k32.float().transpose(-1, -2) * D**-0.5
        visible = torch.arange(n, device=dev)[None, :] <= torch.arange(n - c, n, device=dev)[:, None]
        return torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ v32.float()

    cases = {
        "reference": (reference, 0.0),
        "causal_gqa": (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), causal_flops),
        "causal_expanded": (lambda: F.scaled_dot_product_attention(q, k32, v32, is_causal=True), causal_flops),
        "chunk_gqa_lower_right": (
            lambda: F.scaled_dot_product_attention(qc, k, v, attn_mask=causal_lower_right(c, n), enable_gqa=True),
            chunk_flops,
        ),
        "chunk_expanded_lower_right": (
            lambda: F.scaled_dot_product_attention(qc, k32, v32, attn_mask=causal_lower_right(c, n)),
            chunk_flops,
        ),
        "chunk_sdpa_is_causal_gqa": (
            lambda: F.scaled_dot_product_attention(qc, k, v, is_causal=True, enable_gqa=True),
            chunk_flops,
        ),
        "chunk_flash_op_causal_gqa": (
            lambda: torch.ops.aten._scaled_dot_product_flash_attention(qc, k, v, 0.0, True)[0],
            chunk_flops,
        ),
        "chunk_flash_op_causal_expanded": (
            lambda: torch.ops.aten._scaled_dot_product_flash_attention(qc, k32, v32, 0.0, True)[0],
            chunk_flops,
        ),
        "expand_kv_copy": (lambda: (k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1)), 0.0),
    }
    return cases


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--len", type=int, default=32768)
    p.add_argument("--chunk", type=int, default=4096)
    args = p.parse_args()
    n, c, H, K, D = args.len, args.chunk, 32, 2, 128
    dev = torch.device("cuda")
    cases, small_cases = _cases(n, c, H, K, D, dev), _cases(2048, 512, H, K, D, dev)
    results = []
    with torch.inference_mode():
        for backend in ("default", "flash", "cudnn", "efficient"):
            for name, (fn, flops) in cases.items():
                if name == "reference" or (backend != "default" and name == "expand_kv_copy"):
                    continue
                ctx = (
                    sdpa_kernel(
                        [
                            getattr(
                                SDPBackend,
                                {
                                    "flash": "FLASH_ATTENTION",
                                    "cudnn": "CUDNN_ATTENTION",
                                    "efficient": "EFFICIENT_ATTENTION",
                                }[backend],
                            )
                        ]
                    )
                    if backend != "default"
                    else contextlib.nullcontext()
                )
                row: dict[str, object] = {"backend": backend, "case": name}
                try:
                    if name.startswith("chunk"):  # the chunk's output against float32 math, at 2,048 / 512
                        with ctx:
                            got = small_cases[name][0]()
                        row["max_err_vs_fp32_lower_right"] = round(
                            (got.float() - small_cases["reference"][0]()).abs().max().item(), 5
                        )
                    with ctx:
                        ms = timed(fn)
                    row["ms"] = round(ms, 3)
                    if flops:
                        row["tflops"] = round(flops / ms / 1e9, 1)
                except Exception as exc:  # noqa: BLE001 - a backend that refuses the case
                    row["error"] = str(exc).splitlines()[0][:200]
                results.append(row)
                print(json.dumps(row))
    out = {
        "card": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "len": n,
        "chunk": c,
        "command": " ".join(["python3", *sys.argv]),
        "results": results,
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
