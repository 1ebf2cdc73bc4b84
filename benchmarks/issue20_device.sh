#!/usr/bin/env bash
# Issue 20's evidence in ONE device call (at most ~7.7 minutes by its limits: 270 s bench + 200 s ablation + wheels
# and checks; give the call timeout_s 600):
#   1. benchmarks/bench_attn_variants.py: the compiled GPT-2-small training step of plain, sinks, softcap,
#      sliding window, gate_values and (optional, last) the sink forced onto SDPA's bias column (batch 8, 3 warm-up
#      + 8 timed steps, attention kernels profiled)
#      -> $OUT/attn_variants_gpu.json (+ $OUT/bench_attn_variants.log)
#   2. benchmarks/gpu_check_sinks.py in the background during 3: flex's sink / softcap / window against the
#      explicit path, values and gradients -> $OUT/check_sinks_gpu.json, $OUT/gpu_check_sinks.log
#   3. benchmarks/issue20_ablate.jobs through benchmarks/issue26_jobs.sh, PAR=12 on the one GPU
#      -> $OUT/ablate/i20/{table.md,runs.jsonl,meta.json,*.png}, $OUT/ablate/logs, $OUT/ablate/status.txt
# Nothing is installed from the network: wheels carried in .whl/ (if any) go to /tmp/site.
# Exit status: non-zero if the bench or the check failed or timed out, or any ablation job did not run, or did not
# finish with status ok (errors; a diverged run is a result, listed but not a failure), or the merge failed.
#
#   XT_COMMIT=<hash> OUT=<dir> bash benchmarks/issue20_device.sh
# Environment (seconds): BENCH_BUDGET_S (240: no bench case started that would end later; gate_values,
# optional, is the one skipped first), BENCH_LIMIT_S (270, the bench's hard limit), ABLATE_LIMIT_S (200),
# CHECK_LIMIT_S (240); PAR (12: 36 runs in 3 waves; issue 21's 39 runs took ~100 s at 16; each sink / softcap /
# window run compiles flex's kernel once), BATCH (8);
# for a CPU check of this script: JOBS (a jobs file), BENCH_EXTRA (e.g. "--quick --cases plain,sinks --steps 1").
set -u -o pipefail
: "${OUT:?set OUT to the output folder}"
cd "$(dirname "$0")/.."
start=$(date +%s)
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || { echo "FAILED: wheel install"; exit 1; }
fi
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1
export XT_COMMIT=${XT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
fail=0
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" || exit 1

# 1. the cost table
timeout "${BENCH_LIMIT_S:-270}" python3 benchmarks/bench_attn_variants.py --batch "${BATCH:-8}" --warmup 3 --steps 8 \
  --budget-s "${BENCH_BUDGET_S:-240}" --profile ${BENCH_EXTRA:-} 2>&1 | tee "$OUT/bench_attn_variants.log"
rc=$?
if ((rc != 0)); then echo "FAILED: bench_attn_variants rc $rc (124: timed out; rows so far in attn_variants_gpu.json)"; fail=1; fi
echo "bench done at $(( $(date +%s) - start )) s"

# 2. beside the ablation (which is not timed against anything): the flex paths against explicit, gradients included
timeout "${CHECK_LIMIT_S:-240}" python3 benchmarks/gpu_check_sinks.py > "$OUT/gpu_check_sinks.log" 2>&1 &
check_pid=$!

# 3. the ablation rows, PAR jobs at a time on the one GPU
PAR=${PAR:-12} PY=python3 bash benchmarks/issue26_jobs.sh "${JOBS:-benchmarks/issue20_ablate.jobs}" "$OUT/ablate" "${ABLATE_LIMIT_S:-200}"
echo "ablation done at $(( $(date +%s) - start )) s"
python3 - "$OUT/ablate" "${JOBS:-benchmarks/issue20_ablate.jobs}" <<'PY' || fail=1
import json, pathlib, sys
out, jobs = pathlib.Path(sys.argv[1]), sys.argv[2]
want = {(l.split()[1], int(l.split()[3])) for l in open(jobs) if l.strip() and not l.lstrip().startswith("#")}
got = {}
for f in out.glob("parts/*/*/runs.jsonl"):
    for line in f.read_text().splitlines():
        r = json.loads(line)
        got[(r["setting"], r["seed"])] = r  # the ablate preset's seed is 0: a record's seed is the job's
missing = sorted(want - set(got))
errors = sorted((k, got[k].get("error")) for k in got if got[k]["status"] == "error")
diverged = sorted((k, got[k].get("error")) for k in got if got[k]["status"] == "diverged")
print(f"ablation: {len(want)} jobs, {len(got)} runs recorded, {len(missing)} missing, {len(errors)} errors, "
      f"{len(diverged)} diverged")
for k in missing: print("  MISSING", k)
for k, e in errors: print("  ERROR", k, e)
for k, e in diverged: print("  diverged (a result)", k, e)
merged = out / "i20" / "table.md"
print(merged.read_text() if merged.exists() else "  NO MERGED TABLE")
sys.exit(1 if missing or errors or not merged.exists() else 0)
PY
wait "$check_pid"; rc=$?
tail -12 "$OUT/gpu_check_sinks.log"
if ((rc != 0)); then echo "FAILED: gpu_check_sinks rc $rc (124: timed out; see gpu_check_sinks.log)"; fail=1; fi
if grep -q "merge failed\|not started" "$OUT/ablate/status.txt" 2>/dev/null; then grep "merge failed\|not started" "$OUT/ablate/status.txt"; fail=1; fi
echo "total $(( $(date +%s) - start )) s; $([ $fail = 0 ] && echo OK || echo FAILED)"
exit $fail
