#!/usr/bin/env bash
# One device round on a 2-GPU machine: the 2-GPU placement check, the server under 64 streams (GPU 0)
# and single-GPU stages (GPU 1) side by side. Usage: bash benchmarks/device_round.sh OUTDIR [STAGE...]
# Needs the wheels of what the machine lacks in .whl/ (gguf, fastapi, uvicorn, ... and tokenizer.model).
set -u
out="${1:?outdir}"; shift
stages="${*:-int8 batch32}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >/dev/null 2>&1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpus.txt"
ck=/dev/shm/glm6b  # random ChatGLM2-6B weights, official layout (in RAM: writing 12.5 GB to disk is slow)
t0=$(date +%s)
[ -f "$ck/config.json" ] || python3 -m glmrun make-checkpoint --preset chatglm2-6b --out "$ck" --dtype float16 \
  --tokenizer .whl/tokenizer.model > /dev/null
echo "checkpoint ready after $(( $(date +%s) - t0 )) s" | tee "$out/round.log"
python3 benchmarks/multi_gpu.py "$out/multi_gpu.json" "$ck" > "$out/multi_gpu.log" 2>&1
echo "multi_gpu done after $(( $(date +%s) - t0 )) s" | tee -a "$out/round.log"
CUDA_VISIBLE_DEVICES=0 python3 benchmarks/server_concurrency.py --model "$ck" --device cuda --dtype float16 \
  --concurrency 1,8,64 --max-tokens 128 --repeats 1 --out "$out/server_chatglm2_6b.json" > "$out/server.log" 2>&1 &
CUDA_VISIBLE_DEVICES=1 bash benchmarks/gpu_single.sh "$out" $stages > "$out/single.log" 2>&1 &
wait
echo "all done after $(( $(date +%s) - t0 )) s" | tee -a "$out/round.log"
