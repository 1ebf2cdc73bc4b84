#!/usr/bin/env bash
# Seventh session, second device call (issue 22): fsdp_probe.py after the bf16 FSDP fix, then FP8 against bf16
# at dim 4096 and 3072 (depth 6, seq 2048, batch 8): where FP8 crosses 1.2x.
#   XT_COMMIT=<hash> OUT=<dir> bash benchmarks/s7_device2.sh
set -u -o pipefail
: "${OUT:?set OUT}"
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/torchao*.whl || echo "FAILED: wheel install"
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1
timeout 170 python3 benchmarks/fsdp_probe.py --profile > $OUT/fsdp_probe.log 2>&1; echo "fsdp_probe rc $?"
grep -E "^(ddp|fsdp) " $OUT/fsdp_probe.log
timeout 190 python3 benchmarks/bench_fp8.py --shape 1b --dim 4096 --heads 32 --depth 6 --variants bf16,fp8-tensorwise --tag fp8_d4096 > $OUT/fp8_d4096.log 2>&1; echo "fp8 d4096 rc $?"
timeout 170 python3 benchmarks/bench_fp8.py --shape 1b --dim 3072 --heads 24 --depth 6 --variants bf16,fp8-tensorwise --tag fp8_d3072 > $OUT/fp8_d3072.log 2>&1; echo "fp8 d3072 rc $?"
for f in $OUT/fp8_*.json; do python3 -c "
import json,sys;d=json.load(open('$f'));print('$f', d['shape']['dim'], d['layers'], [(r.get('variant'), r.get('tokens_per_s'), r.get('vs_bf16'), r.get('first_step_s'), (r.get('error') or '')[-300:]) for r in d['rows']])"; done
