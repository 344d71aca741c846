# Minitron recipe. `make help` lists the targets.
#   make setup                      create .venv with the pinned stack (every target depends on it)
#   make test                       the CPU test suite
#   make convert RECIPE=conf/x.yaml ARGS="run.dir=runs/x convert.hf_path=..." [NPROC=2]
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
RECIPE ?= conf/tiny.yaml
ARGS ?=
NPROC ?= 1
PYTEST_ARGS ?=

ifeq ($(NPROC),1)
RUN := $(PY) -m
else
RUN := $(VENV)/bin/torchrun --nproc-per-node $(NPROC) -m
endif

.PHONY: help setup test data convert prune export plan bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

setup: $(VENV)/.installed  ## create .venv: Python 3.11, torch 2.13.0, megatron-core 0.19.2, ModelOpt 0.47.0

$(VENV)/.installed: requirements.txt requirements-engine.txt requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt -c requirements.lock
	$(VENV)/bin/pip install -q --no-deps --ignore-requires-python -r requirements-engine.txt
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	touch $@

test: setup  ## run the CPU test suite (unit, stages, torchrun; gpu tests skip without CUDA)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

data: setup  ## text/JSONL -> indexed dataset: ARGS="run.dir=... data.input=... data.tokenizer=..."
	$(RUN) recipes.data --config $(RECIPE) $(ARGS)

convert: setup  ## HF folder -> megatron checkpoint: ARGS="run.dir=... convert.hf_path=..."
	$(RUN) recipes.convert --config $(RECIPE) $(ARGS)

prune: setup  ## Minitron pruning (TP=1, any PP): ARGS="run.dir=..." [NPROC=N ARGS+=parallel.pp=N]
	$(RUN) recipes.prune --config $(RECIPE) $(ARGS)

plan: setup  ## print architectures, parameter counts, memory and GPU-hours of a recipe (no weights)
	$(PY) -m recipes.plan --config $(RECIPE) $(ARGS)

export: setup  ## megatron checkpoint -> HF folder with logit parity: ARGS="run.dir=... export.input=..."
	$(RUN) recipes.export --config $(RECIPE) $(ARGS)

bench: setup  ## benchmarks (ratios against a reference run in the same process)
	$(PY) bench/convert.py
	$(PY) bench/distill.py

clean:  ## remove runs/ (keeps .venv and data/)
	rm -rf runs
