"""Two-GPU placement check (issue: uneven multi-GPU placement), ChatGLM2-6B shape, fp16 random weights.

Run on a machine with two GPUs:  PYTHONPATH=src python3 benchmarks/multi_gpu.py OUT.json CKPT_DIR
It writes a random ChatGLM2-6B checkpoint (official layout) to CKPT_DIR if absent, then, in one process:
1. one GPU: load with glmrun.load, time greedy decode (CUDA graphs), close() and check memory returns;
2. two GPUs with the seed's budgets (0=7.5GiB, 1=11.5GiB) at an 8K context: plan, load, predicted vs actual
   peaks after loading and after generating, greedy tokens equal to the one-GPU run, decode speed ratio,
   a chat turn through the engine, close() frees both GPUs;
3. INT4 on one GPU with a 6 GiB budget and a 32K context: plan, load, prefill ~32K tokens, peak;
4. an out-of-memory request: a clear error, the model still usable, memory back where it was.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

import glmrun
from glmrun.bench import RunStats, time_glmrun
from glmrun.errors import OutOfMemoryError
from glmrun.placement import parse_memory

GiB = 1024**3
MiB = 1024**2


def allocated() -> list[int]:
    return [torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())]


def brief(s: RunStats) -> dict:
    return {"decode_tok_s": s.decode_tok_s, "ttft_s": s.ttft_s, "peak_allocated_gb": s.peak_allocated_gb}


def report(glm: glmrun.GLMModel) -> dict:
    return {
        dev: {k: (round(v / GiB, 3) if isinstance(v, int) else v) for k, v in row.items()}
        for dev, row in glm.memory_report().items()
    }


def main() -> int:
    out_path, ckpt = Path(sys.argv[1]), Path(sys.argv[2])
    if not (ckpt / "config.json").exists():
        tok = Path(".whl/tokenizer.model")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "glmrun",
                "make-checkpoint",
                "--preset",
                "chatglm2-6b",
                "--out",
                str(ckpt),
                "--dtype",
                "float16",
                "--tokenizer",
                str(tok),
            ],
            check=True,
        )
    res: dict = {
        "card": torch.cuda.get_device_name(0),
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "command": "PYTHONPATH=src python3 benchmarks/multi_gpu.py OUT.json CKPT_DIR",
    }
    lengths = {"prompt_len": 1024, "gen_len": 128, "batch": 1, "prefill_chunk": 2048}
    res["lengths"] = lengths

    state: dict = {}

    def section(name: str, fn: Callable[[], None]) -> None:
        """Run one part; a failure is recorded in the JSON and the next part still runs."""
        try:
            fn()
        except Exception:
            res.setdefault("errors", {})[name] = traceback.format_exc()[-3000:]
            print(name, "FAILED\n", res["errors"][name], flush=True)
        out_path.write_text(json.dumps(res, indent=2))

    def single() -> None:  # 1. one GPU
        base = allocated()
        t = time.perf_counter()
        one = glmrun.load(ckpt, device="cuda:0", dtype="float16", context=8192, progress=False)
        res["single_load_s"] = round(time.perf_counter() - t, 1)
        s1 = state["s1"] = time_glmrun(one.engine.model, **lengths)
        res["single"] = brief(s1)
        one.close()
        res["single_close_leftover_mib"] = [round((a - b) / MiB, 1) for a, b in zip(allocated(), base, strict=True)]
        print("single", res["single"], "leftover MiB", res["single_close_leftover_mib"], flush=True)

    def two_gpus() -> None:  # 2. two GPUs, the seed's budgets, 8K context
        budgets = {0: parse_memory("7.5GiB"), 1: parse_memory("11.5GiB")}
        base = allocated()
        for i in range(2):
            torch.cuda.reset_peak_memory_stats(i)
        two = glmrun.load(ckpt, dtype="float16", max_memory=budgets, context=8192, progress=False)
        assert two.plan is not None
        res["plan"] = two.plan.to_json()
        print(two.plan.summary(), flush=True)
        res["after_load"] = report(two)
        s2 = time_glmrun(two.engine.model, **lengths)
        res["two_gpu"] = brief(s2)
        s1 = state.get("s1")
        if s1 is not None:
            res["decode_ratio_two_over_single"] = round(s2.decode_tok_s / s1.decode_tok_s, 3)
            res["greedy_tokens_equal"] = s1.tokens == s2.tokens
            res["greedy_tokens_equal_prefix"] = next(
                (i for i, (a, b) in enumerate(zip(s1.tokens, s2.tokens, strict=True)) if a != b), len(s1.tokens)
            )
        reply = two.chat("你好", max_new_tokens=16, do_sample=False)
        res["chat_turn"] = {"tokens": reply.result.completion_tokens, "finish": reply.result.finish_reason}
        res["after_generation"] = report(two)
        print("two", res["two_gpu"], "ratio", res.get("decode_ratio_two_over_single"), flush=True)
        print("equal", res.get("greedy_tokens_equal"), res.get("greedy_tokens_equal_prefix"), flush=True)
        print("predicted vs actual", json.dumps(res["after_generation"]), flush=True)
        two.close()
        res["two_close_leftover_mib"] = [round((a - b) / MiB, 1) for a, b in zip(allocated(), base, strict=True)]
        print("two leftover MiB", res["two_close_leftover_mib"], flush=True)

    def int4_32k() -> None:  # 3. INT4 on one GPU, 6 GiB budget, 32K context
        torch.cuda.reset_peak_memory_stats(0)
        base = allocated()
        q4 = glmrun.load(
            ckpt, dtype="float16", quantize="int4", max_memory={0: parse_memory("6GiB")}, context=32768, progress=False
        )
        res["int4_plan"] = q4.plan.to_json() if q4.plan else None
        if q4.plan:
            print(q4.plan.summary(), flush=True)
        s3 = time_glmrun(q4.engine.model, prompt_len=32000, gen_len=16, batch=1, prefill_chunk=2048)
        res["int4_32k"] = brief(s3)
        res["int4_32k_memory"] = report(q4)
        print("int4 32k", res["int4_32k"], json.dumps(res["int4_32k_memory"]), flush=True)
        q4.close()
        res["int4_close_leftover_mib"] = [round((a - b) / MiB, 1) for a, b in zip(allocated(), base, strict=True)]

    def oom() -> None:  # 4. a request that runs out of memory
        m = glmrun.load(ckpt, device="cuda:0", dtype="float16", context=32768, progress=False)
        m.generate(list(range(100, 200)), max_new_tokens=4, do_sample=False)
        before = torch.cuda.memory_allocated(0)
        free, total = torch.cuda.mem_get_info(0)
        torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved(0) + 300 * MiB) / total, 0)
        try:
            m.generate(list(range(100, 30100)), max_new_tokens=4, max_length=32768, do_sample=False)
            res["oom"] = {"raised": False}
        except OutOfMemoryError as exc:
            res["oom"] = {
                "raised": True,
                "message": str(exc)[:600],
                "allocated_delta_mib": round((torch.cuda.memory_allocated(0) - before) / MiB, 1),
            }
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        after = m.generate(list(range(100, 200)), max_new_tokens=4, do_sample=False)
        res["oom"]["usable_after"] = after.completion_tokens > 0
        print("oom", res["oom"], flush=True)
        m.close()

    for name, fn in (("single", single), ("two_gpus", two_gpus), ("int4_32k", int4_32k), ("oom", oom)):
        section(name, fn)
    return 1 if "errors" in res else 0


if __name__ == "__main__":
    sys.exit(main())
