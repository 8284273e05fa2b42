# Run right after l2_prefetch_sites_ab.sh on the same warm machine (it reuses /tmp/site and /tmp/old):
# eb5f5d0 and the QKV-only prefetch, INT4, three times each, interleaved.
out=$1; mkdir -p /tmp/j
b="python3 -m glmrun bench --preset chatglm2-6b --device cuda --dtype float16 --prompt-len 2048 --gen-len 128 --prefill-chunk 512"
for r in 1 2 3; do for v in old qkv; do
 if [ $v = old ]; then pp=/tmp/site:/tmp/old/src; else pp=/tmp/site:src; fi
 PYTHONPATH=$pp GLMRUN_L2_PREFETCH_AT=qkv GLMRUN_L2_PREFETCH_MB=24 $b --quantize int4 --json /tmp/j/r${r}_$v.json >> $out/run.log 2>&1
 python3 -c "import json; g=json.load(open('/tmp/j/r${r}_$v.json'))['glmrun']; print('int4 r$r $v', g['decode_tok_s'], g['decode_step_ms'])" | tee -a $out/ab.log
done; done
tar -cf $out/json.tar -C /tmp j
