# One command surface for people and CI. The venv is rebuilt only when pyproject.toml changes
# (the stamp's name carries its hash), because llama-cpp-python compiles for ~7 minutes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-$(shell sha256sum pyproject.toml | cut -c1-16)

.PHONY: run test lint format venv clean

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

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) data/out .pytest_cache .ruff_cache
