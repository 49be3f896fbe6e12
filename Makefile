# Set-up, main job and tests. `make train` and `make test` each set up a fresh machine first.
PYTHON ?= python3
# A CPU build of torch is installed only when no torch is present; an existing (CUDA) torch is kept.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup setup-test train test lint gpu-test

setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	@$(PYTHON) -m pip install -q -e ".[train]"

setup-test: setup
	@$(PYTHON) -m pip install -q -e ".[dev,train]"
	@# DeepSpeed is an sdist whose build imports torch: build it against the torch above, never an isolated one.
	@$(PYTHON) -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 $(PYTHON) -m pip install -q --no-build-isolation "deepspeed>=0.19.8,<0.20"

train: setup
	moe-train

test: setup-test
	$(PYTHON) -m pytest -q

lint: setup-test
	$(PYTHON) -m ruff check moe kernels tests
	$(PYTHON) -m ruff format --check moe kernels tests

# The GPU check (needs CUDA; run `make setup-test` once first): the whole suite with CUDA plus a benchmark smoke run.
GPU_CHECK_OUT ?= gpu-check-$(shell date +%Y%m%d-%H%M%S)
gpu-test:
	$(PYTHON) -m moe.bench.gpu_check --out $(GPU_CHECK_OUT)
