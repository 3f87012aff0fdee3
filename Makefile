# One command surface for people and CI. The venv is rebuilt only when pyproject.toml changes
# (the stamp's name carries its hash), because llama-cpp-python compiles for ~7 minutes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-$(shell sha256sum pyproject.toml | cut -c1-16)

.PHONY: run test lint typecheck format venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	rm -f $(VENV)/.stamp-*
	touch $@

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/enrich run data/topics.csv --output data/out/topics_enriched.parquet

test: $(STAMP) lint
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(MAKE) --no-print-directory typecheck

# mypy resolves modules from folders, and ours install under other names (llm_enrich.flows from
# flows/, ...): a tree of symlinks under build/ gives it the installed layout.
typecheck: $(STAMP)
	rm -rf build/typecheck && mkdir -p build/typecheck/llm_enrich
	ln -s $(CURDIR)/api/__init__.py build/typecheck/llm_enrich/__init__.py
	for d in flows transforms schemas; do ln -s $(CURDIR)/$$d build/typecheck/llm_enrich/$$d; done
	cd build/typecheck && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml -p llm_enrich

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) data/out .pytest_cache .ruff_cache
