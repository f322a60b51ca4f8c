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
UI_PORT ?= 5000

# `make ablate` runs one pipeline (METHOD x MEMORY), or with ABLATION=FILE a grid; in a grid, METHOD
# and MEMORY apply only when given on the command line (a grid's variants pick their own otherwise).
given = $(filter command line environment,$(origin $(1)))
ifeq ($(ABLATION),)
ABLATE_ARGS := --method $(METHOD) --memory $(MEMORY)
else
ABLATE_ARGS := --ablation $(ABLATION) $(if $(call given,METHOD),--method $(METHOD)) $(if $(call given,MEMORY),--memory $(MEMORY))
endif

.PHONY: help install test test-slow lint format bench bench-compare ablate ablate-plan tables notebooks ui world clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 14

$(VENV)/bin/python:
	@echo "==> creating $(VENV) with $$($(PYTHON) --version)"
	$(PYTHON) -m venv $(VENV)

install: $(VENV)/bin/python  ## create .venv and install the CPU stack (idempotent, no GPU needed)
	@echo "==> torch pinned to the local CPU wheel (constraints.txt)"
	$(PIP) install --quiet -c constraints.txt "torch==2.13.0" "torchvision==0.28.0"
	@echo "==> cf and its dependencies (lightning, torchmetrics, omegaconf, open_clip, lpips, mlflow, diffusers, ...)"
	$(PIP) install --quiet -c constraints.txt -e ".[dev,text,wan]"
	@echo "==> torchvision on the CPU wheel: declaring its missing op schemas at import (no-op on CUDA)"
	$(PY) -m cf.compat.torchvision_ops
	@echo "==> checking the stack imports"
	$(PY) -c "import torch, torchvision, lightning, torchmetrics, open_clip, lpips, mlflow; print('torch', torch.__version__, '| lightning', lightning.__version__, '| mlflow', mlflow.__version__)"
	@echo "==> done: try 'make test' or 'make ablate MEMORY=slowfast'"

TEST_WORKERS ?= auto

test:  ## the fast test suite (CPU, ~2.5 min on 2 cores: one pytest-xdist worker per core, TEST_WORKERS=N)
	$(PY) -m pytest -q -n $(TEST_WORKERS)

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

bench-compare:  ## training step times of this tree against BASELINE=<commit>, side by side (benchmarks/results/compare_*)
	$(PY) -m benchmarks.compare $(or $(BASELINE),HEAD~1)

ablate:  ## the pipeline end to end: MEMORY=full|sliding|sink|slowfast PRESET=tiny METHOD=... SEED=0, or ABLATION=ablations/NAME.yaml
	$(CF) ablate --preset $(PRESET) --seed $(SEED) $(ABLATE_ARGS)

ablate-plan:  ## what `make ablate` (same variables) would run or reuse from the stage cache
	$(CF) ablate --plan --preset $(PRESET) --seed $(SEED) $(ABLATE_ARGS)

ui:  ## the MLflow UI on 127.0.0.1 (UI_PORT=5000) over the project's store or $MLFLOW_TRACKING_URI
	$(CF) ui --port $(UI_PORT)

tables:  ## results/<preset>/<ablation>.md + .csv from the MLflow pipeline runs
	$(CF) tables

notebooks:  ## execute notebooks/*.ipynb headless; figures -> results/figures/
	$(CF) notebooks --preset $(PRESET)

clean:
	rm -rf runs .pytest_cache
