# cf: the Context Forcing experiment suite. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CF := $(VENV)/bin/cf

PRESET ?= tiny
METHOD ?= context_forcing
MEMORY ?= slowfast
SEED ?= 0
ABLATION ?=

.PHONY: help install test test-slow lint format bench ablate tables notebooks ui world clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 14

$(VENV)/bin/python:
	@echo "==> creating $(VENV) with $$($(PYTHON) --version)"
	$(PYTHON) -m venv $(VENV)

install: $(VENV)/bin/python  ## create .venv and install the CPU stack (idempotent, no GPU needed)
	@echo "==> torch pinned to the local CPU wheel (constraints.txt)"
	$(PIP) install --quiet -c constraints.txt "torch==2.13.0" "torchvision==0.28.0"
	@echo "==> cf and its dependencies (lightning, torchmetrics, omegaconf, open_clip, lpips, mlflow, ...)"
	$(PIP) install --quiet -c constraints.txt -e ".[dev,text]"
	@echo "==> torchvision on the CPU wheel: declaring its missing op schemas at import (no-op on CUDA)"
	$(PY) -m cf.compat.torchvision_ops
	@echo "==> checking the stack imports"
	$(PY) -c "import torch, torchvision, lightning, torchmetrics, open_clip, lpips, mlflow; print('torch', torch.__version__, '| lightning', lightning.__version__, '| mlflow', mlflow.__version__)"
	@echo "==> done: try 'make test' or 'make ablate MEMORY=slowfast'"

test:  ## the fast test suite (CPU, a few minutes)
	$(PY) -m pytest -q

test-slow:  ## the slow tests too
	$(PY) -m pytest -q -m "slow and not gpu"

lint:  ## ruff
	$(VENV)/bin/ruff check cf tests benchmarks

format:
	$(VENV)/bin/ruff format cf tests benchmarks

world:  ## write sample videos of the synthetic world to runs/world
	$(CF) world --preset $(PRESET) --n 2 --out runs/world

bench:  ## performance benchmarks -> benchmarks/results/
	$(PY) -m benchmarks.run

clean:
	rm -rf runs .pytest_cache
