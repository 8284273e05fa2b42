#!/usr/bin/env bash
# Two lists of gpu_single.sh stages run side by side, one per GPU of a 2-GPU machine, into one folder.
# Usage: bash benchmarks/gpu_pair.sh OUTDIR "STAGES FOR GPU 0" "STAGES FOR GPU 1"
set -u
out="${1:?outdir}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >/dev/null 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpus.txt"
CUDA_VISIBLE_DEVICES=0 bash benchmarks/gpu_single.sh "$out" ${2:-} > "$out/gpu0.log" 2>&1 &
CUDA_VISIBLE_DEVICES=1 bash benchmarks/gpu_single.sh "$out" ${3:-} > "$out/gpu1.log" 2>&1 &
wait
