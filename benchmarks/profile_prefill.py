"""Where a chunked prefill's time goes (ChatGLM2-6B shape, random weights, one GPU).

    PYTHONPATH=src python3 benchmarks/profile_prefill.py OUT.json [--prompt-len 2048] [--chunks 512,2048]
        [--attention default|flash|cudnn|efficient]

For each chunk size: the prefill's wall time (median of 3 after a warm-up), then one profiled run:
GPU time per kernel family and the host time of the model's Python per chunk, so a per-chunk cost
that is not GPU work shows up as the gap between the two.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from glmrun.bench import random_model
from glmrun.cache import KVCache
from glmrun.checkpoint import PRESETS

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


@contextlib.contextmanager
def attention(name: str) -> Iterator[None]:
    if name == "default":
        yield
    else:
        with sdpa_kernel([BACKENDS[name], SDPBackend.MATH]):
            yield


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--chunks", default="512,2048")
    p.add_argument("--attention", default="default", choices=["default", *BACKENDS])
    p.add_argument("--preset", default="chatglm2-6b", help="a smaller one (tiny) checks the script on a CPU")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    dev = torch.device(args.device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    model = random_model(PRESETS[args.preset], dev, dtype)
    n = args.prompt_len
    cache = KVCache(model.config, rows=1, max_len=n, dtype=dtype, devices=model.layer_devices())
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    prompt = torch.randint(0, model.config.padded_vocab_size, (1, n), device=dev)

    def prefill(chunk: int) -> torch.Tensor:
        logits = None
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            logits = model(prompt[:, lo:hi], torch.arange(lo, hi, device=dev)[None], cache, length=hi)
        assert logits is not None
        return logits

    runs = []
    with torch.inference_mode(), attention(args.attention):
        for chunk in [int(c) for c in args.chunks.split(",")]:
            prefill(chunk)
            sync()
            times = []
            for _ in range(3):
                t = time.perf_counter()
                prefill(chunk)
                sync()
                times.append(time.perf_counter() - t)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
            with profile(activities=activities) as prof:
                prefill(chunk)
                sync()
            kernels, host = [], []
            for e in prof.key_averages():
                dev_us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
                if dev_us > 0 and str(getattr(e, "device_type", "")).endswith("CUDA"):
                    kernels.append({"name": e.key[:110], "calls": e.count, "ms": round(dev_us / 1e3, 3)})
                elif str(getattr(e, "device_type", "")).endswith("CPU"):
                    self_ms = round(e.self_cpu_time_total / 1e3, 3)
                    host.append({"name": e.key[:80], "calls": e.count, "self_ms": self_ms})
            kernels.sort(key=lambda k: -k["ms"])
            host.sort(key=lambda k: -k["self_ms"])
            run = {
                "chunk": chunk,
                "prefill_s_median": round(statistics.median(times), 4),
                "prefill_s_all": [round(t, 4) for t in times],
                "tok_s": round(n / statistics.median(times), 1),
                "kernel_ms_total": round(sum(k["ms"] for k in kernels), 2),
                "kernels": kernels[:25],
                "host_self_ms": host[:25],
            }
            runs.append(run)
            print(json.dumps({k: v for k, v in run.items() if k not in ("kernels", "host_self_ms")}))
            for k in kernels[:12]:
                print(f"  {k['ms']:9.2f} ms x{k['calls']:5d}  {k['name']}")
            for h in host[:8]:
                print(f"  host {h['self_ms']:9.2f} ms x{h['calls']:5d}  {h['name']}")
    res = {
        "card": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
        "preset": args.preset,
        "torch": torch.__version__,
        "command": " ".join(["python3", *sys.argv]),
        "prompt_len": n,
        "attention": args.attention,
        "runs": runs,
    }
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
