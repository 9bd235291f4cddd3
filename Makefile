# cpt: `make demo` (quickstart) and `make test` (every test) work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := true
export CPT_CACHE ?= $(CURDIR)/.cpt_cache

.PHONY: setup demo experiment experiment-replay test test-fast lint bench docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Two steps in one venv: the demo needs cpt's runtime dependencies and matplotlib (the `plot`
# extra) alone; the tests add the `dev` extra (lm-evaluation-harness, DeepSpeed, pytest, ruff),
# about 3 of the 5 minutes a first `make setup` took on a 2-core machine. `make test` after
# `make demo` installs only what the first step left out.
# A CPU torch where none is installed: torch==2.13.0 installs from this machine's disk; an
# unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[plot]"
	touch $@

$(VENV)/.installed: $(VENV)/.runtime
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# The quickstart recipes compile their layers, which on CPU needs a C++ compiler; without one
# the demo trains eagerly (the same results to 0.0001 bits per byte, steps about 1.2x slower).
COMPILE := $(shell (command -v $${CXX:-g++} || command -v clang++ || command -v c++) >/dev/null 2>&1 && echo true || echo false)

# The two continuations start from the same base and do not depend on each other, so they train
# side by side, each on half the cores: the same figures as one after the other (to 0.0001 bits
# per byte), about 30 s sooner on 2 cores (README). The baseline's progress goes to its log; the
# comparison at the end prints both. A failure of either stops the demo with its message.
HALF_CORES := $(shell $(PYTHON) -c "import os; print(max(1, (os.cpu_count() or 2) // 2))")
TRAIN := $(BIN)/python -m cpt_cli train --overwrite

demo: $(VENV)/.runtime
	$(BIN)/python -m cpt_cli data quickstart data/quickstart
	$(TRAIN) recipes/quickstart/base.yaml train.compile=$(COMPILE)
	@mkdir -p runs
	@echo "training quickstart-finetune beside quickstart-cpt (its log: runs/quickstart-finetune.log)"
	@OMP_NUM_THREADS=$(HALF_CORES) $(TRAIN) recipes/quickstart/finetune.yaml \
	    train.compile=$(COMPILE) > runs/quickstart-finetune.log 2>&1 & baseline=$$!; \
	OMP_NUM_THREADS=$(HALF_CORES) $(TRAIN) recipes/quickstart/cpt.yaml train.compile=$(COMPILE); \
	status=$$?; wait $$baseline || { status=$$?; echo "quickstart-finetune failed:"; \
	    tail -n 20 runs/quickstart-finetune.log; }; exit $$status
	$(BIN)/python -m cpt_cli.quickstart compare runs/quickstart-cpt runs/quickstart-finetune

# One flow against stages at equal compute (docs/experiments/one-flow.md): trains the base on
# prose, then four arms of 600k tokens each from it, and prints the forgetting table of every
# arm against that one base; curves in runs/one-flow-curves.png.
experiment: $(VENV)/.runtime
	$(BIN)/python experiments/one_flow.py

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check cpt_cli tests bench experiments

bench: setup
	$(BIN)/python bench/tokenize_cache.py
	$(BIN)/python bench/loader.py
	$(BIN)/python bench/cpu_train.py
	$(BIN)/python bench/eval_speed.py

# Closed-loop replay against fixed ratios on the quickstart corpus (docs/experiments/auto-replay.md):
# the base model once, then five cpt stages from it; runs/experiment-replay/results.md.
experiment-replay: $(VENV)/.runtime
	$(BIN)/python experiments/auto_replay.py

docs: $(VENV)/.runtime
	$(BIN)/python -m cpt_cli.docgen

clean:
	rm -rf runs .cpt_cache data/quickstart
