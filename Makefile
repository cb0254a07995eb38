# One entry point per job. Each target creates .venv and installs the locked dependencies first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
RECIPE ?= demo
# Idle OpenMP threads sleep instead of spinning: spinning made CPU training ~3x slower on shared cores.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: venv demo test audit docs lint bench gpu-check gpu-wheels lock clean images stack-tools stack-test

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# onnxruntime-gpu (Linux x86_64) is the same module as onnxruntime: drop a CPU build an older lock left.
	$(PY) -m pip uninstall --quiet --yes onnxruntime 2>/dev/null || true
	$(PY) -m pip install --quiet -c requirements.lock -e '.[dev]'
	touch $@

## The main job: the whole finetune flow on synthetic data, CPU, local Prefect and MLflow.
demo: venv
	$(PY) -m flows.finetune --recipe $(RECIPE)

## The test suite (what CI runs), after the dependency audit and the docs build.
test: venv audit docs
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

## Known vulnerabilities in the locked dependencies (pip-audit against PyPI's advisory data). Findings are
## printed but never fail the build (the lock pins torch to what the wheel mirror holds: upgrades are a
## deliberate `make lock`); an unreachable service prints "pip-audit skipped: <reason>".
audit: venv
	@out=$$($(VENV)/bin/pip-audit -r requirements.lock --no-deps --disable-pip --progress-spinner off \
		--timeout 15 2>&1); rc=$$?; \
	locked=$$(grep -c '==' requirements.lock); \
	unaudited=$$(printf '%s\n' "$$out" | grep -c 'could not be audited'); \
	if printf '%s\n' "$$out" | grep -q '^Found [0-9]* known vulnerabilit'; then \
		printf '%s\n' "$$out" | grep -v -e 'could not be audited' -e '^WARNING:pip_audit'; \
		echo "pip-audit: known vulnerabilities listed above (reported, not failing the build)"; \
	elif [ $$rc -ne 0 ]; then \
		echo "pip-audit skipped: $$(printf '%s\n' "$$out" | tail -n 1)"; \
	elif [ $$unaudited -eq $$locked ]; then \
		echo "pip-audit skipped: the vulnerability service knew none of the $$locked locked packages" \
			"(PyPI's JSON API returned no data: offline, or only a package mirror is reachable)"; \
	else \
		echo "pip-audit: no known vulnerabilities ($$unaudited of $$locked locked packages could not be checked)"; \
	fi

## The docs site (docs/, mkdocs.yml) into site/; --strict: a broken link or anchor fails the build.
## No --quiet: it hides the warnings, and --strict then passes. NO_MKDOCS_2_WARNING: Material 9.7+ prints
## a banner about its end of life (May 2027) on every build.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

lint: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

## CPU (and, where CUDA exists, GPU) benchmarks; writes bench/RESULTS.md.
bench: venv
	$(PY) -m bench.run

## The GPU check (bench/README.md): training, loader, host syncs, resume, DDP and inference on one GPU in
## <= 8 min; writes bench/gpu_results.json and the GPU section of bench/RESULTS.md. It runs on the GPU
## machine's own Python there (torch preinstalled; the packages it lacks come from `make gpu-wheels`), the
## venv's where one exists. Without CUDA it runs its CPU smoke mode (JSON to runs/gpu_check_smoke.json).
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	GIT_COMMIT=$${GIT_COMMIT:-$$(git rev-parse HEAD 2>/dev/null)} $(GPU_PYTHON) -m bench.gpu_check

## Wheels (CPython 3.12, manylinux x86-64) of what bench.gpu_check imports beyond the GPU machine's own
## packages, into .whl/ (~8 MiB; versions from requirements.lock).
GPU_WHEELS := pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
	typing_extensions==4.16.0 albumentations==2.0.8 albucore==0.0.24 simsimd==6.5.16 stringzilla==5.3.2 \
	zlib-ng==1.1.0 cityscapesScripts==2.3.0 pyquaternion==0.9.9
gpu-wheels:
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $(GPU_WHEELS)
	@du -sh .whl

## Every image of the local stack and the project image. OFFLINE=1: no container registry, only a Debian
## mirror and the PyPI mirror the host's pip uses (see docs/local-stack.md).
OFFLINE ?=
images:
	OFFLINE=$(OFFLINE) infra/images/build.sh

## prefect-docker (not in the lock: only `prefect deploy` of the docker variant needs it) for the host.
STACK_TOOLS := .cache/stack-tools
stack-tools: $(STACK_TOOLS)/.installed

$(STACK_TOOLS)/.installed: venv
	$(PY) -m pip install --quiet --no-deps --target $(STACK_TOOLS) prefect-docker==0.7.4 docker==7.2.0 \
		python-on-whales==0.81.0 exceptiongroup==1.3.2
	touch $@

## The containerised path end to end (CI runs it after `make test`): engine, images, compose stack,
## docker work pool, deployment runs, checks.
stack-test: venv stack-tools
	@start=$$(date +%s); PYTHON=$(PY) infra/engine.sh && echo "== engine: $$(( $$(date +%s) - start )) s"
	@start=$$(date +%s); $(MAKE) --no-print-directory images OFFLINE=1 && echo "== images: $$(( $$(date +%s) - start )) s"
	$(PY) infra/stack_test.py

## Refresh the lock file after changing dependencies in pyproject.toml.
lock: venv
	$(PY) -m pip freeze --exclude-editable | grep -v '^-e' > requirements.lock

clean:
	rm -rf runs .pytest_cache site
