# `make test` and `make demo` each set themselves up on a fresh machine: a virtual environment in
# .venv with the pinned dependencies, installed once (re-installed when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONHASHSEED := 0
# Quieter, offline-safe defaults: no hub at run time, W&B writes offline run files.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export WANDB_MODE ?= offline

.PHONY: install test test-distributed demo lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned, so nothing later pulls a multi-GB CUDA build on a CPU machine.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -ra tests

# Only the multi-process DeepSpeed ZeRO-3 launches (2 CPU processes; about 3 minutes on 2 cores).
test-distributed: $(STAMP)
	$(PY) -m pytest -q -ra -m distributed tests

demo: $(STAMP)
	$(PY) -m mixtune.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check mixtune tests bench data
	$(VENV)/bin/ruff format --check mixtune tests bench data

format: $(STAMP)
	$(VENV)/bin/ruff format mixtune tests bench data
	$(VENV)/bin/ruff check --fix mixtune tests bench data

bench: $(STAMP)
	$(PY) -m bench.run_all

clean:
	rm -rf $(VENV) runs outputs
