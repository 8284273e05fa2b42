"""Batch-1 decode with and without programmatic dependent launch, in one process (ChatGLM2-6B shape, random weights).

    PYTHONPATH=src python3 benchmarks/overlap_ab.py OUT.json [--quantize none,int8,int4] [--context 2048]

For each precision: one model, one prefilled cache, then graph-replayed greedy decode steps timed with
``kernels.set_overlapped_launch`` off and on in turn (a fresh graph each, rounds interleaved: off, on, off,
on), so both variants run on the same card, weights and cache. Reports each variant's step time and
tokens/s and whether the greedy tokens agree.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace

import torch

from glmrun import quant
from glmrun.bench import random_model
from glmrun.cache import KVCache
from glmrun.checkpoint import PRESETS
from glmrun.fastpath import GraphDecoder
from glmrun.kernels import set_overlapped_launch
from glmrun.quant import quantize_head_, quantize_model_
from glmrun.quant_kernels import KernelConfig

VARIANTS = {  # name: (programmatic dependent launch, one-row quantized tile: block_n, block_k; None = glmrun's)
    "off": (False, None),
    "on": (True, None),
    "on+bn8bk1024": (True, (8, 1024)),
    "on+bn4bk2048": (True, (4, 2048)),
    "on+bn4bk1024": (True, (4, 1024)),
}
_default_config = quant.triton_config_for


def set_tile(tile: tuple[int, int] | None) -> None:
    """Make the quantized one-row products use ``tile`` (block_n, block_k) instead of glmrun's choice."""

    def config_for(m: int, n: int, k: int, group_size: int, bits: int) -> KernelConfig | None:
        config = _default_config(m, n, k, group_size, bits)
        if tile is None or config is None or config.kind != "gemv":
            return config
        return replace(config, block_n=tile[0], block_k=tile[1])

    quant.triton_config_for = config_for


def decode(decoder: GraphDecoder, context: int, steps: int) -> tuple[float, list[int]]:
    """Mean ms a step over ``steps`` greedy graph steps after position ``context``, and the tokens."""
    dev = decoder.cache.k[0].device
    tok = torch.tensor([[1]], device=dev)
    tokens: list[int] = []
    for i in range(3):  # capture and warm up
        decoder.step(tok, torch.tensor([[context + i]], device=dev), context + i + 1)
    torch.cuda.synchronize()
    positions = [torch.tensor([[context + i]], device=dev) for i in range(steps)]
    t = time.perf_counter()
    for i in range(steps):
        logits = decoder.step(tok, positions[i], context + i + 1)
        tok = logits[:, -1:].argmax(-1) if logits.dim() == 3 else logits.argmax(-1, keepdim=True)
        tokens.append(tok)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t) / steps * 1e3
    return ms, [int(x) for x in torch.cat(tokens).flatten().tolist()]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--quantize", default="none,int8,int4")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS), help="names from VARIANTS, comma-separated")
    args = p.parse_args()
    dev = torch.device("cuda")
    results = []
    for q in args.quantize.split(","):
        model = random_model(PRESETS["chatglm2-6b"], dev, torch.float16)
        if q != "none":
            from glmrun.api import parse_quantize

            spec = parse_quantize(q)
            assert spec is not None
            for layer in model.layers:
                quantize_model_(layer, spec)
            quantize_head_(model, spec)
        n = args.context
        cache = KVCache(
            model.config, rows=1, max_len=n + args.steps + 8, dtype=torch.float16, devices=model.layer_devices()
        )
        with torch.inference_mode():
            for lo in range(0, n, 512):
                hi = min(lo + 512, n)
                ids = torch.randint(100, 60000, (1, hi - lo), device=dev, generator=None)
                model(ids, torch.arange(lo, hi, device=dev)[None], cache, length=hi)
            names = [v for v in args.variants.split(",") if q != "none" or VARIANTS[v][1] is None]
            runs: dict[str, list[float]] = {name: [] for name in names}
            tokens: dict[str, list[int]] = {}
            repeat: dict[str, int] = {}  # the last round's tokens agreeing with the first round's (same variant)
            for _ in range(args.rounds):
                for name in names:
                    pdl, tile = VARIANTS[name]
                    set_overlapped_launch("auto" if pdl else "off")
                    set_tile(tile)
                    ms, toks = decode(GraphDecoder(model, cache), n, args.steps)
                    runs[name].append(round(ms, 4))
                    tokens.setdefault(name, toks)
                    repeat[name] = sum(a == b for a, b in zip(tokens[name], toks, strict=True))
        set_overlapped_launch("auto")
        set_tile(None)
        best = {k: min(v) for k, v in runs.items()}
        row = {
            "quantize": q,
            "context": n,
            "steps": args.steps,
            "step_ms": runs,
            "tok_s_best": {k: round(1e3 / v, 1) for k, v in best.items()},
            "speedup_vs_off": {k: round(best["off"] / v, 4) for k, v in best.items()},
            "tokens_agreeing_across_rounds": repeat,
            "tokens_agreeing_with_off": {
                k: sum(a == b for a, b in zip(tokens["off"], t, strict=True)) for k, t in tokens.items()
            },
        }
        print(json.dumps(row), flush=True)
        results.append(row)
        del model, cache
        torch.cuda.empty_cache()
    import triton

    out = {
        "what": "graph-replayed batch-1 greedy decode, programmatic dependent launch off vs on (same process)",
        "variants": {k: {"pdl": v[0], "tile_bn_bk": v[1]} for k, v in VARIANTS.items()},
        "command": " ".join(["python3", *sys.argv]),
        "card": torch.cuda.get_device_name(dev),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "results": results,
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
