# trustvbd — `make run` starts the demo system, `make test` runs the whole suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint deps test-deps bench clean fuzz

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

# Coverage-guided fuzzing (atheris), FUZZ_SECONDS per target; finds go to .fuzz/.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := superblock anchor intent_log pages keys audit_log xml_policy toml_policy nbd_server nbd_client
fuzz: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,fuzz]'
	@for t in $(FUZZ_TARGETS); do \
		echo "== fuzz $$t ($(FUZZ_SECONDS) s)"; \
		rm -f .fuzz/crashes/$$t-*; \
		$(BIN)/python -m tests.fuzz.run $$t -max_total_time=$(FUZZ_SECONDS) 2>&1 \
			| grep -E 'stat::number_of_executed_units|ERROR|Traceback|Uncaught|crash-' || true; \
		test -z "$$(ls .fuzz/crashes/$$t-* 2>/dev/null)" || { echo "fuzz: $$t crashed, see .fuzz/crashes"; exit 1; }; \
	done

bench: $(STAMP) test-deps
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) examples/state examples/backing
