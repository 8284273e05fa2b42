#!/usr/bin/env bash
# `glmrun bench` of an older commit (OLD_REV) beside this tree, alternated over ROUNDS rounds in one call on one
# machine, then summarised (ab_summary.py). One build's INT4 runs at 2K on one warm H100 ranged over 5.3%
# (422.9-445.5 tok/s, results/h100/prefetch/), so a single pair decides nothing: take ROUNDS >= 3 and compare
# the means and ranges.
#
#   OLD_REV=eb5f5d0 ROUNDS=3 QUANTS="int4 int8" bash benchmarks/ab_bench.sh OUTDIR [extra glmrun bench args]
#
# OLD_SRC: a directory holding that commit's src/ (from `git archive REV src`), for a commit the device copy's
# git does not hold; OLD_REV then only names it. NEW_SRC: the same for the new side (default: this tree's src/). QUANTS: int4, int8 or none (float). NEW_REV names the tree in the summary (the device copy's git HEAD can be stale).
# Each run's JSON goes to OUTDIR/runs.tar, the summary to OUTDIR/ab_summary.json.
# The default bench is the issue's decode setting (ChatGLM2-6B shape, 2K prompt, 128 new tokens, CUDA); set
# BENCH to change it (e.g. BENCH="--preset tiny --device cpu --prompt-len 16 --gen-len 8" for a dry run).
set -euo pipefail
out="${1:?outdir}"; shift
mkdir -p "$out"
work=$(mktemp -d)
if compgen -G ".whl/*.whl" > /dev/null; then  # the device machine: what its Python lacks, carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" .whl/*.whl \
    > /dev/null 2>&1 || echo "note: the wheels in .whl/ did not install; running with what python3 has" >&2
fi
mkdir -p "$work/old" "$work/runs"
if [ -n "${OLD_SRC:-}" ]; then  # an older src/ already unpacked (a commit the machine's git copy may not hold)
  cp -r "$OLD_SRC" "$work/old/src"
else
  git archive "${OLD_REV:?set OLD_REV to the commit to compare with}" src | tar -x -C "$work/old"
fi
py="${PYTHON:-python3}"
bench="${BENCH:---preset chatglm2-6b --device cuda --dtype float16 --prompt-len 2048 --gen-len 128 --prefill-chunk 512}"
for qz in ${QUANTS:-int4 int8}; do
  q=(); [ "$qz" = none ] || q=(--quantize "$qz")
  for r in $(seq 1 "${ROUNDS:-3}"); do
    order="old new"; [ $((r % 2)) = 0 ] && order="new old"  # alternate who goes first: drift hits both
    for side in $order; do
      src=${NEW_SRC:-$PWD/src}; [ "$side" = old ] && src=$work/old/src
      json="$work/runs/${qz}_${side}_r$r.json"
      # shellcheck disable=SC2086
      PYTHONPATH="$work/site:$src" $py -m glmrun bench $bench "${q[@]}" "$@" --json "$json" >> "$out/ab.log" 2>&1
      echo "$qz $side round $r: $($py -c "import json,sys; print(json.load(open(sys.argv[1]))['glmrun']['decode_tok_s'])" "$json") tok/s" \
        | tee -a "$out/ab.log"
    done
  done
done
tar -cf "$out/runs.tar" -C "$work" runs
$py benchmarks/ab_summary.py "$work/runs" --old-rev "$OLD_REV" --new-rev "${NEW_REV:-$(git rev-parse --short HEAD 2>/dev/null || echo tree)}" \
  --out "$out/ab_summary.json"
rm -rf "$work"
