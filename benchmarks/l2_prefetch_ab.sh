#!/usr/bin/env bash
# L2 prefetch of the next product's weight (batch-1 decode), A/B in one call on one GPU: `glmrun bench` of the
# code at OLD_REV (git archive) beside this tree with GLMRUN_L2_PREFETCH_MB set to each of MBS.
# Usage: OLD_REV=<rev> MBS="8 16 32" QUANTS="int4 int8" bash benchmarks/l2_prefetch_ab.sh OUTDIR
set -u
out="${1:?outdir}"; mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >/dev/null 2>&1
rm -rf /tmp/old && mkdir -p /tmp/old && git archive "${OLD_REV:?}" src | tar -x -C /tmp/old
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$out/ab.log"
b="python3 -m glmrun bench --preset chatglm2-6b --device cuda --dtype float16 --prompt-len 2048 --gen-len 128 --prefill-chunk 512"
for qz in ${QUANTS:-int4 int8}; do
  for v in old ${MBS:-16}; do
    if [ "$v" = old ]; then pp=/tmp/site:/tmp/old/src; mb=0; else pp=/tmp/site:src; mb=$v; fi
    PYTHONPATH=$pp GLMRUN_L2_PREFETCH_MB=$mb $b --quantize "$qz" --json "$out/${qz}_$v.json" >> "$out/run.log" 2>&1
    python3 - "$out/${qz}_$v.json" "$qz" "$v" <<'PY' | tee -a "$out/ab.log"
import json, sys
d = json.load(open(sys.argv[1]))
g = d["glmrun"]
print(sys.argv[2], sys.argv[3], "decode", g["decode_tok_s"], "tok/s", "step", g["decode_step_ms"], "ms", "peak",
      g["peak_allocated_gb"], "tokens", hash(tuple(d["greedy_tokens"])) % 10**8)
PY
  done
done
