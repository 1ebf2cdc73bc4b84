#!/usr/bin/env bash
# Seventh session, third device call (issue 22): fsdp_probe.py with one FSDP unit per layer; the user-path
# training table (ours against PyPI 2.31.10: GPT-2-small, Llama-style, the seed's encoder-decoder, eager and
# torch.compile of the wrapper; the seed's eager only); decoding (dynamic, static, static + compiled step) against PyPI.
#   XT_COMMIT=<hash> OUT=<dir> bash benchmarks/s7_device3.sh      (carry .upstream: PyPI x-transformers --target)
set -u -o pipefail
: "${OUT:?set OUT}"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
timeout 90 python3 benchmarks/fsdp_probe.py --profile > $OUT/fsdp_probe.log 2>&1; echo "fsdp_probe rc $?"
grep -E "^(ddp|fsdp) |Self (CPU|CUDA) time total" $OUT/fsdp_probe.log
timeout 310 python3 benchmarks/bench_train.py --loss wrapper --modes eager,model --shapes gpt2,llama,seed \
  --pypi $PWD/.upstream --pypi-modes gpt2:eager,gpt2:model,llama:eager,llama:model,seed:eager \
  --budget-s 300 --tag train_user_path > $OUT/bench_train.log 2>&1; echo "bench_train rc $?"
grep -E "^(impl|pypi|ours|gpt2|llama|seed)" $OUT/bench_train.log
timeout 150 python3 benchmarks/bench_decode.py --dtype bf16 --pypi-path $PWD/.upstream --rounds 1 --repeats 2 \
  --batches 1 16 > $OUT/bench_decode.log 2>&1; echo "bench_decode rc $?"
tail -n 14 $OUT/bench_decode.log
# the command on the GPU under FSDP2 + torch.compile, a group of one (its bf16 policy crashed every run before)
timeout 75 python3 -m x_transformers train --preset gpt2-small --strategy fsdp --compile --max-steps 4 --eval-every 4 \
  --log-every 1 --no-progress --sample-tokens 0 --stdlib-bytes 2000000 --out /tmp/fsdp_compile > $OUT/fsdp_compile_train.log 2>&1
echo "fsdp compile train rc $?"; grep -E "step|loss" $OUT/fsdp_compile_train.log | tail -n 6
