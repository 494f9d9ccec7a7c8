# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP_RUN := $(VENV)/.installed-run
STAMP_DEV := $(VENV)/.installed-dev

.PHONY: run test lint typecheck check bench bench-viewer clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP_RUN): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(STAMP_DEV): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(STAMP_RUN)

## Start the hub with demo data (DICOM on 11112 as AE SAF, HTTP on 8000).
run: $(STAMP_RUN)
	$(BIN)/saf up --demo

## Run the whole test suite (slow tests included), then lint and type checks.
## TEST_WORKERS=3 runs them in three pytest-xdist processes (12.5 instead of 22-27 min on
## two cores), but that load still exposes a pynetdicom race (README, Development), so
## the default, and CI, run them in one process.
TEST_WORKERS ?= 0
test: $(STAMP_DEV)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope
	$(MAKE) --no-print-directory check

check: lint typecheck

lint: $(STAMP_DEV)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP_DEV)
	$(BIN)/mypy

## Ingest benchmark against dcmtk storescp and Orthanc (see bench/README.md).
bench: $(STAMP_DEV)
	$(BIN)/python -m bench.ingest

## The viewer in Chromium: first image, scroll fps, JS+CSS bytes (README, Performance).
bench-viewer: $(STAMP_DEV)
	$(BIN)/python -m bench.viewer

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
