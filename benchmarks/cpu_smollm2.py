"""CPU benchmark on the embedded SmolLM2-135M-Instruct (Q4_1 GGUF): glmrun vs llama.cpp, same file, same run.

    python benchmarks/cpu_smollm2.py --llama-python /path/to/venv-with-llama-cpp/bin/python --json OUT.json

Measures (median of --repeat runs, warm-up excluded):
- decode tokens/s, batch 1, greedy, 64 new tokens after a short prompt (EOS ignored for glmrun; llama.cpp
  is given the same prompt and max_tokens);
- time from process start to the first token on stdout for `glmrun ask` and for a minimal llama-cpp-python
  script that streams the same question.
llama-cpp-python must be built for this CPU (CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON
-DGGML_F16C=ON" on these machines); it is not a glmrun dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import glmrun
from glmrun.bench import time_glmrun
from glmrun.gguf_meta import embedded_gguf_path

QUESTION = "What is the capital of France?"

LLAMA_DECODE = r"""
import json, sys, time
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=2048, n_threads=int(sys.argv[2]), verbose=False)
runs = []
for i in range(int(sys.argv[3]) + 1):
    t = time.perf_counter()
    out = llm("The weather today", max_tokens=64, temperature=0, top_k=1)
    dt = time.perf_counter() - t
    if i:
        runs.append(out["usage"]["completion_tokens"] / dt)
print(json.dumps(runs))
"""

LLAMA_FIRST_TOKEN = r"""
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=2048, n_threads=int(sys.argv[2]), verbose=False)
msgs = [{"role": "user", "content": sys.argv[3]}]
for chunk in llm.create_chat_completion(msgs, max_tokens=8, temperature=0, stream=True):
    text = chunk["choices"][0]["delta"].get("content")
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()
"""


def first_output_seconds(cmd: list[str], env: dict[str, str]) -> float:
    """Seconds from starting ``cmd`` until its first byte on stdout."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    proc.stdout.read(1)
    first = time.perf_counter() - t
    proc.stdout.read()
    proc.wait()
    return first


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-python", required=True)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    gguf = str(embedded_gguf_path())
    threads = torch.get_num_threads()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    model = glmrun.load(gguf, device="cpu", progress=False)
    glm_runs = [
        time_glmrun(model.engine.model, prompt_len=8, gen_len=65, batch=1, prefill_chunk=512, warmup=(i == 0))
        for i in range(args.repeat)
    ]
    glm_decode = statistics.median(r.decode_tok_s for r in glm_runs)
    model.close()
    llama_runs = json.loads(
        subprocess.run(
            [args.llama_python, "-c", LLAMA_DECODE, gguf, str(threads), str(args.repeat)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    llama_decode = statistics.median(llama_runs)

    ask = [sys.executable, "-m", "glmrun", "ask", "--temperature", "0", "--max-new-tokens", "8", QUESTION]
    llama_ask = [args.llama_python, "-c", LLAMA_FIRST_TOKEN, gguf, str(threads), QUESTION]
    first_token = {"glmrun": [], "llama_cpp": []}
    for _ in range(args.repeat):
        first_token["glmrun"].append(first_output_seconds(ask, env))
        first_token["llama_cpp"].append(first_output_seconds(llama_ask, env))
    version = subprocess.run(
        [args.llama_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True, text=True
    ).stdout.strip()
    result = {
        "command": "python benchmarks/cpu_smollm2.py " + " ".join(sys.argv[1:]),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch_threads": threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "model": os.path.basename(gguf),
        "glmrun_decoder": {
            "decoder": glm_runs[0].decoder,
            "int4_products": glm_runs[0].int4_products,  # of 120: layer products from the file's Q4_1 codes
        },
        "baseline": f"llama-cpp-python {version}",
        "decode_tok_s": {
            "glmrun": round(glm_decode, 2),
            "llama_cpp": round(llama_decode, 2),
            "ratio": round(glm_decode / llama_decode, 3),
            "glmrun_runs": [r.decode_tok_s for r in glm_runs],
            "llama_cpp_runs": llama_runs,
        },
        "process_start_to_first_token_s": {
            k: {"median": round(statistics.median(v), 3), "runs": [round(x, 3) for x in v]}
            for k, v in first_token.items()
        },
        "target": "glmrun decode >= 50% of llama.cpp's",
    }
    print(json.dumps(result, indent=2))
    with open(args.json, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
