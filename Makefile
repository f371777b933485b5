# Two entry points, both starting from a fresh clone:
#   make run   - create .venv with pinned dependencies, then run the pipeline (dvc repro)
#   make test  - the same set-up, then the whole test suite
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# stage commands call `python`: make it the one in .venv, whatever the caller's PATH holds
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup run test clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	$(BIN)/python -m pip check
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/dvc repro

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf data/raw data/split data/augmented models results mlruns mlflow.db
