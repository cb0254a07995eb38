# One entry point per job. Each target creates .venv and installs the locked dependencies first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
RECIPE ?= demo

.PHONY: venv demo test lint bench lock clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements.lock -e '.[dev]'
	touch $@

## The main job: the whole finetune flow on synthetic data, CPU, local Prefect and MLflow.
demo: venv
	$(PY) -m flows.finetune --recipe $(RECIPE)

## The test suite (what CI runs).
test: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

lint: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

## CPU (and, where CUDA exists, GPU) benchmarks; writes bench/RESULTS.md.
bench: venv
	$(PY) -m bench.run

## Refresh the lock file after changing dependencies in pyproject.toml.
lock: venv
	$(PY) -m pip freeze --exclude-editable | grep -v '^-e' > requirements.lock

clean:
	rm -rf runs .pytest_cache
