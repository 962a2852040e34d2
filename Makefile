# hf-vram: every target installs what it needs first, so a fresh clone needs only
# `make finetune` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
# torch is installed first and pinned, so that the package's range never pulls another build. Where pip is not
# pointed at a CPU wheel, add the index: make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
# GPU users name a CUDA build the same way (.../whl/cu128). `make install` always re-runs both steps.
TORCH  ?= torch==2.13.0
RECIPE ?= demo
NPROC  ?= 1
ARGS   ?=
GPU    ?= rtx4070
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install finetune train validate plan table ui test test-fast lint bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install:
	rm -f $(STAMP)
	$(MAKE) $(STAMP)

# The main job: with no RECIPE, the embedded offline demo (tiny Llama pretrain, then QLoRA, scored).
finetune: $(STAMP)
	$(BIN)/hf-vram train $(RECIPE) --nproc $(NPROC) $(ARGS)

train: $(STAMP)
	$(BIN)/hf-vram train $(RECIPE) --nproc $(NPROC) $(ARGS)

validate: $(STAMP)
	$(BIN)/hf-vram validate recipes

# Predicted peak VRAM and time of a recipe on a card (GPU=rtx3060|rtx4070|rtx4090|a100-40gb|a100-80gb|h100).
plan: $(STAMP)
	$(BIN)/hf-vram plan $(RECIPE) --gpu $(GPU) $(ARGS)

table: $(STAMP)
	$(BIN)/hf-vram table --gpu $(GPU) --csv outputs/recipes-on-$(GPU).csv

# The local web app on http://127.0.0.1:7860 over this folder (recipes/, outputs/); Ctrl-C ends it, runs go on.
ui: $(STAMP)
	$(BIN)/hf-vram ui $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Unit tests only (marked in tests/conftest.py): under a minute, no training runs.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m unit

bench: $(STAMP)
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_qlora.py
	$(BIN)/python bench/bench_diffusion.py
	$(BIN)/python bench/vram_accuracy.py

clean:
	rm -rf outputs .pytest_cache
