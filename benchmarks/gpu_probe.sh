#!/usr/bin/env bash
# Diagnostics for the GPU issue on one card: kernel tests on CUDA, attention backends, prefill and decode
# profiles, glmrun bench without baseline, and the one-row kernel sweep. Usage: bash benchmarks/gpu_probe.sh OUTDIR [tests attention prefill decode sweep]
set -uo pipefail
out="${1:?outdir}"; shift; mkdir -p "$out"; stages="${*:-tests attention prefill decode}"
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
[[ $stages == *tests* ]] && echo "=== tests" && timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_layer_kernels.py tests/test_quant_kernels.py \
  tests/test_quant.py 2>&1 | tail -8
[[ $stages == *attention* ]] && echo "=== attention" && timeout 120 python3 benchmarks/attention_backends.py "$out/attention_backends.json" | cut -c1-220
[[ $stages == *prefill* ]] && echo "=== prefill" && timeout 150 python3 benchmarks/profile_prefill.py "$out/profile_prefill.json" --prompt-len 2048 --chunks 512,2048 2>&1 | tail -30
for q in $([[ $stages == *decode* ]] && echo none int8 int4); do
  echo "=== profile $q"; extra=""; [ "$q" != none ] && extra="--quantize $q"
  timeout 150 python3 benchmarks/profile_decode.py "$out/profile_$q.json" $extra 2>&1 | tail -4
  echo "=== bench $q"; timeout 150 python3 -m glmrun bench --preset chatglm2-6b --device cuda --dtype float16 $extra \
    --prompt-len 2048 --gen-len 128 --prefill-chunk 512 --json "$out/bench_$q.json" 2>&1 | tail -6
done
[[ $stages == *sweep* ]] && echo "=== sweep" && (cd benchmarks && timeout 400 python3 quant_kernels_gpu.py --json "$out/sweep.json" --batches 1 --sweep --reps 10 \
  > "$out/sweep.txt" 2>&1; tail -14 "$out/sweep.txt")
