# A newcomer's two commands (README.md): `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
NPROC ?= 2
DEMO_DATA ?= data/demo
DEMO_RUN ?= runs/demo

.PHONY: demo test espeak lint

# The environment: the project and its pinned stack (pyproject.toml), in a virtualenv of its own.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# The demo speaks its captions with espeak-ng (a Debian package): install it when we can, else say how.
espeak:
	@command -v espeak-ng >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing espeak-ng (apt-get)"; apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null; \
	  elif command -v apt-get >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
	    echo "installing espeak-ng (sudo apt-get)"; sudo apt-get update -qq && sudo apt-get install -y -qq espeak-ng >/dev/null; \
	  else \
	    echo "espeak-ng is missing: install it (Debian/Ubuntu: sudo apt-get install espeak-ng) and run make again"; exit 1; \
	  fi; }

# Build the spoken-digits shards, train the tiny model on $(NPROC) DeepSpeed ranks, evaluate, print the table.
demo: $(VENV)/.installed espeak
	$(BIN)/mmssl demo-data --out $(DEMO_DATA)
	$(BIN)/mmssl train --preset tiny --nproc $(NPROC) --run-dir $(DEMO_RUN)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Lint, then the whole suite (CPU only; 2-rank tests use real gloo collectives).
test: lint espeak
	$(BIN)/pytest
