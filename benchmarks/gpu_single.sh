#!/usr/bin/env bash
# One-GPU benchmark set (ChatGLM2-6B shape, random weights). Usage: bash benchmarks/gpu_single.sh OUTDIR [STAGE...]
# Each stage writes OUTDIR/<stage>.json; the baseline (transformers) is timed in the same process.
set -uo pipefail
out="${1:?outdir}"; shift
stages="${*:-fp16 prefill32k batch32 int8 int4 mem32k_int4_c1024 mem32k_fp16}"
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}:src PYTHONUNBUFFERED=1
b="python3 -m glmrun bench --preset chatglm2-6b --device cuda"
for s in $stages; do
  echo "=== $s"
  case $s in
    fp16)        $b --dtype float16 --prompt-len 2048 --gen-len 128 --prefill-chunk 512 --baseline hf --json "$out/fp16_2k.json" ;;
    fp16_c2048)  $b --dtype float16 --prompt-len 2048 --gen-len 128 --prefill-chunk 2048 --baseline hf --json "$out/fp16_2k_chunk2048.json" ;;
    fp16nograph) $b --dtype float16 --prompt-len 2048 --gen-len 64 --prefill-chunk 512 --no-graphs --json "$out/fp16_2k_nographs.json" ;;
    prefill32k)  $b --dtype float16 --prompt-len 32768 --gen-len 8 --prefill-chunk 32768 --baseline hf-prefill --json "$out/fp16_prefill32k.json" ;;
    prefill32k_c4096) $b --dtype float16 --prompt-len 32768 --gen-len 8 --prefill-chunk 4096 --json "$out/fp16_prefill32k_chunk4096.json" ;;
    batch32)     $b --dtype float16 --prompt-len 1024 --gen-len 64 --batch 32 --prefill-chunk 1024 --json "$out/fp16_batch32_1k.json" ;;
    int8)        $b --dtype float16 --quantize int8 --prompt-len 2048 --gen-len 128 --prefill-chunk 512 --json "$out/int8_2k.json" ;;
    int4)        $b --dtype float16 --quantize int4 --prompt-len 2048 --gen-len 128 --prefill-chunk 512 --json "$out/int4_2k.json" ;;
    mem32k_int4) $b --dtype float16 --quantize int4 --prompt-len 32768 --gen-len 8 --prefill-chunk 2048 --json "$out/int4_32k.json" ;;
    mem32k_fp16) $b --dtype float16 --prompt-len 32768 --gen-len 8 --prefill-chunk 2048 --json "$out/fp16_32k_mem.json" ;;
    mem32k_int4_c1024) $b --dtype float16 --quantize int4 --prompt-len 32768 --gen-len 8 --prefill-chunk 1024 --json "$out/int4_32k_chunk1024.json" ;;
    profile_fp16) python3 benchmarks/profile_decode.py "$out/profile_fp16.json" ;;
    profile_int8) python3 benchmarks/profile_decode.py "$out/profile_int8.json" --quantize int8 ;;
    profile_int4) python3 benchmarks/profile_decode.py "$out/profile_int4.json" --quantize int4 ;;
    *) echo "unknown stage $s" ;;
  esac
done
