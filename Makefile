# trustvbd — `make run` starts the demo system, `make test` runs the whole suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint deps test-deps bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

deps: $(STAMP)

run: $(STAMP)
	$(BIN)/trustvbd up -c examples/demo.toml

test-deps:
	sh scripts/install-test-deps.sh

lint: $(STAMP)
	$(BIN)/ruff check trustvbd tests bench
	$(BIN)/mypy trustvbd

test: $(STAMP) test-deps lint
	$(BIN)/python -m pytest -n 2 -q -rfEs -p no:cacheprovider

bench: $(STAMP) test-deps
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) examples/state examples/backing
