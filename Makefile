# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test fuzz clean gpu-check

# torch is pinned to the CPU build on this machine's disk when none is present (an unpinned
# install would fetch a multi-GB CUDA build).
TORCH := $(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0

$(BIN)/python:
	$(PY) -m venv $(VENV)

# one stamp per extra, so `make run` does not wait for the test-only packages
$(VENV)/.train: pyproject.toml | $(BIN)/python
	$(TORCH)
	$(BIN)/pip install -q -e '.[train]'
	touch $@

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# The real upstream x-transformers, for the tests that compare with it (tests/upstream.py and
# tests/upstream_child.py run it in a child process with PYTHONPATH=.upstream: it has our import
# name). An ignored folder, never imported by the package.
UPSTREAM_VERSION := 2.31.10
$(VENV)/.upstream: | $(BIN)/python
	$(BIN)/pip install -q --no-deps --target .upstream x-transformers==$(UPSTREAM_VERSION) einx einops loguru torch-einops-utils frozendict
	touch $@

# Two pytest-xdist workers of one thread each: 7.3 min on this project's 2-core machine, against 13-14
# min for one process of two threads (its small ops leave the second core idle). TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2
test: $(VENV)/.test $(VENV)/.upstream
	OMP_NUM_THREADS=$(if $(filter 0,$(TEST_WORKERS)),2,1) $(BIN)/python -m pytest -n $(TEST_WORKERS)

# Large random draws of every documented keyword (tests/test_fuzz.py; FUZZ_COUNT=100000 for more),
# and the per-pair sweeps that the covering array of `make test` already covers.
FUZZ_COUNT ?= 10000
fuzz: $(VENV)/.test
	FUZZ_COUNT=$(FUZZ_COUNT) OMP_NUM_THREADS=2 $(BIN)/python -m pytest -m fuzz tests/

run: $(VENV)/.train
	OMP_NUM_THREADS=2 $(BIN)/python -m x_transformers train --preset tiny

# On a CUDA machine (not CI): compiled training against eager at 1B-like shapes (issue #24; it
# does not reproduce on CPU), and the 1b preset trained 50 steps with and without --compile.
gpu-check:
	PYTHONPATH=src python3 benchmarks/gpu_check_chunked_loss.py --variants compiled compiled_flat
	PYTHONPATH=src python3 benchmarks/gpu_train_guard.py --steps 50

clean:
	rm -rf $(VENV) runs .upstream
