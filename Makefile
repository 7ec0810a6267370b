# trustvbd — `make run` starts the demo system, `make test` runs the whole suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NATIVE := $(VENV)/.native
# The native data plane (native/) is built with cargo, also where PATH lacks ~/.cargo/bin.
export PATH := $(PATH):$(HOME)/.cargo/bin:/root/.cargo/bin
CARGO := cargo
CARGO_FLAGS := --manifest-path native/Cargo.toml --locked
# cargo's PyO3 builds (clippy; cargo test, whose test binary embeds Python) use the venv's
# interpreter, as maturin does: no rebuild when switching, and no other python3 picked up.
export PYO3_PYTHON := $(abspath $(BIN)/python)
NATIVE_SRC := native/Cargo.toml native/Cargo.lock $(shell find native/src -name '*.rs')

.PHONY: run test lint deps test-deps bench clean fuzz

# pip builds the extension (maturin, pinned in pyproject.toml) into trustvbd/_native*.so.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP) $(NATIVE)

# Rebuilt when the crate changes (cargo makes that incremental).
$(NATIVE): $(STAMP) $(NATIVE_SRC)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(NATIVE)

deps: $(STAMP) $(NATIVE)

run: deps
	$(BIN)/trustvbd up -c examples/demo.toml

test-deps:
	sh scripts/install-test-deps.sh

lint: deps
	$(BIN)/ruff check trustvbd tests bench
	$(BIN)/mypy trustvbd tests bench
	$(CARGO) clippy $(CARGO_FLAGS) --all-features --all-targets -- -D warnings
	# rustfmt (native/rustfmt.toml) where the toolchain has it: a minimal one may not.
	if $(CARGO) fmt --version >/dev/null 2>&1; then \
	  $(CARGO) fmt --manifest-path native/Cargo.toml --check; fi

test: deps test-deps lint
	$(CARGO) test $(CARGO_FLAGS) --release --all-features
	# pytest 9.2 crashes (INTERNALERROR, the whole run stops) formatting a failure whose
	# traceback has a frame with no line number, whatever --tb: tests/conftest.py reports
	# such a failure plainly (tests/test_conftest_guard.py).
	$(BIN)/python -m pytest -n 2 -q -rfEs --tb=native -p no:cacheprovider

# Coverage-guided fuzzing (atheris), FUZZ_SECONDS per target; finds go to .fuzz/.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := superblock anchor intent_log tree keys audit_log xml_policy toml_policy nbd_server nbd_client
fuzz: deps
	$(BIN)/python -m pip install --quiet -e '.[test,fuzz]'
	@for t in $(FUZZ_TARGETS); do \
		echo "== fuzz $$t ($(FUZZ_SECONDS) s)"; \
		rm -f .fuzz/crashes/$$t-*; \
		$(BIN)/python -m tests.fuzz.run $$t -max_total_time=$(FUZZ_SECONDS) 2>&1 \
			| grep -E 'stat::number_of_executed_units|ERROR|Traceback|Uncaught|crash-' || true; \
		test -z "$$(ls .fuzz/crashes/$$t-* 2>/dev/null)" || { echo "fuzz: $$t crashed, see .fuzz/crashes"; exit 1; }; \
	done

bench: deps test-deps
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) examples/state examples/backing native/target trustvbd/_native*.so
