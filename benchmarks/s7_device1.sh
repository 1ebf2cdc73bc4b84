#!/usr/bin/env bash
# Seventh session, first device call (issue 22): FSDP2's local overhead in a group of one (fsdp_probe.py),
# then FP8 against bf16 at the 1b shape with only the feed-forward converted, and at wider shapes.
#   XT_COMMIT=<hash> OUT=<dir> bash benchmarks/s7_device1.sh
set -u -o pipefail
: "${OUT:?set OUT}"
cd "$(dirname "$0")/.."
if compgen -G ".whl/torchao*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/torchao*.whl || echo "FAILED: wheel install"
fi
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used --format=csv
timeout 150 python3 benchmarks/fsdp_probe.py --profile > $OUT/fsdp_probe.log 2>&1; echo "fsdp_probe rc $?"
grep -E "^(ddp|fsdp) " $OUT/fsdp_probe.log
timeout 200 python3 benchmarks/bench_fp8.py --shape 1b --layers ff --variants bf16,fp8-tensorwise --tag fp8_1b_ff > $OUT/fp8_1b_ff.log 2>&1; echo "fp8 1b ff rc $?"
timeout 110 python3 benchmarks/bench_fp8.py --shape 1b --dim 4096 --heads 32 --depth 6 --variants bf16,fp8-tensorwise --tag fp8_d4096 > $OUT/fp8_d4096.log 2>&1; echo "fp8 d4096 rc $?"
timeout 100 python3 benchmarks/bench_fp8.py --shape 1b --dim 3072 --heads 24 --depth 6 --variants bf16,fp8-tensorwise --tag fp8_d3072 > $OUT/fp8_d3072.log 2>&1; echo "fp8 d3072 rc $?"
for f in $OUT/fp8_*.json; do python3 -c "
import json,sys;d=json.load(open('$f'));print('$f', d['shape']['dim'], d['layers'], [(r.get('variant'), r.get('tokens_per_s'), r.get('vs_bf16'), r.get('first_step_s'), (r.get('error') or '')[-300:]) for r in d['rows']])"; done
