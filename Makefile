# gradsift: two commands set everything up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(CURDIR)/.state/prefect
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0
export RAY_DEDUP_LOGS := 0

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first: a range that 2.13.0 satisfies then installs nothing more.
	$(BIN)/pip install -q torch==2.13.0
	# The transformers the whole suite runs on; 5.x works too (`.[bench]` brings it for Bergson).
	$(BIN)/pip install -q 'transformers>=4.56,<5'
	$(BIN)/pip install -q -e '.[real,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/gradsift demo

test: $(STAMP)
	# Two workers, one test file each: most of a test's wall time is waiting on the processes it starts
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

lint: $(STAMP)
	$(BIN)/ruff check gradsift tests bench

bench: $(STAMP)
	$(BIN)/python bench/persample.py

clean:
	rm -rf store .state
