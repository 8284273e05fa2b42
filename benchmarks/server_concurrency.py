"""Aggregate throughput and time to first token of ``glmrun serve`` under concurrent streaming clients.

Starts the server in this process on 127.0.0.1 (any --model / --device / --dtype / --quantize that
``glmrun`` takes), or measures one already running (--url). For each concurrency level C, C clients
each stream one /v1/completions request at the same moment: a prompt of exactly --prompt-tokens
tokens (different for every client) and greedy decoding of --max-tokens tokens. Reported per level:
aggregate generated tokens per second over the level's wall time, aggregate decode tokens per
second, client-side TTFT and latency percentiles. A short warm-up round per level runs first and is not reported;
the 1-client level is the baseline the others are compared with, in the same run.

    python benchmarks/server_concurrency.py --concurrency 1,8,32 --out benchmarks/results/server_cpu_smollm2.json
    glmrun make-checkpoint --preset chatglm2-6b --out /tmp/glm6b
    python benchmarks/server_concurrency.py --model /tmp/glm6b --device cuda --dtype float16 \\
        --concurrency 1,8,64 --max-tokens 128 --out benchmarks/results/server_h100_chatglm2_6b.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import multiprocessing
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx


@dataclass
class Reply:
    ttft: float  # seconds from sending the request to the first generated text
    latency: float  # seconds from sending to the end of the stream
    first_token_at: float  # monotonic clock
    end_at: float
    completion_tokens: int
    error: str | None = None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def stream_one(http: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str]) -> Reply:
    t0 = time.monotonic()
    first = None
    tokens = 0
    try:
        async with http.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                return Reply(0, time.monotonic() - t0, t0, time.monotonic(), 0, f"HTTP {r.status_code}: {text[:200]}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return Reply(0, time.monotonic() - t0, t0, time.monotonic(), 0, str(event["error"]))
                if first is None and event.get("choices") and event["choices"][0].get("text"):
                    first = time.monotonic()
                if event.get("usage"):
                    tokens = int(event["usage"]["completion_tokens"])
    except httpx.HTTPError as exc:
        return Reply(0, time.monotonic() - t0, t0, time.monotonic(), 0, f"{type(exc).__name__}: {exc}")
    end = time.monotonic()
    first = first if first is not None else end
    return Reply(first - t0, end - t0, first, end, tokens)


async def run_level(
    url: str, model: str, prompts: list[list[int]], max_tokens: int, headers: dict[str, str]
) -> tuple[float, list[Reply]]:
    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600, connect=30), limits=limits) as http:
        bodies = [
            {
                "model": model,
                "prompt": p,
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            for p in prompts
        ]
        t0 = time.monotonic()
        replies = await asyncio.gather(*(stream_one(http, url, b, headers) for b in bodies))
        return time.monotonic() - t0, list(replies)


def client_round(url: str, model: str, prompts: list[list[int]], max_tokens: int, headers: dict[str, str]) -> Any:
    """One round of clients, run in a separate process so their work does not compete with the server's."""
    return asyncio.run(run_level(url, model, prompts, max_tokens, headers))


def summarize(concurrency: int, wall: float, replies: list[Reply]) -> dict[str, Any]:
    ok = [r for r in replies if r.error is None]
    tokens = sum(r.completion_tokens for r in ok)
    decode_tokens = sum(max(0, r.completion_tokens - 1) for r in ok)
    decode_window = (max(r.end_at for r in ok) - min(r.first_token_at for r in ok)) if ok else 0.0
    per_stream = [
        (r.completion_tokens - 1) / (r.latency - r.ttft) for r in ok if r.completion_tokens > 1 and r.latency > r.ttft
    ]
    return {
        "concurrency": concurrency,
        "requests": len(replies),
        "errors": [r.error for r in replies if r.error is not None],
        "completion_tokens": tokens,
        "wall_s": round(wall, 3),
        "aggregate_tokens_per_s": round(tokens / wall, 2) if wall > 0 else 0.0,
        "aggregate_decode_tokens_per_s": round(decode_tokens / decode_window, 2) if decode_window > 0 else 0.0,
        "per_stream_decode_tokens_per_s_mean": round(statistics.fmean(per_stream), 2) if per_stream else 0.0,
        "ttft_p50_s": round(percentile([r.ttft for r in ok], 0.5), 4),
        "ttft_p99_s": round(percentile([r.ttft for r in ok], 0.99), 4),
        "latency_p50_s": round(percentile([r.latency for r in ok], 0.5), 4),
        "latency_p99_s": round(percentile([r.latency for r in ok], 0.99), 4),
    }


def make_prompts(tokenizer: Any, count: int, length: int, offset: int = 0) -> list[list[int]]:
    """``count`` different prompts of exactly ``length`` tokens (plain story text, no chat template)."""
    prompts = []
    for i in range(offset, offset + count):
        text = f"Story number {i}. Once upon a time, in a town by the sea, there lived a curious child who " * 8
        ids = tokenizer.encode(text, add_special_tokens=True)
        while len(ids) < length:
            ids = ids + ids
        prompts.append(ids[:length])
    return prompts


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    info["cpu_cores"] = os.cpu_count()
    with contextlib.suppress(OSError):
        info["load_average_1_5_15_at_start"] = [round(x, 2) for x in os.getloadavg()]
    info["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    return info


def load_tokenizer(model: str | None) -> Any:
    from glmrun.chat_format import detect_chatglm_format
    from glmrun.loader import resolve_checkpoint
    from glmrun.tokenizer import ChatGLMTokenizer, GGUFTokenizer

    ckpt = resolve_checkpoint(model)
    if ckpt.kind == "gguf":
        return GGUFTokenizer.from_file(ckpt.path)
    return ChatGLMTokenizer.from_file(ckpt.path, chat_format=detect_chatglm_format(ckpt.path))


def describe_local_model(model: Any, quantize: str | None) -> dict[str, Any]:
    import torch

    weight = model.engine.model.transformer.embedding.word_embeddings.weight
    cfg = model.config
    out: dict[str, Any] = {
        "device": str(weight.device),
        "dtype": str(weight.dtype).removeprefix("torch."),
        "quantization": quantize,
        "model_shape": {
            "family": cfg.family,
            "layers": cfg.num_layers,
            "hidden": cfg.hidden_size,
            "heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_kv_heads,
            "vocab": cfg.padded_vocab_size,
        },
    }
    if weight.device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(weight.device)
    return out


def git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False)
        return out.stdout.strip() or None
    return None


@contextlib.contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server failed to start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(60)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from glmrun.cli import add_model_args

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_model_args(p)
    p.add_argument("--url", default=None, help="measure a running server instead of starting one")
    p.add_argument("--api-key", default=os.environ.get("GLMRUN_API_KEY"), help="key of the server at --url")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts (default: 1,8,32)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="tokens in every prompt (default: 32)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (default: 64)")
    p.add_argument("--max-batch", type=int, default=None, help="server batch rows (default: the largest level)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=3, help="rounds per level, interleaved; the median is reported")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if not levels or min(levels) < 1:
        print("--concurrency needs positive counts, e.g. 1,8,32", file=sys.stderr)
        return 2
    import torch

    from glmrun.cli import load_from_args
    from glmrun.server import ServerSettings, create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "benchmark": "server_concurrency",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable.rsplit("/", 1)[-1], *sys.argv],
        "git_commit": git_commit(),
        "machine": machine_info(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens,
        "sampling": "greedy",
        "endpoint": "/v1/completions (streamed)",
        "definitions": {
            "aggregate_tokens_per_s": "generated tokens of all clients / wall time of the level (prefill included)",
            "aggregate_decode_tokens_per_s": "tokens after each first one / (last stream end - first first-token)",
            "ttft": "client side: request sent -> first generated text received",
        },
    }
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    max_batch = args.max_batch or max(levels)
    with contextlib.ExitStack() as stack:
        if args.url:  # someone else's server: only the tokenizer is loaded here, to make exact-length prompts
            url = args.url.rstrip("/")
            model_id = httpx.get(f"{url}/v1/models", headers=headers, timeout=60).json()["data"][0]["id"]
            tokenizer = load_tokenizer(args.model)
        else:
            model = stack.enter_context(load_from_args(args))
            settings = ServerSettings(
                max_batch=max_batch,
                max_queue=max(64, max(levels)),
                max_context=args.prompt_tokens + args.max_tokens + 8,
                ui=False,
            )
            url = stack.enter_context(serve_in_thread(create_app(model, settings)))
            model_id = model.model_id
            tokenizer = model.tokenizer
            report["server"] = {"max_batch": settings.max_batch, "max_context": settings.max_context}
            report.update(describe_local_model(model, args.quantize))
        report["model"] = model_id

        # The clients run in a process of their own (as real clients would), not in the server's.
        clients = stack.enter_context(ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")))

        def one_round(prompts: list[list[int]], max_tokens: int) -> tuple[float, list[Reply]]:
            return clients.submit(client_round, url, model_id, prompts, max_tokens, headers).result()

        # Warm-up (not reported): a short round at every level, so that one-time costs (CUDA-graph
        # captures for each padded batch size, allocator growth) are not in the timed rounds.
        for k, c in enumerate(levels):
            one_round(make_prompts(tokenizer, c, args.prompt_tokens, 10_000 * (k + 1)), 8)

        # Rounds interleave the levels (1, 8, 32, 1, 8, 32, ...), so that on a shared machine every
        # level sees the same background load; each level reports its median round.
        rounds: dict[int, list[dict[str, Any]]] = {c: [] for c in levels}
        for r in range(args.repeats):
            for c in levels:
                prompts = make_prompts(tokenizer, c, args.prompt_tokens, offset=1000 * r)
                wall, replies = one_round(prompts, args.max_tokens)
                rounds[c].append(summarize(c, wall, replies))
        results = []
        for c in levels:
            ordered = sorted(rounds[c], key=lambda s: s["aggregate_tokens_per_s"])
            level = ordered[len(ordered) // 2]
            if args.repeats > 1:
                level["all_rounds_aggregate_tokens_per_s"] = [s["aggregate_tokens_per_s"] for s in rounds[c]]
            results.append(level)
            print(
                f"{c:4d} clients: {level['aggregate_tokens_per_s']:8.2f} tok/s aggregate, "
                f"{level['aggregate_decode_tokens_per_s']:8.2f} decode tok/s, TTFT p50 {level['ttft_p50_s']:.3f} s "
                f"p99 {level['ttft_p99_s']:.3f} s, errors {len(level['errors'])}",
                file=sys.stderr,
            )
        base = next((s for s in results if s["concurrency"] == 1), None)
        if base and base["aggregate_tokens_per_s"] > 0:
            for s in results:
                s["speedup_vs_1_client"] = round(s["aggregate_tokens_per_s"] / base["aggregate_tokens_per_s"], 2)
        report["levels"] = results
        with contextlib.suppress(OSError):
            report["machine"]["load_average_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(report, indent=2) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0 if all(not s["errors"] for s in results) else 1


if __name__ == "__main__":
    sys.exit(main())
