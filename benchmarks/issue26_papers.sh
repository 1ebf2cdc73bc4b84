#!/usr/bin/env bash
# Issue 26: the contradicted papers' settings with a learning-rate sweep and 3 seeds, as parallel
# `xtransformers ablate` processes on one GPU (one process per seed x lr: small models are
# launch-bound, so several processes share the card well), merged into one table.
#
#   benchmarks/issue26_papers.sh OUT_DIR DEPTH SETTINGS [TIME_LIMIT_S] [extra ablate args...]
#
#   d4:  benchmarks/issue26_papers.sh $OUT/d4 4 baseline,rezero,... 400
#   d12: benchmarks/issue26_papers.sh $OUT/d12 12 baseline,post_norm,rezero,... 400
#
# Environment: LRS (default 1e-3,2e-3,4e-3), SEEDS (default 3), PY (default python3).
# Output: OUT_DIR/{table.md,seq2seq.md,runs.jsonl,meta.json,*.png} (the merged sweep) and OUT_DIR/logs.txt;
# each process's own folder under $PARTS (default a fresh folder in /tmp), outside OUT_DIR.
set -u
out=$1; depth=$2; settings=$3; limit=${4:-400}; shift 4 2>/dev/null || shift $#
lrs=${LRS:-1e-3,2e-3,4e-3}; seeds=${SEEDS:-3}; py=${PY:-python3}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
parts=${PARTS:-$(mktemp -d /tmp/issue26.XXXXXX)}
mkdir -p "$parts"
pids=()
for ((s = 0; s < seeds; s++)); do
  for lr in ${lrs//,/ }; do
    "$py" -m x_transformers ablate --out "$parts/s$s-lr$lr" --depth "$depth" --settings "$settings" \
      --seeds 1 --first-seed "$s" --lrs "$lr" --time-limit "$limit" "$@" > "$parts/log-s$s-lr$lr.txt" 2>&1 &
    pids+=($!)
  done
done
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=1; done
mkdir -p "$(dirname "$out")"
dirs=$(ls -d "$parts"/s*/ | sed 's:/$::' | paste -sd, -)
"$py" -m x_transformers ablate --merge "$dirs" --out "$out" || fail=1
cat "$parts"/log-*.txt > "$out/logs.txt"
grep -h "ERROR\|DIVERGED\|Traceback" "$parts"/log-*.txt | head -20
exit $fail
