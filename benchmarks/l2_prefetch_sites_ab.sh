# L2 prefetch by site and wider one-row launch settings, A/B against eb5f5d0 in one call (INT4 and INT8, 2K).
# Usage: bash benchmarks/l2_prefetch_sites_ab.sh OUTDIR (device machine, .whl carried)
set -u
out=$1; mkdir -p $out /tmp/j
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
rm -rf /tmp/old && mkdir -p /tmp/old && git archive eb5f5d0 src | tar -x -C /tmp/old
nvidia-smi --query-gpu=name --format=csv,noheader | tee -a $out/ab.log
b="python3 -m glmrun bench --preset chatglm2-6b --device cuda --dtype float16 --prompt-len 2048 --gen-len 128 --prefill-chunk 512"
one() { # name pythonpath at mb wide quant
  PYTHONPATH=$2 GLMRUN_L2_PREFETCH_AT=$3 GLMRUN_L2_PREFETCH_MB=$4 GLMRUN_GEMV_WIDE=$5 $b --quantize $6 --json /tmp/j/$6_$1.json >> $out/run.log 2>&1
  python3 -c "import json,sys; g=json.load(open('/tmp/j/$6_$1.json'))['glmrun']; print('$6 $1', g['decode_tok_s'], g['decode_step_ms'])" | tee -a $out/ab.log
}
for qz in int4 int8; do
  one old /tmp/site:/tmp/old/src x 0 0 $qz
  one qkv /tmp/site:src qkv 24 0 $qz
  one wide /tmp/site:src x 0 1 $qz
  one wideqkv /tmp/site:src qkv 24 1 $qz
  one old2 /tmp/site:/tmp/old/src x 0 0 $qz
done
tar -cf $out/json.tar -C /tmp j
PYTHONPATH=/tmp/site:src timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_row_kernels.py -k "prefetch or fused_decode_row" > $out/tests.log 2>&1; tail -3 $out/tests.log
