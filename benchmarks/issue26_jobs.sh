#!/usr/bin/env bash
# Issue 26, third round: one `xtransformers ablate` process per (group, setting, learning rate, seed),
# PAR at a time on one GPU (small models are launch-bound, so many processes share the card), in the
# order of the job file, so a time limit cuts the least important jobs; then one merged table per group.
#
#   benchmarks/issue26_jobs.sh JOBS OUT_DIR [LIMIT_S]
#
# JOBS: one job per line, `GROUP SETTING LR SEED [extra ablate args...]`; `#` starts a comment. The
# baseline is a setting like any other (every process runs --without-baseline). A group's lines should
# share their extra args (the base: --depth, --max-steps, --set ...), since a merged table has one base.
# Environment: PAR (default 16), PY (default python3).
# Output: OUT_DIR/GROUP/{table.md,seq2seq.md,runs.jsonl,meta.json,*.png}, OUT_DIR/logs/, OUT_DIR/status.txt.
set -u
jobs=$1; out=$2; limit=${3:-540}
par=${PAR:-16}; py=${PY:-python3}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
mkdir -p "$out/logs" "$out/parts"
start=$(date +%s)
run_job() {  # GROUP SETTING LR SEED [extra...]
  local group=$1 setting=$2 lr=$3 seed=$4; shift 4
  local name="$group-$setting-lr$lr-s$seed" left=$((limit - ($(date +%s) - start)))
  if ((left < 30)); then echo "not started (time limit): $name" >> "$out/status.txt"; return; fi
  local only=--without-baseline; [[ $setting == baseline ]] && only=
  timeout "$left" "$py" -m x_transformers ablate --out "$out/parts/$group/$name" --settings "$setting" \
    $only --seeds 1 --first-seed "$seed" --lrs "$lr" "$@" > "$out/logs/$name.txt" 2>&1
  echo "rc $? $(( $(date +%s) - start ))s: $name" >> "$out/status.txt"
}
export -f run_job
export out limit start py
grep -v '^\s*#' "$jobs" | grep -v '^\s*$' | xargs -P "$par" -L 1 bash -c 'run_job "$@"' _
for g in "$out"/parts/*/; do
  group=$(basename "$g")
  dirs=$(ls -d "$g"*/ | sed 's:/$::' | paste -sd, -)
  "$py" -m x_transformers ablate --merge "$dirs" --out "$out/$group" > "$out/logs/merge-$group.txt" 2>&1 \
    || echo "merge failed: $group" >> "$out/status.txt"
done
grep -l "Traceback\|ERROR\|DIVERGED" "$out"/logs/*.txt | head -20
