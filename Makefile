# One target per verb. `make test` and `make run` install first when needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 50051
DATA_DIR ?= .data

.PHONY: install proto lint typecheck breaking test bench bench-learning run check clean image

install: $(STAMP)

# Re-installs only when the dependency list changes; editable, so code edits need nothing.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

proto: $(STAMP)
	$(BIN)/buf format -w
	$(BIN)/python scripts/codegen.py

lint: $(STAMP)
	$(BIN)/buf lint
	$(BIN)/buf format -d --exit-code
	$(BIN)/ruff check src tests scripts bench
	$(BIN)/ruff format --check src tests scripts bench
	$(MAKE) typecheck

typecheck: $(STAMP)
	$(BIN)/mypy src/oo_ml

breaking: $(STAMP)
	$(BIN)/buf breaking --against schema/released.binpb

# Refresh the released-schema baseline: run only when a schema version is released.
image: $(STAMP)
	$(BIN)/buf build -o schema/released.binpb

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

# oo-ml's policies beside MABWiser and Vowpal Wabbit on the simulator's world (docs/learning.md).
bench-learning: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m bench.learning $(BENCH_ARGS)

run: $(STAMP)
	$(BIN)/oo-ml serve --host $(HOST) --port $(PORT) --data-dir $(DATA_DIR)

check: lint breaking test

clean:
	rm -rf $(VENV) .data .pytest_cache .mypy_cache .ruff_cache
