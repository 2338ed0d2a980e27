PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true

.PHONY: help install test lint smoke bench gpu-check data clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' Makefile | awk -F':.*## ' '{printf "  make %-9s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python  ## create .venv and install rift_bn (editable) with the dev extra
	$(BIN)/pip install -q -e '.[dev]'

test: install  ## run the test suite
	$(BIN)/python -m pytest -q tests

lint: install  ## ruff
	$(BIN)/ruff check rift_bn benchmarks tests
	$(BIN)/ruff format --check rift_bn benchmarks tests

DATA ?= $(or $(RIFT_BN_DATA),data)
JPEG := ../shared/data/cifar10-jpeg

data: install  ## CIFAR-10 layout under $(DATA): from the workspace's JPEG copy if present (else downloaded on first run)
	@if [ ! -d "$(DATA)/cifar-10-batches-py" ] && [ -f "$(JPEG)/to_cifar_layout.py" ]; then \
		$(BIN)/python $(JPEG)/to_cifar_layout.py "$(DATA)"; fi

smoke: install data  ## the main job at smoke scale: RiFT vs RiFT-with-BN, k=1,2 (a few minutes on 2 CPU cores)
	RIFT_BN_DATA=$(abspath $(DATA)) $(BIN)/python -m rift_bn.run +experiment=topk scale=smoke data=cifar10 k=1,2 -m

bench: install  ## performance ratios (docs/performance.md)
	$(BIN)/python -m benchmarks.bench

gpu-check: install data  ## the GPU path on a GPU machine: bf16, channels_last, compile, MRC timings (-> gpu_check/)
	DATA=$(abspath $(DATA)) PY=$(BIN)/python bash scripts/gpu_check.sh

clean:  ## remove outputs AND the cache (trained base models, MRC tables); not the venv or data
	rm -rf outputs multirun .cache wandb gpu_check
