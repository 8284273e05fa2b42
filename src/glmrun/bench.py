"""``glmrun bench``: time to first token, prefill and decode speed, peak memory per device.

Random weights of a preset's shape (speed does not depend on weight values) or a real checkpoint.
A fixed number of tokens is generated (greedy, EOS ignored) so runs are comparable. Warm-up runs
(CUDA-graph capture, cuBLAS handles, ``torch.compile``) are excluded and reported separately.
``--baseline hf`` times transformers' ``GlmForCausalLM`` on the same weights in the same process.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .cache import KVCache
from .config import ModelConfig
from .cpu_decode import CpuDecoder, cpu_decoder_supported
from .errors import InvalidArgumentError
from .fastpath import GraphDecoder, graphs_supported
from .model import ChatGLMForCausalLM

__all__ = ["add_parser", "run", "random_model", "time_glmrun", "bench_prompts", "RunStats"]

GB = 1e9


@dataclass
class RunStats:
    ttft_s: float
    prefill_tok_s: float
    decode_tok_s: float  # aggregate over the batch
    decode_step_ms: float
    peak_allocated_gb: dict[str, float] = field(default_factory=dict)
    peak_reserved_gb: dict[str, float] = field(default_factory=dict)
    warmup_s: float = 0.0
    tokens: list[int] = field(default_factory=list)  # row 0's greedy tokens (to compare paths)
    decoder: str = "plain"  # what ran the decode steps: "cuda_graphs", "cpu_decoder" or "plain"
    int4_products: int = 0  # layer products the CPU decoder took from int4 packs (a GGUF file's 4-bit blocks)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_model(config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> ChatGLMForCausalLM:
    """A model of ``config``'s shape with random weights made directly on ``device`` (no files)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    model = ChatGLMForCausalLM(config, device=device, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.fill_(1.0)
            elif p.dim() == 1:
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]), generator=gen)
    return model.eval()


def bench_prompts(batch: int, prompt_len: int, seed: int = 0, vocab: int = 60000) -> torch.Tensor:
    """The random prompt ids every timed stack gets (the same for glmrun and the baseline)."""
    high = min(60000, vocab)
    return torch.randint(100, high, (batch, prompt_len), generator=torch.Generator().manual_seed(seed))


def _peaks(devices: list[torch.device]) -> tuple[dict[str, float], dict[str, float]]:
    alloc, reserved = {}, {}
    for dev in devices:
        if dev.type == "cuda":
            alloc[str(dev)] = round(torch.cuda.max_memory_allocated(dev) / GB, 3)
            reserved[str(dev)] = round(torch.cuda.max_memory_reserved(dev) / GB, 3)
    return alloc, reserved


def time_glmrun(
    model: ChatGLMForCausalLM,
    *,
    prompt_len: int,
    gen_len: int,
    batch: int,
    prefill_chunk: int,
    graphs: bool = True,
    warmup: bool = True,
    seed: int = 0,
) -> RunStats:
    """Prefill ``batch`` prompts of ``prompt_len`` random tokens, then decode ``gen_len`` greedy tokens."""
    devices = sorted(set(model.layer_devices()) | {model.output_device()}, key=str)
    first = model.transformer.embedding.word_embeddings.weight.device
    last = model.output_device()
    prompts = bench_prompts(batch, prompt_len, seed, model.config.padded_vocab_size)
    max_len = prompt_len + gen_len
    cache = KVCache(
        model.config,
        rows=batch,
        max_len=max_len,
        dtype=model.transformer.embedding.word_embeddings.weight.dtype,
        devices=model.layer_devices(),
    )
    decoder: GraphDecoder | CpuDecoder | None = None
    if graphs and graphs_supported(model):
        decoder = GraphDecoder(model, cache)
    elif graphs and batch == 1 and cache.dtype == torch.float32 and cpu_decoder_supported(model):
        decoder = CpuDecoder(model, cache)  # what the engine decodes one CPU session with

    def one_run() -> tuple[float, float, float, list[int]]:
        t0 = time.perf_counter()
        last_logits = []
        with torch.inference_mode():
            for row in range(batch):
                logits = None
                for lo in range(0, prompt_len, prefill_chunk):
                    hi = min(lo + prefill_chunk, prompt_len)
                    tokens = prompts[row : row + 1, lo:hi].to(first)
                    positions = torch.arange(lo, hi, device=first)[None]
                    logits = model(tokens, positions, cache, length=hi, first_row=row)
                assert logits is not None
                last_logits.append(logits)
            nxt = torch.cat(last_logits).argmax(-1, keepdim=True)  # [batch, 1]
            out = [int(nxt[0, 0])]  # the first token is on the host: TTFT
            t_first = time.perf_counter()
            t_prefill = t_first - t0
            for step in range(gen_len - 1):
                pos = prompt_len + step
                positions = torch.full((batch, 1), pos, device=first, dtype=torch.long)
                tokens = nxt.to(first)
                if decoder is not None:
                    logits = decoder.step(tokens, positions, pos + 1)
                else:
                    logits = model(tokens, positions, cache, length=pos + 1)
                nxt = logits.argmax(-1, keepdim=True)
                out.append(int(nxt[0, 0]))  # a host sync per token, as a streaming server has
            _sync(last)
            t_end = time.perf_counter()
        return t_prefill, t_first - t0, t_end - t_first, out

    warm = 0.0
    if warmup:
        t = time.perf_counter()
        one_run()
        warm = time.perf_counter() - t
    for dev in devices:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
    t_prefill, ttft, t_decode, out = one_run()
    alloc, reserved = _peaks(devices)
    steps = gen_len - 1
    return RunStats(
        ttft_s=round(ttft, 4),
        prefill_tok_s=round(batch * prompt_len / t_prefill, 1),
        decode_tok_s=round(batch * steps / t_decode, 2) if steps else 0.0,
        decode_step_ms=round(1000 * t_decode / steps, 3) if steps else 0.0,
        peak_allocated_gb=alloc,
        peak_reserved_gb=reserved,
        warmup_s=round(warm, 2),
        tokens=out,
        decoder="plain" if decoder is None else "cuda_graphs" if isinstance(decoder, GraphDecoder) else "cpu_decoder",
        int4_products=sum(len(layer.int4_matrices) for layer in decoder.layers)
        if isinstance(decoder, CpuDecoder)
        else 0,
    )


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "bench",
        help="measure TTFT, prefill/decode speed and peak GPU memory",
        description="Benchmark glmrun on a checkpoint or on random weights of a preset's shape.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="a ChatGLM2 folder or .gguf file")
    src.add_argument("--preset", default=None, help="random weights of this shape (e.g. chatglm2-6b)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"])
    p.add_argument("--quantize", default=None, choices=["int8", "int4"])
    p.add_argument("--prompt-len", type=_positive, default=512)
    p.add_argument("--gen-len", type=_positive, default=128)
    p.add_argument("--batch", type=_positive, default=1)
    p.add_argument(
        "--prefill-chunk",
        type=_positive,
        default=2048,
        help="prompt tokens per forward (default 2048); larger is faster where memory allows: a 32K prompt "
        "in one piece (32768) took 1.06 s on an H100 against 1.40 s in chunks of 2048, at 17.8 GB instead of 13.8",
    )
    p.add_argument(
        "--no-graphs", action="store_true", help="disable CUDA graphs and the CPU decoder (plain decode path)"
    )
    p.add_argument(
        "--baseline",
        choices=["hf", "hf-prefill"],
        default=None,
        help="also time transformers' GlmForCausalLM on the same weights: hf = prefill, eager and static-cache "
        "compiled generate(); hf-prefill = prefill only",
    )
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    p.set_defaults(func=run)


def _environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        env["card"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["gpus"] = torch.cuda.device_count()
    else:
        env["card"] = "cpu"
        env["threads"] = torch.get_num_threads()
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    return env


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _command(args: argparse.Namespace) -> str:
    """The command that repeats this run, every setting spelled out (defaults included)."""
    parts = ["glmrun bench"]
    for flag in ("model", "preset", "device", "dtype", "quantize", "prompt_len", "gen_len", "batch", "prefill_chunk"):
        value = getattr(args, flag)
        if value is not None:
            parts.append(f"--{flag.replace('_', '-')} {value}")
    if args.no_graphs:
        parts.append("--no-graphs")
    if args.baseline:
        parts.append(f"--baseline {args.baseline}")
    if args.json:
        parts.append(f"--json {args.json}")
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    from .api import parse_quantize
    from .cpu_linear import half_weights_for, half_weights_model_
    from .loader import default_group_size, load_model, parse_device, parse_dtype, resolve_checkpoint
    from .quant import fitting_group_size

    device = parse_device(args.device)
    if args.preset:
        from .checkpoint import PRESETS

        if args.preset not in PRESETS:
            raise InvalidArgumentError(f"unknown --preset {args.preset!r}; choose one of {', '.join(sorted(PRESETS))}")
        config = PRESETS[args.preset]
        quant = parse_quantize(args.quantize, group_size=fitting_group_size(config))
        dtype = parse_dtype(args.dtype, device, config)
        cpu_half = half_weights_for(device, dtype)
        model = random_model(config, device, torch.float32 if cpu_half else dtype)
        if cpu_half:  # float16 on the CPU: float16 matrices, float32 arithmetic (as glmrun.load does)
            half_weights_model_(model)
        if quant is not None:
            from .quant import quantize_head_, quantize_model_

            for layer in model.layers:
                quantize_model_(layer, quant)  # (float16 INT4 layers on CUDA come out tiled, as glmrun.load's)
            quantize_head_(model, quant)
        source = f"preset {args.preset} (random weights)"
    else:
        ckpt = resolve_checkpoint(args.model)
        quant = parse_quantize(args.quantize, group_size=default_group_size(ckpt))
        model, _ = load_model(ckpt, dtype=args.dtype, device=device, quantize=quant, progress=False)
        config, dtype, source = model.config, model.compute_dtype, str(ckpt.path)
    stats = time_glmrun(
        model,
        prompt_len=args.prompt_len,
        gen_len=args.gen_len,
        batch=args.batch,
        prefill_chunk=args.prefill_chunk,
        graphs=not args.no_graphs,
    )
    result: dict[str, Any] = {
        "command": _command(args),
        "environment": _environment(device),
        "model": source,
        "dtype": str(dtype).removeprefix("torch."),
        "quantize": quant.name if quant else None,
        "prompt_len": args.prompt_len,
        "gen_len": args.gen_len,
        "batch": args.batch,
        "prefill_chunk": args.prefill_chunk,
        "cuda_graphs": stats.decoder == "cuda_graphs",
        "cpu_decoder": stats.decoder == "cpu_decoder",
        "cpu_int4_products": stats.int4_products,
        "glmrun": {k: v for k, v in asdict(stats).items() if k not in ("tokens", "decoder", "int4_products")},
        "greedy_tokens": stats.tokens[:64],  # row 0: to check that other paths (no graphs, 2 GPUs) agree
    }
    if args.baseline:
        from .bench_hf import time_transformers

        result["baseline_hf"] = time_transformers(
            model,
            stats,
            prompt_len=args.prompt_len,
            gen_len=args.gen_len,
            batch=args.batch,
            generate=args.baseline == "hf",
        )
    print(_table(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return 0


def _table(result: dict[str, Any]) -> str:
    g = result["glmrun"]
    env = result["environment"]
    lines = [
        f"{result['model']} on {env['card']} (torch {env['torch']}), {result['dtype']}"
        f"{', ' + result['quantize'] if result['quantize'] else ''}, prompt {result['prompt_len']}, "
        f"gen {result['gen_len']}, batch {result['batch']}",
        f"  glmrun: TTFT {g['ttft_s'] * 1000:.1f} ms, prefill {g['prefill_tok_s']:.0f} tok/s, "
        f"decode {g['decode_tok_s']:.1f} tok/s, peak allocated {g['peak_allocated_gb']} GB "
        f"(reserved {g['peak_reserved_gb']} GB), warm-up {g['warmup_s']} s",
    ]
    for name, b in result.get("baseline_hf", {}).items():
        if isinstance(b, dict) and "decode_tok_s" in b:
            prefill = f", prefill {b['prefill_s']:.3f} s" if "prefill_s" in b else ""
            lines.append(
                f"  transformers {name}: decode {b['decode_tok_s']:.1f} tok/s{prefill}"
                f", warm-up {b.get('warmup_s', 0)} s, peak {b.get('peak_allocated_gb')} GB"
            )
    return "\n".join(lines)
