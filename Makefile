PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true

.PHONY: help install test lint smoke bench data clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*##' Makefile | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python  ## create .venv and install rift_bn (editable) with the dev extra
	$(BIN)/pip install -q -e '.[dev]'

test: install  ## run the test suite
	$(BIN)/python -m pytest -q tests

lint: install  ## ruff
	$(BIN)/ruff check rift_bn tests
	$(BIN)/ruff format --check rift_bn tests

smoke: install  ## adversarially train and evaluate a tiny base model (a few minutes on 2 CPU cores)
	$(BIN)/python -m rift_bn.run +experiment=at scale=smoke

bench: install  ## performance ratios (docs/performance.md)
	$(BIN)/python -m rift_bn.bench

clean:  ## remove outputs (not the venv)
	rm -rf outputs multirun .cache wandb
