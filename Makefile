# Two commands for a newcomer: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= examples/demo.yaml

.PHONY: run test lint typecheck bench clean install

$(BIN)/relay: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(BIN)/relay

$(VENV)/.test-deps: $(BIN)/relay pyproject.toml tests/plugin_pkg/pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet -e ./tests/plugin_pkg
	touch $@

install: $(BIN)/relay

run: $(BIN)/relay
	@echo "audit-relay: demo source -> file destination ($(CONFIG))"
	@echo "  entries go to   ./state/demo/output.jsonl   (try: tail -f state/demo/output.jsonl)"
	@echo "  metrics are at  http://127.0.0.1:9464/metrics"
	@echo "  push entries to http://127.0.0.1:8088/v1/entries  (token: state/demo/push.token; see README)"
	@echo "  stop with Ctrl-C"
	$(BIN)/relay run --config $(CONFIG)

test: $(VENV)/.test-deps
	$(BIN)/python -m ruff check relay plugins tests bench
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(VENV)/.test-deps
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) state .pytest_cache .mypy_cache .ruff_cache
