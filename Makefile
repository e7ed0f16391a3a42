# The two commands: `make run` and `make test`. Each creates .venv and installs on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test lint typecheck services clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/coscribe serve

services:
	bash ops/ensure-services.sh
	bash ops/ensure-packages.sh "the dashboard browser test" chromium=chromium
	bash ops/ensure-packages.sh "the sample proxies' test" nginx=nginx-light haproxy=haproxy openssl=openssl

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) services lint typecheck
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python -m ops.bench.ot
	$(BIN)/python -m ops.bench.frames

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
