# `make demo` and `make test` work on a fresh machine: they create .venv/ and install
# the project (with the extras they need) under constraints.txt before running.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
PIP_FLAGS := --disable-pip-version-check --no-input -q

.PHONY: demo test fuzz bench bench-quick info clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_FLAGS) -c constraints.txt -e ".[all]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

# The suite runs on PYTEST_WORKERS processes (pytest-xdist), one test file per worker at a time
# (module-scoped fixtures, such as the reference suites' subprocess runs, run once).
PYTEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile

# The property-based tests with many random examples (the "fuzz" hypothesis profile of
# tests/fuzz_profiles.py; `make test` runs them with the few, reproducible examples of "ci").
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/pytest tests/test_fuzz_*.py

bench: $(STAMP)
	$(BIN)/python asv_bench/table.py
	cd asv_bench && ../$(BIN)/asv machine --yes >/dev/null && ../$(BIN)/asv run --python=same --quick --show-stderr

info: $(STAMP)
	$(BIN)/python -m uniopt info

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis asv_bench/.asv
