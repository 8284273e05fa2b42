"""Where a batch-1 decode step's GPU time goes (ChatGLM2-6B shape, random weights, one GPU).

    PYTHONPATH=src python3 benchmarks/profile_decode.py OUT.json [--quantize int8|int4] [--context 1024]

Prefills ``--context`` tokens, then profiles 32 eager decode steps with torch.profiler (kernels are the
same ones the CUDA graph replays) and times 64 graph-replayed steps. Reports each kernel family's GPU time
per step and, for the weight-streaming kernels, the bandwidth it reached, next to the graph step time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from glmrun.bench import random_model
from glmrun.cache import KVCache
from glmrun.checkpoint import PRESETS
from glmrun.fastpath import GraphDecoder
from glmrun.quant import quantize_head_, quantize_model_


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None)
    p.add_argument("--context", type=int, default=1024)
    args = p.parse_args()
    dev = torch.device("cuda")
    model = random_model(PRESETS["chatglm2-6b"], dev, torch.float16)
    if args.quantize:
        from glmrun.api import parse_quantize

        spec = parse_quantize(args.quantize)
        assert spec is not None
        for layer in model.layers:
            quantize_model_(layer, spec)
        quantize_head_(model, spec)
    weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    emb = model.transformer.embedding.word_embeddings.weight
    streamed = weight_bytes - emb.numel() * emb.element_size()  # the embedding is gathered, not streamed
    n = args.context
    cache = KVCache(model.config, rows=1, max_len=n + 128, dtype=torch.float16, devices=model.layer_devices())
    steps_eager, steps_graph = 32, 64
    with torch.inference_mode():
        model(torch.randint(0, 60000, (1, n), device=dev), torch.arange(n, device=dev)[None], cache, length=n)
        tok = torch.tensor([[1]], device=dev)

        def eager(i: int) -> torch.Tensor:
            return model(tok, torch.tensor([[n + i]], device=dev), cache, length=n + i + 1)

        for i in range(3):
            eager(i)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(steps_eager):
                eager(i)
            torch.cuda.synchronize()
        decoder = GraphDecoder(model, cache)
        for i in range(3):
            decoder.step(tok, torch.tensor([[n + i]], device=dev), n + i + 1)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(steps_graph):
            decoder.step(tok, torch.tensor([[n + i]], device=dev), n + i + 1)
        torch.cuda.synchronize()
        graph_ms = (time.perf_counter() - t) / steps_graph * 1e3
    kernels = []
    for e in prof.key_averages():  # kernels only (CPU-side ops would count their kernels twice)
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if us > 0 and str(getattr(e, "device_type", "")).endswith("CUDA"):
            per_step = {"calls_per_step": e.count / steps_eager, "us_per_step": us / steps_eager}
            kernels.append({"name": e.key[:120], **per_step})
    kernels.sort(key=lambda k: -k["us_per_step"])
    gpu_ms = sum(k["us_per_step"] for k in kernels) / 1e3
    res = {
        "card": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "command": " ".join(["python3", *sys.argv]),
        "quantize": args.quantize,
        "context": n,
        "streamed_weight_gb": round(streamed / 1e9, 3),
        "graph_step_ms": round(graph_ms, 3),
        "graph_tok_s": round(1e3 / graph_ms, 1),
        "kernel_ms_per_step": round(gpu_ms, 3),
        "weights_at_kernel_time_tb_s": round(streamed / (gpu_ms / 1e3) / 1e12, 2),
        "kernels": [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in x.items()} for x in kernels[:30]],
    }
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps({k: v for k, v in res.items() if k != "kernels"}))
    for k in kernels[:15]:
        print(f"{k['us_per_step']:9.1f} us  x{k['calls_per_step']:5.1f}  {k['name'][:100]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
